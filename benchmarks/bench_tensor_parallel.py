"""Tensor parallelism over the vocabulary: rf.logprobs(process_group=) against gathering the logits.

``python -m benchmarks.bench_tensor_parallel`` spawns --tp processes (gloo on CPU tensors; nccl with
--device cuda, one GPU per rank), each holding the columns [r·V/tp, (r+1)·V/tp) of [N, V] logits, and times
forward + backward (median and 20/80 % quantiles of --reps, after warm-up; rf.checks(False), as in training)
of, on every rank:
  rf.tp        rf.logprobs(shard, labels, return_entropy=True, process_group=group): one all-gather of the
               [N, 4] row partials in the forward, nothing in the backward
  gather       all-gather the [N, V/tp] shards into the full [N, V], rf.logprobs on it, keep this rank's
               slice of the gradient (what a caller without TP support does)
  megatron     Megatron-core's vocab_parallel_cross_entropy (-logp only, no entropy), if installed
Bytes communicated per call and rank, counted by a TorchDispatchMode over the c10d ops: ``bytes_in`` the
inputs of this rank's collectives, ``bytes_wire`` what a ring moves per rank for them (an all-gather
(tp - 1)·input, an all-reduce 2·(tp - 1)/tp·input). Writes tensor_parallel.json into
benchmarks/results/<device>/ (or --out) with the harness's metadata. Benchmarks measure; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

BENCHES = []  # not a harness bench: it needs several processes (see main)


def _count_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional") and not any(
                    w in func.__name__ for w in ("wait", "wrap")):
                ts = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
                      if isinstance(t, torch.Tensor)]
                # this rank's contribution: the input (c10d._allgather_base_ takes (output, input))
                t = ts[1] if func.__name__.startswith("_allgather_base_") else ts[0]
                self.calls.append((func.__name__.split(".")[0], t.numel() * t.element_size()))
            return func(*args, **(kwargs or {}))

    return Count()


def _worker(rank, args, port, out_q):
    import torch.distributed as dist

    import rlhf_fast as rf

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=args.tp)
    torch.set_num_threads(max(1, args.threads))
    group = dist.group.WORLD
    N, V, tp = args.N, args.V, args.tp
    Vl = V // tp
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(N, V, generator=g) * 2).to(dtype).to(device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    shard = full[:, rank * Vl:(rank + 1) * Vl].contiguous()

    def rf_tp(x):
        lp, ent = rf.logprobs(x, labels, return_entropy=True, process_group=group)
        return lp.sum() + 0.1 * ent.sum()

    def gather(x):
        parts = torch.empty(tp * N, Vl, dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(parts, x.detach().contiguous(), group=group)
        xf = parts.view(tp, N, Vl).permute(1, 0, 2).reshape(N, V)  # copy: the [N, V] logits
        xf = torch.cat([xf[:, :rank * Vl], x, xf[:, (rank + 1) * Vl:]], 1)  # this rank's slice keeps its grad
        lp, ent = rf.logprobs(xf, labels, return_entropy=True)
        return lp.sum() + 0.1 * ent.sum()

    fns = {"rf.tp": rf_tp, "gather": gather}
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        fns["megatron"] = lambda x: vocab_parallel_cross_entropy(x.clone()[None], labels[None]).sum()
    except Exception as e:  # not installed, or no CPU path in this version
        if rank == 0:
            print(f"megatron-core skipped: {type(e).__name__}: {e}", flush=True)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dist.barrier()

    res = {}
    with rf.checks(False):
        for name, fn in fns.items():
            x = shard.clone().requires_grad_()
            for _ in range(args.warmup):
                fn(x).backward()
            with _count_mode() as cm:
                fn(x).backward()
            times = []
            for _ in range(args.reps):
                x.grad = None
                sync()
                t0 = time.perf_counter()
                fn(x).backward()
                sync()
                times.append(time.perf_counter() - t0)
            times.sort()
            q = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1e3  # noqa: E731
            res[name] = {"ms_median": q(0.5), "ms_p20": q(0.2), "ms_p80": q(0.8),
                         "bytes_in": sum(b for _, b in cm.calls),
                         "bytes_wire": int(sum(b * (tp - 1) if "gather" in c else b * 2 * (tp - 1) / tp
                                               for c, b in cm.calls)),
                         "collectives": [c for c, _ in cm.calls]}
    if rank == 0:
        out_q.put(res)
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--N", type=int, default=None)
    ap.add_argument("--V", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.N = args.N or (8192 if cuda else 256)
    args.V = args.V or (151936 if cuda else 32000)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.reps = args.reps or (20 if cuda else 10)

    import socket

    import torch.multiprocessing as mp

    from benchmarks.harness import REPO, device_slug, environment

    records = []
    for tp in args.tp:
        if cuda and torch.cuda.device_count() < tp:
            print(f"tp={tp}: needs {tp} GPUs, skipped")
            continue
        a = argparse.Namespace(**{**vars(args), "tp": tp})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        q = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(a, port, q), nprocs=tp, join=True, start_method="spawn")
        res = q.get()
        for name, r in res.items():
            rec = {"tp": tp, "N": args.N, "V": args.V, "dtype": args.dtype, "impl": name, **r}
            records.append(rec)
            print(f"tp={tp} N={args.N} V={args.V} {args.dtype} {name:9s} {r['ms_median']:8.2f} ms "
                  f"(p20 {r['ms_p20']:.2f}, p80 {r['ms_p80']:.2f})  {r['bytes_in']:>11,d} B in, "
                  f"{r['bytes_wire']:>11,d} B on the wire /call/rank  "
                  f"{r['collectives']}", flush=True)
    for tp in args.tp:
        by = {r["impl"]: r for r in records if r["tp"] == tp}
        if "rf.tp" in by and "gather" in by:
            by["rf.tp"]["vs_gather"] = {"time": by["rf.tp"]["ms_median"] / by["gather"]["ms_median"],
                                        "bytes_wire": by["rf.tp"]["bytes_wire"] / by["gather"]["bytes_wire"]}
    env = environment("cuda" if cuda else "cpu")
    env["threads_per_rank"] = args.threads
    out_dir = args.out or os.path.join(REPO, "benchmarks", "results", device_slug("cuda" if cuda else "cpu"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tensor_parallel.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "args": vars(args), "records": records}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
