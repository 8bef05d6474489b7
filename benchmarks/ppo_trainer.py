"""The PPO trainer on the rf ops vs the same trainer on the reference ops, and its two policy-loss
paths (loss_impl=logits | linear), same seed, side by side.

    python -m benchmarks.ppo_trainer [--device cpu|cuda] [--iterations N] [--out DIR]

Trains tiny pretrain / SFT / reward checkpoints (seconds), then runs rlhf_fast.train.ppo from them:
under ``rf.use_backend("reference")`` and with the default backends, with loss_impl=logits and
loss_impl=linear; then the two loss paths again on a model whose lm head has a 32768-token
vocabulary (the character tokenizer uses 98 of them), where the logits weigh. Each run is its own
process, so its peak memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU, the process's
resident-set high-water mark on a CPU (approximate; it includes the ~few hundred MiB of the
interpreter and torch). Records per run the wall time per PPO iteration, the peak memory and every
logged loss, and the largest relative differences between loss curves. Writes ppo_trainer.json and
ppo_trainer.md into benchmarks/results/<device>/ (or --out). The models are tiny, so the loss-side
ops are a small share of a step: this checks the trainer end to end, the op benchmarks measure the ops.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
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


def _checkpoints(out: str, device: str, vocab_size: int = 98) -> str:
    cfg = load_config(PipelineConfig, overrides=[
        "pretrain.model.n_layer=2", "pretrain.model.d_model=64", "pretrain.model.n_head=2", "pretrain.steps=40",
        "pretrain.batch_size=16", "sft.steps=20", "reward.steps=20", f"device={device}",
        f"pretrain.model.vocab_size={vocab_size}"])
    run_pipeline(cfg, out, stages=("pretrain", "sft", "reward"))
    return out


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:  # this process's own high-water mark (ru_maxrss keeps the parent's across fork + exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run(ckpts: str, out: str, device: str, iterations: int, backend: str | None, loss_impl: str = "logits",
         label: str = "") -> dict:
    over = [f"init={ckpts}/sft/model.safetensors", f"reward_model={ckpts}/reward/model.safetensors",
            f"iterations={iterations}", "rollout_size=32", "minibatch_size=16", "ppo_epochs=2",
            "ptx_batch_size=8", "max_new_tokens=8", f"device={device}", "save_every=1000", f"loss_impl={loss_impl}"]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with rf.use_backend(backend):
        res = ppo.train(load_config(PPOConfig, overrides=over), out)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"backend": backend or "default", "loss_impl": loss_impl, "label": label, "seconds": seconds,
            "seconds_per_iteration": seconds / iterations, "peak_memory_bytes": _peak_bytes(device),
            "history": res["history"]}


def _run_in_process(*args) -> dict:
    """_run in a fresh process: its peak memory is its own (a CPU high-water mark only rises)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run, args)


def _max_rel_diff(a: dict, b: dict) -> dict:
    return {k: max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-6) for x, y in zip(a["history"], b["history"]))
            for k in LOSSES}


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
        big = _checkpoints(os.path.join(tmp, "ckpts_v32k"), args.device, vocab_size=32768)
        plan = [(ckpts, "reference", "logits", "V=98"), (ckpts, None, "logits", "V=98"), (ckpts, None, "linear", "V=98"),
                (big, None, "logits", "V=32768"), (big, None, "linear", "V=32768")]
        runs = [_run_in_process(c, os.path.join(tmp, f"run{n}"), args.device, args.iterations, b, impl, label)
                for n, (c, b, impl, label) in enumerate(plan)]
    ref, fused, linear, big_logits, big_linear = runs
    sec = lambda r: r["seconds_per_iteration"]  # noqa: E731
    mem = lambda r: r["peak_memory_bytes"]  # noqa: E731
    result = {"meta": environment(args.device), "iterations": args.iterations, "runs": runs,
              "max_rel_diff": _max_rel_diff(fused, ref),
              "speedup": sec(ref) / sec(fused), "memory_ratio": mem(fused) / max(mem(ref), 1),
              "linear_vs_logits": {
                  label: {"max_rel_diff": _max_rel_diff(b, a), "time_ratio": sec(b) / sec(a),
                          "memory_ratio": mem(b) / max(mem(a), 1)}
                  for label, a, b in (("V=98", fused, linear), ("V=32768", big_logits, big_linear))}}
    with open(os.path.join(out, "ppo_trainer.json"), "w") as f:
        json.dump(result, f, indent=1)
    cpu = args.device != "cuda"
    lines = [f"# PPO trainer: rf ops vs reference ops, loss_impl logits vs linear "
             f"({result['meta'].get('device_name', args.device)})", "",
             f"{args.iterations} PPO iterations of the tiny built-in model, same seed, each run in its own process. "
             + ("Peak memory: CUDA allocator." if not cpu else
                "CPU. Peak memory: the run's process RSS high-water mark (approximate, includes torch itself)."), "",
             "| model | backends | loss_impl | s / iteration | peak memory MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['backend']} | {r['loss_impl']} | {sec(r):.3f} | {mem(r) / 2**20:.1f} |"
              for r in runs]
    lines += ["", f"rf vs reference (logits): speed-up {result['speedup']:.2f}x, memory ratio {result['memory_ratio']:.2f}; "
              "largest relative difference between the loss curves: "
              + ", ".join(f"{k} {v:.1e}" for k, v in result["max_rel_diff"].items())]
    for label, c in result["linear_vs_logits"].items():
        lines += ["", f"linear vs logits ({label}): time x{c['time_ratio']:.2f}, peak memory x{c['memory_ratio']:.2f}; "
                  "largest relative difference between the loss curves: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in c["max_rel_diff"].items())]
    lines += ["", "Loss curves (pg_loss per iteration):", ""]
    lines += [f"- {r['label']} {r['backend']} {r['loss_impl']}: " + ", ".join(f"{h['pg_loss']:.5f}" for h in r["history"])
              for r in runs]
    with open(os.path.join(out, "ppo_trainer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
