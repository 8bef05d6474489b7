"""TRL's GRPO loss-side step with and without ``rlhf_fast.integrations.trl.patch()``, same inputs.

    python -m benchmarks.trl_grpo_step [--device cpu|cuda] [--vocab V] [--out DIR]

What is timed is what the patch changes: the policy forward through TRL's fused LM head
(``add_fused_lm_head`` + ``model(..., labels=..., fused_lm_head=True)``, as GRPOTrainer calls it for
the completion log-probs and entropy) plus its backward, on a small randomly initialised Llama with a
large vocabulary (the head dominates). Each configuration runs in its own subprocess so the peak memory
(``torch.cuda.max_memory_allocated`` on a GPU; the resident-set high-water mark minus the level before
the first step on a CPU, approximate) belongs to it alone. Also records a tiny GRPOTrainer run (3 steps,
generation included) patched vs unpatched: wall time and the logged losses. Writes trl_grpo_step.json
into benchmarks/results/<device>/ (or --out).
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
    base = _rss_mib()
    times, losses = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        losses.append(step())
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib() - base
    return {"patched": patch, "median_s": statistics.median(times), "times_s": times, "loss": losses[0],
            "peak_mib": peak, "peak_kind": "cuda max_memory_allocated" if device == "cuda" else
            "CPU RSS high-water mark above the level after one warm-up step (approximate, allocator-dependent)",
            "process_maxrss_mib": _rss_mib(),
            "rf_calls": dict(rf_trl.calls)}


def _trainer_worker(patch: bool) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import pathlib

    from test_integrations_trl import _tiny_grpo

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        losses = _tiny_grpo(pathlib.Path(d), patch=patch)
        return {"patched": patch, "wall_s": time.perf_counter() - t0, "losses": losses}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        kind, patch = a._worker.split(":")
        res = (_step_worker(patch == "1", a.device, a.vocab, a.batch, a.seq, a.reps) if kind == "step"
               else _trainer_worker(patch == "1"))
        print("RESULT " + json.dumps(res))
        return
    runs = {}
    for kind in ("step", "trainer"):
        for patch in ("0", "1"):
            cmd = [sys.executable, "-m", "benchmarks.trl_grpo_step", "--device", a.device, "--vocab", str(a.vocab),
                   "--batch", str(a.batch), "--seq", str(a.seq), "--reps", str(a.reps), "--_worker", f"{kind}:{patch}"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[f"{kind}_{'patched' if patch == '1' else 'unpatched'}"] = json.loads(
                [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:])
    import trl
    import transformers
    su, sp = runs["step_unpatched"], runs["step_patched"]
    result = {
        "label": f"{a.device.upper()} measurement" + (" (not a GPU number)" if a.device == "cpu" else ""),
        "device": a.device if a.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"batch": a.batch, "seq": a.seq, "vocab": a.vocab, "hidden": 256, "layers": 2},
        "step_time_ratio_patched_over_unpatched": sp["median_s"] / su["median_s"],
        "step_peak_ratio_patched_over_unpatched": sp["peak_mib"] / max(su["peak_mib"], 1e-9),
        "process_maxrss_mib": {"unpatched": su["process_maxrss_mib"], "patched": sp["process_maxrss_mib"]},
        "step_loss_abs_diff": abs(sp["loss"] - su["loss"]),
        "trainer_loss_max_abs_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(
            runs["trainer_patched"]["losses"], runs["trainer_unpatched"]["losses"])),
        "trainer_wall_ratio_patched_over_unpatched": runs["trainer_patched"]["wall_s"] / runs["trainer_unpatched"]["wall_s"],
        "runs": runs,
    }
    out_dir = a.out or os.path.join(os.path.dirname(__file__), "results", "cpu" if a.device == "cpu" else "gpu")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "trl_grpo_step.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
