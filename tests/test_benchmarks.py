"""The benchmark harness writes correct output files (CPU mode, tiny sizes). Never asserts timings."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import rlhf_fast as rf
from benchmarks import harness as H
from benchmarks.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
FAST = ["--cpu", "--sizes", "tiny", "--budget", "0", "--min-reps", "2", "--max-reps", "2", "--threads", "1"]
RECORD_KEYS = {"op", "impl", "kind", "case", "shape", "size", "dtype", "device", "device_name", "torch", "triton",
               "cuda", "date", "git_commit", "status", "note", "time_ms", "first_call_ms", "mem_peak_bytes",
               "mem_extra_bytes", "speedup_vs_reference", "bytes", "gbps", "bandwidth_pct", "flops", "tflops",
               "rel_err_vs_reference"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(FAST + ["--out", str(out), "--no-plots"]) == 0  # plots: test_plots, on a subset (matplotlib is slow)
    return out, json.loads((out / "results.json").read_text())


def test_json_schema(cpu_run):
    _, result = cpu_run
    meta = result["meta"]
    for k in ("device_name", "torch", "triton", "cuda", "git_commit", "date", "copy_bandwidth_gbps", "options"):
        assert k in meta, k
    assert meta["device"] == "cpu" and meta["device_name"].startswith("CPU") and meta["copy_bandwidth_gbps"] > 0
    recs = result["records"]
    assert recs and all(RECORD_KEYS <= set(r) for r in recs)
    for bench in H.load_benches():
        ok = {r["impl"] for r in recs if r["op"] == bench.op and r["status"] == "ok"}
        assert "reference" in ok, bench.op
        # every backend registered for the CPU runs (Triton only under the interpreter: recorded as skipped)
        assert set(rf.backends_for(bench.op, "cpu")) - {"triton"} <= ok, bench.op
    for r in recs:
        if r["status"] != "ok":
            assert r["note"], r  # a skipped peer or backend says why
            continue
        phases = ("fwd", "bwd", "full") if r["time_ms"]["bwd"] is not None else ("fwd",)
        for p in phases:
            t = r["time_ms"][p]
            assert t["n"] >= 2 and 0 <= t["p20"] <= t["p50"] <= t["p80"], (r["op"], r["impl"], p)
        if r["impl"] == "reference":
            assert r["speedup_vs_reference"]["fwd"] == pytest.approx(1.0)
        if r["bytes"]["fwd"] is not None:
            assert r["gbps"]["fwd"] > 0 and r["bandwidth_pct"]["fwd"] > 0
        if r["rel_err_vs_reference"] is not None:
            assert r["rel_err_vs_reference"] < 1e-3, (r["op"], r["impl"])  # the others compute the same thing
    gae = {r["impl"] for r in recs if r["op"] == "gae" and r["status"] == "ok"}
    assert "python-loop" in gae


def test_markdown_rows(cpu_run):
    out, result = cpu_run
    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    assert len(rows) == sum(r["status"] == "ok" for r in result["records"])
    assert H.MD_HEADER in md and result["meta"]["device_name"] in md
    for r in result["records"]:
        if r["status"] != "ok":
            assert f"**{r['impl']}**" in md


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plots(cpu_run, tmp_path):
    _, result = cpu_run
    result = dict(result, records=[r for r in result["records"] if r["op"] in ("kl", "gae")])
    (tmp_path / "results.json").write_text(json.dumps(result))
    assert main(["--replot", str(tmp_path)]) == 0
    for name in ("kl", "gae", "summary"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_replot_and_selection(cpu_run, tmp_path):
    out, _ = cpu_run
    shutil.copy(out / "results.json", tmp_path / "results.json")
    assert main(["--replot", str(tmp_path), "--no-plots"]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text().replace(str(out), str(tmp_path))
    # --append keeps the other records and replaces those measured again
    before = json.loads((tmp_path / "results.json").read_text())["records"]
    assert main(FAST + ["--ops", "kl", "--backends", "reference", "--peers", "none", "--append", "--no-plots",
                        "--out", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "results.json").read_text())["records"]
    assert sorted((r["op"], r["impl"], r["case"]) for r in after) == sorted((r["op"], r["impl"], r["case"]) for r in before)
    sel = tmp_path / "sel"
    assert main(FAST + ["--ops", "kl", "--backends", "reference", "--peers", "none", "--phases", "fwd", "--no-plots",
                        "--out", str(sel)]) == 0
    recs = json.loads((sel / "results.json").read_text())["records"]
    assert {(r["op"], r["impl"]) for r in recs} == {("kl", "reference")}
    assert all(r["time_ms"]["bwd"] is None and r["time_ms"]["fwd"] for r in recs)


def test_gpu_run_dry_run(tmp_path):
    """benchmarks/gpu_run.sh --dry-run: the GPU script's steps on the CPU at tiny sizes, into $OUT."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_RUN_SKIP="build,tests,compile,plots", GPU_RUN_BENCH_ARGS="--ops kl",
               GPU_RUN_RESULTS=str(tmp_path / "results"), PYTHON=sys.executable)
    p = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(os.listdir(tmp_path / "out"))
    assert {"gpu_run.log", "device.txt", "results.json", "results.md", "results.tgz"} <= set(files), files
    assert len(files) <= 8
    recs = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert {r["op"] for r in recs} == {"kl"}
    log = (tmp_path / "out" / "gpu_run.log").read_text()
    assert "build: skipped" in log and "tests: skipped" in log and "bench: pass 1" in log
    # the static profile: its module loads where this tree has it (it compiles for minutes: not in a dry run)
    if os.path.exists(os.path.join(ROOT, "benchmarks", "static_profile.py")):
        assert "static: dry run: benchmarks.static_profile loads" in log
    else:
        assert "static: skipped: benchmarks/static_profile.py is not in this tree" in log
    # linear_ppo_loss with the GPU run's extras (the 3-GEMM baseline, a chunk-size sweep), at a tiny size
    assert "linppo: ok" in log
    lin = json.loads((tmp_path / "results" / "linear_ppo_loss.json").read_text())
    assert lin["shape"] == {"N": 96, "H": 32, "V": 1000} and lin["meta"]["git_commit"]
    assert set(lin["runs"]) == {"linear_ppo_loss", "linear_ppo_loss_chunk64", "materialised_logits"}
    assert lin["throughput_ratio_vs_3gemm"] == pytest.approx(
        lin["gemm_baseline"]["time_ms"]["p50"] / lin["runs"]["linear_ppo_loss"]["time_ms"]["p50"])
    if importlib.util.find_spec("trl") is None:
        assert "trl: skipped: trl is MISSING" in log
    else:
        assert "trl: ok" in log
        trl = json.loads((tmp_path / "results" / "trl_grpo_step.json").read_text())
        assert trl["errors"] == {} and set(trl["runs"]) == {"step_unpatched", "step_patched"}
        assert trl["runs"]["step_patched"]["rf_calls"]["chunked_logprob"] > 0  # the patch really ran
        assert trl["runs"]["step_unpatched"]["rf_calls"].get("chunked_logprob", 0) == 0
        assert trl["step_loss_abs_diff"] < 1e-5
    tar = subprocess.run(["tar", "-tzf", str(tmp_path / "out" / "results.tgz")], capture_output=True, text=True).stdout
    assert "linear_ppo_loss.json" in tar


def test_linear_ppo_loss_bench_cpu(tmp_path):
    """The CPU mode of bench_linear_ppo_loss at a tiny size: its JSON fields, the 3-GEMM baseline's
    definition (the same shapes as the fused op's GEMMs) and its gradients against the materialised path."""
    from benchmarks import bench_linear_ppo_loss as B

    r = B.main(["--N", "64", "--H", "16", "--V", "300", "--reps", "1", "--out", str(tmp_path), "--no-plots",
                "--gemm-baseline"])
    on_disk = json.loads((tmp_path / "linear_ppo_loss.json").read_text())
    for k in ("meta", "backend", "shape", "dtype", "chunk_rows", "memory_note", "logits_plus_grad_bytes", "runs",
              "loss_rel_diff", "grad_rel_diff", "memory_ratio", "time_ratio", "bars", "gemm_baseline",
              "throughput_ratio_vs_3gemm", "bars_met"):
        assert k in on_disk, k
    assert on_disk["meta"]["device"] == "cpu" and on_disk["backend"] == "cpu" and on_disk["dtype"] == "float32"
    assert r["loss_rel_diff"] < 1e-5 and max(r["grad_rel_diff"].values()) < 1e-4
    for run in list(r["runs"].values()) + [r["gemm_baseline"]]:
        assert run["time_ms"]["n"] >= 1 and run["time_ms"]["p50"] > 0 and run["tflops"] > 0
    # the GPU mode's measuring loop, on the CPU: warm-up calls, one measured call, the timer's repetitions
    calls = []
    peak, extra, times = B._cuda_run(lambda: calls.append("fn"), lambda: calls.append("clear"), H.Memory("cpu"),
                                     H.Timer("cpu", budget_s=0.0, min_reps=3, max_reps=3), warmup=2)
    assert len(times) == 3 and calls.count("fn") == 2 + 1 + 3 and calls[-1] == "clear"
    assert all(a != b or a == "clear" for a, b in zip(calls, calls[1:]))  # each call of fn follows a clear
    h, w, g = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64), torch.randn(
        5, 7, dtype=torch.float64)
    logits, gh, gw = B.gemm_baseline(h, w, g)
    torch.testing.assert_close(logits, h @ w.T)
    torch.testing.assert_close(gh, g @ w)
    torch.testing.assert_close(gw, g.T @ h)
    assert gh.shape == h.shape and gw.shape == w.shape


def test_linear_ppo_loss_bench_loss_types(tmp_path):
    """bench_linear_ppo_loss --loss-types at a tiny size: every case timed, ratios to ppo, the JSON on disk."""
    from benchmarks import bench_linear_ppo_loss as B

    r = B.main(["--loss-types", "--N", "32", "--H", "8", "--V", "40", "--reps", "1", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "linear_ppo_loss_loss_types.json").read_text())
    assert set(on_disk["runs"]) == {"ppo", "ppo+weights", "gspo", "cispo"} and on_disk["shape"]["N"] == 32
    assert r["time_ratio_vs_ppo"]["ppo"] == 1.0 and all(v > 0 for v in r["time_ratio_vs_ppo"].values())
    assert all(run["time_ms"]["n"] == 1 for run in r["runs"].values())


def test_gpu_benchmarks_parse_without_a_gpu():
    """The CUDA mode of the GPU run's benchmarks: the issue's sizes by default, flags override, and without a
    GPU a clear exit rather than numbers."""
    from benchmarks import bench_linear_ppo_loss as B
    from benchmarks import trl_grpo_step as T

    a = B.parse_args(["--device", "cuda"])
    assert (a.N, a.H, a.V, a.dtype, a.backend) == (16384, 4096, 151936, "bfloat16", None)
    assert a.chunk_sizes == [None, 1024, 2048] and a.gemm_baseline is None and a.reps >= 5
    a = B.parse_args(["--device", "cuda", "--N", "4096", "--chunk-sizes", "default,512", "--dtype", "float16"])
    assert (a.N, a.chunk_sizes, a.dtype) == (4096, [None, 512], "float16")
    a = B.parse_args([])
    assert (a.device, a.N, a.H, a.V, a.dtype, a.backend, a.chunk_sizes) == ("cpu", 1024, 512, 151936, "float32",
                                                                           "cpu", [None])
    with pytest.raises(SystemExit):
        B.parse_args(["--device", "mps"])
    t = T.parse_args(["--device", "cuda", "--vocab", "151936", "--kinds", "step,trainer"])
    assert (t.device, t.vocab, t.kinds) == ("cuda", 151936, ["step", "trainer"])
    with pytest.raises(SystemExit):
        T.parse_args(["--kinds", "steps"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            B.compare(8, 4, 16, device="cuda")
        if not T.missing_peers(["step"]):
            with pytest.raises(SystemExit, match="no CUDA device"):
                T.main(["--device", "cuda", "--kinds", "step"])


def test_trl_step_bench_skips_without_trl(monkeypatch, capsys, tmp_path):
    """Without trl the TRL step benchmark says so, exits 0 and writes nothing."""
    from benchmarks import trl_grpo_step as T

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert T.main(["--device", "cpu", "--kinds", "step", "--out", str(tmp_path)]) == 0
    assert "skipped: trl not installed" in capsys.readouterr().out
    assert not os.listdir(tmp_path)


def test_linear_ppo_loss_grad_weight_designs_tiny(tmp_path):
    """bench_linear_ppo_loss --grad-weight-designs at a tiny size: the JSON, both designs' gradients agree, the
    shipped one keeps less for the backward and is as precise as the fp32 accumulator."""
    from benchmarks import bench_linear_ppo_loss as B

    r = B.grad_weight_designs(time_shape=dict(N=64, H=16, V=300), prec_shape=dict(N=64, H=16, V=300), n_chunks=8,
                              reps=1, out_dir=str(tmp_path))
    on_disk = json.loads((tmp_path / "linear_ppo_loss_grad_weight.json").read_text())
    assert on_disk["timing"]["time_ratio_shipped_over_old"] == r["timing"]["time_ratio_shipped_over_old"]
    runs = r["timing"]["runs"]
    assert runs["shipped_recompute_in_backward"]["kept_for_backward_bytes"] < \
        runs["accumulate_fp32_in_forward"]["kept_for_backward_bytes"]
    assert max(r["timing"]["grad_rel_diff_between_designs"].values()) < 1e-5
    p = r["precision"]["grad_weight_vs_float64"]
    assert p["shipped_recompute_in_backward"]["rel_frobenius"] <= 1.01 * p["accumulate_fp32_in_forward"]["rel_frobenius"]
