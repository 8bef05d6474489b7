"""TRL's GRPO loss-side step with and without ``rlhf_fast.integrations.trl.patch()``, same inputs.

    python -m benchmarks.trl_grpo_step [--device cpu|cuda] [--vocab V] [--kinds step,trainer] [--out DIR]

What is timed is what the patch changes: the policy forward through TRL's fused LM head
(``add_fused_lm_head`` + ``model(..., labels=..., fused_lm_head=True)``, as GRPOTrainer calls it for
the completion log-probs and entropy) plus its backward, on a small randomly initialised Llama with a
large vocabulary (the head dominates). Each configuration runs in its own subprocess so the peak memory
(``torch.cuda.max_memory_allocated`` on a GPU; the resident-set high-water mark minus the level before
the first step on a CPU, approximate) belongs to it alone. Also records a tiny GRPOTrainer run (3 steps,
generation included, on the same device) patched vs unpatched: wall time and the logged losses. Writes
trl_grpo_step.json, with the harness's metadata (device name, date, commit, versions), into
benchmarks/results/<device>/ (harness.device_slug; or --out). Without trl (or transformers) it says so
and exits 0, writing nothing; a worker that fails is recorded with its error and the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PEERS = ("trl", "transformers")  # the step needs these; the trainer also needs datasets and tokenizers


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step_worker(patch: bool, device: str, vocab: int, batch: int, seq: int, reps: int) -> dict:
    import transformers
    from trl.trainer.utils import add_fused_lm_head

    from rlhf_fast.integrations import trl as rf_trl

    if patch:
        rf_trl.patch()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq + 8)
    model = transformers.LlamaForCausalLM(cfg).to(device)
    add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # the prompt half is not scored, as in GRPO

    def step():
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        loss = -(out.log_probs.sum() + 0.01 * out.entropy.sum()) / (labels != -100).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else _rss_mib()
    times, losses = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        losses.append(step())
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib() - base
    return {"patched": patch, "median_s": statistics.median(times), "times_s": times, "loss": losses[0],
            "peak_mib": peak, "peak_kind": "CUDA max_memory_allocated over the timed steps (model included)"
            if device == "cuda" else
            "CPU RSS high-water mark above the level after one warm-up step (approximate, allocator-dependent)",
            "peak_above_model_mib": peak - base if device == "cuda" else peak,
            "process_maxrss_mib": _rss_mib(),
            "rf_calls": dict(rf_trl.calls)}


def _trainer_worker(patch: bool, device: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import pathlib

    from test_integrations_trl import _tiny_grpo

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        losses = _tiny_grpo(pathlib.Path(d), patch=patch, device=device)
        return {"patched": patch, "wall_s": time.perf_counter() - t0, "losses": losses}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--kinds", default="step,trainer", help="comma-separated: step (the fused-head forward + "
                                                          "backward), trainer (a tiny GRPOTrainer run)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    p.add_argument("--out", default=None)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.kinds = a.kinds.split(",")
    if not set(a.kinds) <= {"step", "trainer"} or not a.kinds:
        p.error(f"--kinds must be step and/or trainer, got {','.join(a.kinds)!r}")
    if a.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {a.device!r}")
    return a


def missing_peers(kinds) -> list[str]:
    import importlib.util

    need = PEERS + (("datasets", "tokenizers") if "trainer" in kinds else ())
    return [m for m in need if importlib.util.find_spec(m) is None]


def _run_worker(a, kind: str, patch: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.trl_grpo_step", "--device", a.device, "--vocab", str(a.vocab),
           "--batch", str(a.batch), "--seq", str(a.seq), "--reps", str(a.reps), "--_worker", f"{kind}:{patch}"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}: " + (p.stderr or p.stdout)[-2000:]}
    return json.loads(lines[-1][7:])


def _ratio(runs, key, a, b, floor=0.0):
    x, y = runs.get(a, {}), runs.get(b, {})
    return x[key] / max(y[key], floor) if key in x and key in y and max(y[key], floor) else None


def main(argv=None):
    a = parse_args(argv)
    if a._worker:
        kind, patch = a._worker.split(":")
        res = (_step_worker(patch == "1", a.device, a.vocab, a.batch, a.seq, a.reps) if kind == "step"
               else _trainer_worker(patch == "1", a.device))
        print("RESULT " + json.dumps(res))
        return 0
    missing = missing_peers(a.kinds)
    if missing:
        print(f"trl_grpo_step: skipped: {', '.join(missing)} not installed (pip install trl==1.16.0); nothing written")
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("trl_grpo_step: --device cuda, but torch sees no CUDA device")
    runs = {}
    for kind in a.kinds:
        for patch in ("0", "1"):
            runs[f"{kind}_{'patched' if patch == '1' else 'unpatched'}"] = _run_worker(a, kind, patch)
    import trl
    import transformers

    from benchmarks.harness import device_slug, environment

    result = {
        "label": f"{a.device.upper()} measurement" + (" (not a GPU number)" if a.device == "cpu" else ""),
        "meta": environment(a.device),
        "device": a.device if a.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"batch": a.batch, "seq": a.seq, "vocab": a.vocab, "hidden": 256, "layers": 2},
        "errors": {k: r["error"] for k, r in runs.items() if "error" in r},
    }
    if "step" in a.kinds:
        su, sp = runs["step_unpatched"], runs["step_patched"]
        result.update({
            "step_time_ratio_patched_over_unpatched": _ratio(runs, "median_s", "step_patched", "step_unpatched"),
            "step_peak_ratio_patched_over_unpatched": _ratio(runs, "peak_mib", "step_patched", "step_unpatched",
                                                             1e-9),
            "process_maxrss_mib": {"unpatched": su.get("process_maxrss_mib"),
                                   "patched": sp.get("process_maxrss_mib")},
            "step_loss_abs_diff": abs(sp["loss"] - su["loss"]) if "loss" in sp and "loss" in su else None,
        })
    if "trainer" in a.kinds:
        tp, tu = runs["trainer_patched"], runs["trainer_unpatched"]
        result.update({
            "trainer_loss_max_abs_diff": max((abs(x["loss"] - y["loss"]) for x, y in zip(tp["losses"], tu["losses"])),
                                             default=None) if "losses" in tp and "losses" in tu else None,
            "trainer_wall_ratio_patched_over_unpatched": _ratio(runs, "wall_s", "trainer_patched",
                                                                "trainer_unpatched"),
        })
    result["runs"] = runs
    out_dir = a.out or os.path.join(os.path.dirname(__file__), "results", device_slug(a.device))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "trl_grpo_step.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "meta")}, indent=1))
    print("wrote", path)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
