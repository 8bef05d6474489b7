"""The benchmark harness writes correct output files (CPU mode, tiny sizes). Never asserts timings."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

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
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(os.listdir(tmp_path / "out"))
    assert {"gpu_run.log", "device.txt", "results.json", "results.md", "results.tgz"} <= set(files), files
    assert len(files) <= 8
    recs = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert {r["op"] for r in recs} == {"kl"}
    log = (tmp_path / "out" / "gpu_run.log").read_text()
    assert "build: skipped" in log and "tests: skipped" in log and "bench: pass 1" in log
