"""Per-rank memory of the PPO stage's four models against the number of processes, DDP vs FSDP2, and the cost
of sampling with sharded parameters.

    python -m benchmarks.distributed_memory                       # CPU (gloo), worlds 1, 2, 4
    python -m benchmarks.distributed_memory --device cuda --worlds 1,2,4,8   # one node's GPUs (nccl)

Each configuration runs under ``torchrun --nproc_per_node=W``: a policy and a critic (trained, AdamW) and a
reference and a reward model (frozen) of the same shape, wrapped by rlhf_fast.train.runtime.wrap exactly as
the ppo stage does; a few steps (policy LM loss, critic value loss, frozen forwards), then greedy generation
with the parameters gathered once (runtime.unsharded, what the stage does) and, under fsdp, re-gathered at
every forward (the alternative; EOS never ends a row, so all ranks run the same number of steps).
Per rank: the bytes of parameters + gradients + optimizer state it holds (local shards) and, per phase, the
peak resident set (VmHWM, reset between phases through /proc/self/clear_refs after malloc_trim gave freed heap
back) above the process after imports; on CUDA also torch.cuda.max_memory_allocated. The models are built
whole on every rank before sharding (as the stages do), so the build phase peaks at one full copy. The workers
run with MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every large tensor on its own and unmaps it when freed, so
the resident set follows the live tensors instead of the allocator's high-water mark.
Writes distributed_memory.json and .md into --out (default benchmarks/results/<cpu|cuda>). Measures;
asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _new_phase():
    """Give freed heap back to the OS and restart the peak-RSS count (Linux; best effort elsewhere)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _mb(kb_or_bytes: float, kb: bool = True) -> float:
    return kb_or_bytes / 1024 if kb else kb_or_bytes / 2**20


def worker(args):
    import torch

    from rlhf_fast.train.config import ModelConfig
    from rlhf_fast.train.model import Transformer, generate
    from rlhf_fast.train.runtime import setup, unsharded, wrap

    torch.set_num_threads(1)
    d = setup(args.device)
    rec = {"rank": d.rank, "world": d.world, "rss_import_mb": _mb(_status_kb("VmRSS"))}
    cfg = ModelConfig(n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head, block_size=args.block_size)
    torch.manual_seed(0)
    policy, critic = Transformer(cfg, "lm").to(d.device), Transformer(cfg, "value").to(d.device)
    ref, rm = Transformer(cfg, "lm").to(d.device), Transformer(cfg, "value").to(d.device)
    for m in (ref, rm):
        m.requires_grad_(False).eval()
    net_policy, net_critic = wrap(d, [policy, critic], frozen=[ref, rm], parallel=args.parallel,
                                  mixed_precision="fp32")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (policy, critic)]
    rec["peak_build_mb"] = _mb(_status_kb("VmHWM")) - rec["rss_import_mb"]
    _new_phase()
    rec["after_wrap_mb"] = _mb(_status_kb("VmRSS")) - rec["rss_import_mb"]
    x = torch.randint(3, 90, (args.batch, cfg.block_size), device=d.device,
                      generator=torch.Generator(device=d.device).manual_seed(d.rank))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        with torch.no_grad():
            ref(x)
            rm(x)
        for net, opt in ((net_policy, opts[0]), (net_critic, opts[1])):
            out = net(x)
            loss = out.logsumexp(-1).mean() if out.dim() == 3 else out.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    rec["step_s"] = (time.perf_counter() - t0) / args.steps

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    trained = [p for m in (policy, critic) for p in m.parameters()]
    rec["params_mb"] = _mb(sum(local_bytes(p) for m in (policy, critic, ref, rm) for p in m.parameters()), kb=False)
    rec["grads_mb"] = _mb(sum(local_bytes(p.grad) for p in trained if p.grad is not None), kb=False)
    rec["optim_mb"] = _mb(sum(local_bytes(v) for o in opts for st in o.state.values() for k, v in st.items()
                              if torch.is_tensor(v) and k != "step"), kb=False)
    rec["state_mb"] = rec["params_mb"] + rec["grads_mb"] + rec["optim_mb"]
    rec["peak_train_mb"] = _mb(_status_kb("VmHWM")) - rec["rss_import_mb"]
    if d.device.type == "cuda":
        rec["cuda_peak_train_mb"] = _mb(torch.cuda.max_memory_allocated(d.device), kb=False)
        torch.cuda.reset_peak_memory_stats(d.device)

    prompt = x[: args.gen_batch, :8]
    pmask = torch.ones_like(prompt)
    policy.eval()

    def sample():
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        t = time.perf_counter()
        generate(policy, prompt, pmask, args.new_tokens, eos_id=-1, pad_id=0, temperature=0.0)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        return time.perf_counter() - t
    _new_phase()
    with unsharded(policy):
        rec["generate_gathered_once_s"] = min(sample() for _ in range(args.reps))
    rec["peak_gen_gathered_mb"] = _mb(_status_kb("VmHWM")) - rec["rss_import_mb"]
    if d.device.type == "cuda":
        rec["cuda_peak_gen_mb"] = _mb(torch.cuda.max_memory_allocated(d.device), kb=False)
    if d.parallel == "fsdp":  # the alternative: every forward all-gathers each block again
        _new_phase()
        rec["generate_gather_per_forward_s"] = min(sample() for _ in range(args.reps))
        rec["peak_gen_per_forward_mb"] = _mb(_status_kb("VmHWM")) - rec["rss_import_mb"]
    with open(os.path.join(args.worker_out, f"rank{d.rank}.json"), "w") as f:
        json.dump(rec, f)


def run(args) -> dict:
    import torch
    results = []
    for world in [int(w) for w in args.worlds.split(",")]:
        for parallel in (["none"] if world == 1 else ["ddp", "fsdp"]):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                       "-m", "benchmarks.distributed_memory", "--worker", "--worker-out", tmp,
                       "--parallel", "ddp" if parallel == "none" else parallel,
                       *sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in
                             ("device", "d_model", "n_layer", "n_head", "block_size", "batch", "steps", "gen_batch",
                              "new_tokens", "reps")), [])]
                env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ, "OMP_NUM_THREADS": "1"}
                print(f"[distributed_memory] world={world} parallel={parallel}", flush=True)
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                if p.returncode != 0:
                    results.append({"world": world, "parallel": parallel, "error": (p.stdout + p.stderr)[-2000:]})
                    print(results[-1]["error"], file=sys.stderr)
                    continue
                ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
            row = {"world": world, "parallel": parallel}
            for k in ranks[0]:
                if k not in ("rank", "world"):
                    row[k] = max(r[k] for r in ranks)  # the worst rank
            results.append(row)
    n_params = 4 * sum(p.numel() for p in _model(args).parameters())
    meta = {"device": args.device, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu_count": os.cpu_count(), "models": "policy + critic (AdamW) + reference + reward model",
            "params_total": n_params, **{k: getattr(args, k) for k in ("d_model", "n_layer", "n_head", "block_size",
                                                                       "batch", "steps", "gen_batch", "new_tokens")}}
    return {"meta": meta, "results": results}


def _model(args):
    from rlhf_fast.train.config import ModelConfig
    from rlhf_fast.train.model import Transformer
    return Transformer(ModelConfig(n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                                   block_size=args.block_size), "lm")


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Per-rank memory vs world size ({m['device'].upper()}, torch {m['torch']}, {m['date']})", "",
             f"{m['models']}: d_model={m['d_model']}, n_layer={m['n_layer']}, {m['params_total'] / 1e6:.1f} M "
             f"parameters in all; {m['steps']} steps of batch {m['batch']} x {m['block_size']}; generation of "
             f"{m['new_tokens']} tokens for {m['gen_batch']} prompts. Worst rank shown.", "",
             "Peaks are resident-set rises over the process after imports "
             f"({res['results'][0].get('rss_import_mb', 0):.0f} MB), per phase.", "",
             "| world | parallel | params+grads+optim per rank (MB) | peak build (MB) | resident after wrap (MB) "
             "| peak train (MB) | s/step | generate gathered once: s, peak MB "
             "| generate gather per forward: s, peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        if "error" in r:
            lines.append(f"| {r['world']} | {r['parallel']} | failed | | | | | | |")
            continue
        per_fwd = (f"{r['generate_gather_per_forward_s']:.3f}, {r['peak_gen_per_forward_mb']:.0f}"
                   if "generate_gather_per_forward_s" in r else "-")
        lines.append(f"| {r['world']} | {r['parallel']} | {r['state_mb']:.1f} | {r['peak_build_mb']:.0f} | "
                     f"{r['after_wrap_mb']:.0f} | "
                     f"{r['peak_train_mb']:.0f} | {r['step_s']:.3f} | {r['generate_gathered_once_s']:.3f}, "
                     f"{r['peak_gen_gathered_mb']:.0f} | {per_fwd} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="fsdp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    res = run(args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.device.split(":")[0])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "distributed_memory.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(out, "distributed_memory.md"), "w") as f:
        f.write(md)
    print(md)
    return 1 if any("error" in r for r in res["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
