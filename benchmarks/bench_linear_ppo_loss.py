"""linear_ppo_loss: the PPO loss (KL and entropy terms) from the last hidden states and the lm_head.

Compute-bound (the GEMMs), so records carry FLOPs: fwd 2·N·H·V for the logits, bwd 4·N·H·V for the
gradients (the chunked backends run all three GEMMs in the forward and only scale in the backward).

``python -m benchmarks.bench_linear_ppo_loss`` also runs the issue-13 comparison on the CPU: at
N=1024, H=512, V=151936 fp32, rf.linear_ppo_loss against rf.ppo_loss_from_logits on materialised
logits (torch GEMM, the compiled fused loss, autograd back through the GEMM), forward + backward:
median time over repetitions and the peak extra memory (rise of the process's resident-set
high-water mark over one call, less the gradients of hidden and weight, which both produce), and
writes benchmarks/results/cpu/linear_ppo_loss.json and linear_ppo_loss.png.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import rlhf_fast as rf
from benchmarks.harness import Bench, Memory, compile_peer, environment, quantiles


def make_inputs(s, dtype, device):
    N, H, V = s["N"], s["H"], s["V"]
    hidden = torch.randn(N, H, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_()
    old = -torch.rand(N, device=device) * 5
    return {"hidden": hidden, "weight": weight, "labels": torch.randint(0, V, (N,), device=device),
            "old_logp": old, "advantages": torch.randn(N, device=device), "mask": torch.rand(N, device=device) > 0.1,
            "ref_logp": old + 0.1 * torch.randn(N, device=device)}


def flops_model(s, dtype):
    f = 2 * s["N"] * s["H"] * s["V"]
    return {"fwd": f, "bwd": 2 * f, "full": 3 * f}


BENCHES = [Bench(
    op="linear_ppo_loss",
    sizes={"tiny": [dict(N=32, H=64, V=512)],
           "cpu": [dict(N=256, H=256, V=32000)],
           "gpu": [dict(N=16384, H=4096, V=151936), dict(N=4096, H=4096, V=151936)]},
    dtypes={"cpu": ["float32"], "cuda": ["bfloat16"]},
    make_inputs=make_inputs,
    # kl_coef=0.05 (k3), entropy_coef=0.01, clip 0.2/0.28, dual clip 3, token-mean
    args=lambda i: (i["hidden"], i["weight"], i["labels"], i["old_logp"], i["advantages"], i["mask"], None,
                    i["ref_logp"], 0.05, "k3", 0.01, 1.0, 0.2, 0.28, 3.0, "token-mean"),
    size=lambda s: s["N"] * s["V"], size_label="N·V (logits never materialised by chunked backends)",
    grad_inputs=("hidden", "weight"),
    outputs=lambda out: [out[0]],
    flops_model=flops_model,
    peers=lambda bench, device: [compile_peer(bench, device, enabled=False,
                                              why_not="a chunked autograd.Function with a host loop")],
)]

KW = dict(ref_logp=None, kl_coef=0.05, entropy_coef=0.01, clip_low=0.2, clip_high=0.28, dual_clip=3.0)


def _materialised(i, backend):
    logits = i["hidden"] @ i["weight"].T
    loss, _ = rf.ppo_loss_from_logits(logits, i["labels"], i["old_logp"], i["advantages"], i["mask"],
                                      **{**KW, "ref_logp": i["ref_logp"]}, backend=backend)
    loss.backward()
    return loss.detach()


def _linear(i, backend, chunk_size=None):
    loss, _ = rf.linear_ppo_loss(i["hidden"], i["weight"], i["labels"], i["old_logp"], i["advantages"], i["mask"],
                                 **{**KW, "ref_logp": i["ref_logp"]}, chunk_size=chunk_size, backend=backend)
    loss.backward()
    return loss.detach()


def compare(N=1024, H=512, V=151936, reps=3, backend="cpu", out_dir=None, plots=True):
    """The issue-13 bar on the CPU: memory and time of linear_ppo_loss vs materialised logits."""
    device = "cpu"
    torch.manual_seed(0)
    inp = make_inputs(dict(N=N, H=H, V=V), torch.float32, device)
    grads_bytes = (N * H + V * H) * 4
    memory = Memory(device)

    def clear():
        inp["hidden"].grad = inp["weight"].grad = None

    impls = {"linear_ppo_loss": lambda: _linear(inp, backend),
             "materialised_logits": lambda: _materialised(inp, backend)}
    runs = {}
    for name, fn in impls.items():
        clear()
        loss = fn()  # warm-up, and the values compared below
        g = (inp["hidden"].grad.clone(), inp["weight"].grad.clone())
        clear()
        peak, extra = memory.measure(fn)
        clear()
        runs[name] = {"loss": loss.item(), "mem_peak_bytes": peak, "mem_extra_bytes": extra,
                      "mem_extra_less_grads_bytes": None if extra is None else max(0, extra - grads_bytes),
                      "_grads": g, "_times": []}
    for _ in range(reps):  # interleaved, so a change in the machine's load hits both alike
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            runs[name]["_times"].append((time.perf_counter() - t0) * 1e3)
            clear()
    for run in runs.values():
        run["time_ms"] = quantiles(run.pop("_times"))
    lin, mat = runs["linear_ppo_loss"], runs["materialised_logits"]
    rel = {k: ((a - b).norm() / b.norm()).item() for k, a, b in zip(("hidden", "weight"), lin.pop("_grads"),
                                                                     mat.pop("_grads"))}
    from rlhf_fast.ops.linear_ppo_loss import default_chunk_rows

    result = {
        "meta": environment(device), "backend": backend, "shape": dict(N=N, H=H, V=V), "dtype": "float32",
        "chunk_rows": default_chunk_rows(N, V), "threads": torch.get_num_threads(),
        "memory_note": memory.note + "; less the gradients of hidden and weight (both produce them): "
                       f"{grads_bytes} bytes",
        "logits_plus_grad_bytes": 2 * N * V * 4, "runs": runs,
        "loss_rel_diff": abs(lin["loss"] - mat["loss"]) / abs(mat["loss"]), "grad_rel_diff": rel,
        "memory_ratio": (lin["mem_extra_less_grads_bytes"] / max(1, mat["mem_extra_less_grads_bytes"])
                         if lin["mem_extra_less_grads_bytes"] is not None else None),
        "time_ratio": lin["time_ms"]["p50"] / mat["time_ms"]["p50"],
        "bars": {"memory_ratio_max": 1 / 8, "time_ratio_max": 1.2},
    }
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results", "cpu")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear_ppo_loss.json"), "w") as f:
        json.dump(result, f, indent=1)
    if plots:
        _plot(result, os.path.join(out_dir, "linear_ppo_loss.png"))
    return result


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(names, [runs[n]["mem_extra_less_grads_bytes"] / 2**20 for n in names], color=["C0", "C1"])
    a.set_ylabel("peak extra memory, MiB (less param grads)")
    b.bar(names, [runs[n]["time_ms"]["p50"] / 1e3 for n in names], color=["C0", "C1"])
    b.set_ylabel("fwd + bwd, s (median)")
    s = result["shape"]
    fig.suptitle(f"{result['meta'].get('device_name', 'CPU')}, fp32, N={s['N']} H={s['H']} V={s['V']}: "
                 f"memory x{result['memory_ratio']:.3f}, time x{result['time_ratio']:.2f}", fontsize=9)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description="linear_ppo_loss vs ppo_loss_from_logits on materialised logits (CPU)")
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--H", type=int, default=512)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    r = compare(a.N, a.H, a.V, a.reps, out_dir=a.out, plots=not a.no_plots)
    for n, run in r["runs"].items():
        print(f"{n:22s} {run['time_ms']['p50'] / 1e3:7.2f} s   extra {run['mem_extra_less_grads_bytes'] / 2**20:8.1f} MiB")
    print(f"memory ratio {r['memory_ratio']:.4f} (bar <= 0.125), time ratio {r['time_ratio']:.3f} (bar <= 1.2); "
          f"loss rel diff {r['loss_rel_diff']:.1e}, grads {r['grad_rel_diff']}")
    return r


if __name__ == "__main__":
    main()
