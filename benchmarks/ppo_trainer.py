"""The PPO trainer on the rf ops vs the same trainer on the reference ops, same seed, side by side.

    python -m benchmarks.ppo_trainer [--device cpu|cuda] [--iterations N] [--out DIR]

Trains tiny pretrain / SFT / reward checkpoints (seconds), then runs rlhf_fast.train.ppo twice from
them: with the default backends and under ``rf.use_backend("reference")``. Records per run the
wall time per PPO iteration, the peak memory (``torch.cuda.max_memory_allocated`` on a GPU; the
resident-set high-water mark on a CPU, approximate) and every logged loss, and the largest
relative difference between the two loss curves. Writes ppo_trainer.json and ppo_trainer.md into
benchmarks/results/<device>/ (or --out). The models are tiny, so the loss-side ops are a small
share of a step: this checks the trainer end to end, the op benchmarks measure the ops.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import torch

import rlhf_fast as rf
from rlhf_fast.train import ppo
from rlhf_fast.train.config import PipelineConfig, PPOConfig, load_config
from rlhf_fast.train.pipeline import run as run_pipeline

from .harness import device_slug, environment

LOSSES = ("pg_loss", "vf_loss", "entropy", "ptx_loss", "kl", "mean_score")


def _checkpoints(out: str, device: str) -> str:
    cfg = load_config(PipelineConfig, overrides=[
        "pretrain.model.n_layer=2", "pretrain.model.d_model=64", "pretrain.model.n_head=2", "pretrain.steps=40",
        "pretrain.batch_size=16", "sft.steps=20", "reward.steps=20", f"device={device}"])
    run_pipeline(cfg, out, stages=("pretrain", "sft", "reward"))
    return out


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # high-water mark of the process


def _run(ckpts: str, out: str, device: str, iterations: int, backend: str | None) -> dict:
    over = [f"init={ckpts}/sft/model.safetensors", f"reward_model={ckpts}/reward/model.safetensors",
            f"iterations={iterations}", "rollout_size=32", "minibatch_size=16", "ppo_epochs=2",
            "ptx_batch_size=8", "max_new_tokens=8", f"device={device}", "save_every=1000"]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with rf.use_backend(backend):
        res = ppo.train(load_config(PPOConfig, overrides=over), out)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"backend": backend or "default", "seconds": seconds, "seconds_per_iteration": seconds / iterations,
            "peak_memory_bytes": _peak_bytes(device), "history": res["history"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", device_slug(args.device))
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = _checkpoints(os.path.join(tmp, "ckpts"), args.device)
        # the reference first: on a CPU the high-water mark only rises, so the order favours neither side
        runs = [_run(ckpts, os.path.join(tmp, b or "default"), args.device, args.iterations, b)
                for b in ("reference", None)]
    ref, fused = runs
    diffs = {k: max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for a, b in zip(fused["history"], ref["history"]))
             for k in LOSSES}
    result = {"meta": environment(args.device), "iterations": args.iterations, "runs": runs,
              "max_rel_diff": diffs,
              "speedup": ref["seconds_per_iteration"] / fused["seconds_per_iteration"],
              "memory_ratio": fused["peak_memory_bytes"] / max(ref["peak_memory_bytes"], 1)}
    with open(os.path.join(out, "ppo_trainer.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# PPO trainer: rf ops vs reference ops ({result['meta'].get('device_name', args.device)})", "",
             f"{args.iterations} PPO iterations of the tiny built-in model, same seed. "
             + ("Peak memory: CUDA allocator." if args.device == "cuda" else
                "Peak memory: process RSS high-water mark (approximate, includes the earlier run)."), "",
             "| backends | s / iteration | peak memory MiB |", "|---|---|---|"]
    lines += [f"| {r['backend']} | {r['seconds_per_iteration']:.3f} | {r['peak_memory_bytes'] / 2**20:.1f} |"
              for r in runs]
    lines += ["", f"speed-up {result['speedup']:.2f}x, memory ratio {result['memory_ratio']:.2f}", "",
              "largest relative difference between the loss curves: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())]
    with open(os.path.join(out, "ppo_trainer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
