"""linear_ppo_loss: the PPO loss (KL and entropy terms) from the last hidden states and the lm_head.

Compute-bound (the GEMMs), so records carry FLOPs: fwd 2·N·H·V for the logits, bwd 4·N·H·V for the
gradients (useful FLOPs: the chunked backends run the logits and grad_hidden GEMMs in the forward and
recompute the logits per vocabulary slice for grad_weight in the backward, 8·N·H·V in all).

``--grad-weight-designs``: where grad_weight is summed (``grad_weight_designs``), CPU, written to
benchmarks/results/cpu/linear_ppo_loss_grad_weight.json.

``python -m benchmarks.bench_linear_ppo_loss`` also runs the issue-13 comparison, forward + backward:
rf.linear_ppo_loss against rf.ppo_loss_from_logits on materialised logits (torch GEMM, the fused
loss, autograd back through the GEMM): median time and the peak extra memory of one call, less the
gradients of hidden and weight (both produce them). Writes linear_ppo_loss.json and .png into
benchmarks/results/<device>/ (harness.device_slug; or --out), with the harness's metadata (device
name, date, commit, versions).

  CPU (default): N=1024, H=512, V=151936 fp32, repetitions interleaved with ``time.perf_counter``;
      memory is the rise of the process's resident-set high-water mark over one call (approximate).
      Bars: memory ≤ 1/8 of the materialised path's, time ≤ 1.2×.
  CUDA (``--device cuda``): N=16384, H=4096, V=151936 bf16 (--N/--H/--V/--dtype override), CUDA
      events (warm-up calls, then the median of --reps, L2 flushed before each), memory from
      ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` above what was allocated
      before the call. Also times the three cuBLAS GEMMs of the same shapes as a baseline (logits =
      hidden @ W.T [N, V]; grad_hidden = G @ W [N, H]; grad_W = G.T @ hidden [V, H], with a random
      [N, V] G), and a few chunk sizes (--chunk-sizes). Bars: throughput ≥ 0.9× the three GEMMs'
      (both do 6·N·H·V FLOPs, so the ratio is t_gemms / t_linear), extra memory ≤ 2 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import rlhf_fast as rf
from benchmarks.harness import (DTYPE_NAMES, DTYPES, Bench, Memory, Timer, compile_peer, device_slug, environment,
                                quantiles)
from rlhf_fast import _backend


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


def gemm_baseline(hidden, weight, grad_logits):
    """The three GEMMs a fused linear loss cannot avoid, in the inputs' dtype (cuBLAS on a GPU):
    logits = hidden @ W.T [N, V], grad_hidden = G @ W [N, H], grad_W = G.T @ hidden [V, H]."""
    logits = hidden @ weight.T
    grad_hidden = grad_logits @ weight
    grad_weight = grad_logits.T @ hidden
    return logits, grad_hidden, grad_weight


def _backend_name(op, device, backend):
    """The backend that runs ``op`` on ``device``: ``backend`` itself, or the automatic choice."""
    if backend is not None:
        return backend
    fn = _backend.select(op, torch.device(device))
    return next(name for name, impl in _backend._registry[op].items() if impl is fn)


def _cuda_run(fn, clear, memory, timer, warmup):
    """Warm-up calls, the peak memory of one call, then the times of timer's repetitions (ms)."""
    for _ in range(warmup):
        clear()
        fn()
    clear()
    peak, extra = memory.measure(fn)
    clear()
    times = timer(lambda _: fn(), before=clear)
    clear()
    return peak, extra, times


def compare(N=1024, H=512, V=151936, reps=3, backend="cpu", out_dir=None, plots=True, device="cpu",
            dtype=torch.float32, chunk_sizes=(None,), gemm=None, warmup=2):
    """The issue-13 bars: memory and time of linear_ppo_loss vs materialised logits (and, on a GPU or
    with ``gemm=True``, vs the three GEMMs of the same shapes). ``chunk_sizes``: rows per chunk of each
    linear_ppo_loss run (None: the default); the first is the one the bars are read from."""
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_linear_ppo_loss: --device cuda, but torch sees no CUDA device")
    gemm = cuda if gemm is None else gemm
    backend = _backend_name("linear_ppo_loss", device, backend)
    mat_backend = backend if backend in rf.backends_for("ppo_loss_from_logits", device) else None
    torch.manual_seed(0)
    inp = make_inputs(dict(N=N, H=H, V=V), dtype, device)
    grads_bytes = (N * H + V * H) * inp["hidden"].element_size()
    memory = Memory(device)
    timer = Timer(device, budget_s=0.0, min_reps=reps, max_reps=reps) if cuda else None

    def clear():
        inp["hidden"].grad = inp["weight"].grad = None

    impls = {}
    for c in chunk_sizes:
        name = "linear_ppo_loss" if not impls else f"linear_ppo_loss_chunk{c or 'default'}"
        impls[name] = (lambda c=c: _linear(inp, backend, c))
    impls["materialised_logits"] = lambda: _materialised(inp, mat_backend)
    runs = {}
    for name, fn in impls.items():
        clear()
        loss = fn()  # warm-up, and the values compared below (those of the headline run and the materialised one)
        g = (inp["hidden"].grad.clone(), inp["weight"].grad.clone()) if not runs or name == "materialised_logits" \
            else None
        clear()
        if cuda:
            peak, extra, times = _cuda_run(fn, clear, memory, timer, warmup - 1)
        else:
            peak, extra = memory.measure(fn)
            times = []
        clear()
        runs[name] = {"loss": loss.item(), "mem_peak_bytes": peak, "mem_extra_bytes": extra,
                      "mem_extra_less_grads_bytes": None if extra is None else max(0, extra - grads_bytes),
                      "_grads": g, "_times": times}
        del g
    for _ in range(0 if cuda else reps):  # interleaved, so a change in the machine's load hits both alike
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            runs[name]["_times"].append((time.perf_counter() - t0) * 1e3)
            clear()
    flops = 6 * N * H * V  # the three GEMMs, for every implementation here
    for run in runs.values():
        run["time_ms"] = quantiles(run.pop("_times"))
        run["tflops"] = flops / (run["time_ms"]["p50"] * 1e-3) / 1e12
    lin, mat = runs["linear_ppo_loss"], runs["materialised_logits"]
    mat_grads = mat.pop("_grads")
    rel = {k: ((a.double() - b.double()).norm() / b.double().norm()).item()
           for k, a, b in zip(("hidden", "weight"), lin["_grads"], mat_grads)}
    for run in runs.values():
        run.pop("_grads", None)
    from rlhf_fast.ops.linear_ppo_loss import default_chunk_rows

    result = {
        "meta": environment(device), "backend": backend, "shape": dict(N=N, H=H, V=V),
        "dtype": DTYPE_NAMES[dtype], "chunk_rows": default_chunk_rows(N, V), "threads": torch.get_num_threads(),
        "memory_note": memory.note if memory.note else
        "CUDA: torch.cuda.max_memory_allocated during one call, above the memory allocated before it",
        "logits_plus_grad_bytes": 2 * N * V * 4, "runs": runs,
        "loss_rel_diff": abs(lin["loss"] - mat["loss"]) / abs(mat["loss"]), "grad_rel_diff": rel,
        "memory_ratio": (lin["mem_extra_less_grads_bytes"] / max(1, mat["mem_extra_less_grads_bytes"])
                         if lin["mem_extra_less_grads_bytes"] is not None else None),
        "time_ratio": lin["time_ms"]["p50"] / mat["time_ms"]["p50"],
        "bars": {"memory_ratio_max": 1 / 8, "time_ratio_max": 1.2},
    }
    result["memory_note"] += ("; less the gradients of hidden and weight (both produce them): "
                              f"{grads_bytes} bytes")
    if cuda:
        result["timing_note"] = (f"CUDA events, {warmup} warm-up call(s), then the median of {reps} "
                                 "repetitions with the L2 flushed before each")
    if gemm:
        del impls, mat_grads
        result["gemm_baseline"] = _gemm_run(inp, memory, timer, reps, warmup, flops)
        clear()
        base = result["gemm_baseline"]
        base["mem_extra_less_grads_bytes"] = (None if base["mem_extra_bytes"] is None
                                              else max(0, base["mem_extra_bytes"] - grads_bytes))
        result["throughput_ratio_vs_3gemm"] = base["time_ms"]["p50"] / lin["time_ms"]["p50"]
        result["extra_memory_bytes"] = lin["mem_extra_less_grads_bytes"]
        result["bars"].update(throughput_ratio_vs_3gemm_min=0.9, extra_memory_bytes_max=2 * 10**9)
        result["bars_met"] = {
            "throughput_ratio_vs_3gemm": result["throughput_ratio_vs_3gemm"] >= 0.9,
            "extra_memory_bytes": None if lin["mem_extra_less_grads_bytes"] is None
            else lin["mem_extra_less_grads_bytes"] <= 2 * 10**9}
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results", device_slug(device))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear_ppo_loss.json"), "w") as f:
        json.dump(result, f, indent=1)
    if plots:
        _plot(result, os.path.join(out_dir, "linear_ppo_loss.png"))
    return result


def _gemm_run(inp, memory, timer, reps, warmup, flops):
    """The 3-GEMM baseline on the inputs' hidden and weight (no grad), with a random [N, V] G."""
    h, w = inp["hidden"].detach(), inp["weight"].detach()
    g = torch.randn(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)

    def fn():
        return gemm_baseline(h, w, g)

    if timer is not None:
        peak, extra, times = _cuda_run(fn, lambda: None, memory, timer, warmup)
    else:
        fn()
        peak, extra = memory.measure(fn)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    t = quantiles(times)
    return {"what": "hidden @ W.T [N, V]; G @ W [N, H]; G.T @ hidden [V, H] (torch.matmul: cuBLAS on a GPU), "
                    "in the inputs' dtype, G random [N, V] allocated before the call",
            "mem_peak_bytes": peak, "mem_extra_bytes": extra, "time_ms": t,
            "tflops": flops / (t["p50"] * 1e-3) / 1e12}


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = dict(result["runs"], **({"three_gemms": result["gemm_baseline"]} if "gemm_baseline" in result else {}))
    names = list(runs)
    colors = [f"C{i}" for i in range(len(names))]
    fig, (a, b) = plt.subplots(1, 2, figsize=(4.5 + 1.5 * len(names), 3.5))
    a.bar(names, [(runs[n]["mem_extra_less_grads_bytes"] or 0) / 2**20 for n in names], color=colors)
    a.set_ylabel("peak extra memory, MiB (less param grads)")
    ms = max(r["time_ms"]["p50"] for r in runs.values()) < 1e3
    b.bar(names, [runs[n]["time_ms"]["p50"] / (1 if ms else 1e3) for n in names], color=colors)
    b.set_ylabel(f"fwd + bwd, {'ms' if ms else 's'} (median)")
    s = result["shape"]
    mem = "n/a" if result["memory_ratio"] is None else f"{result['memory_ratio']:.3f}"
    title = (f"{result['meta'].get('device_name', 'CPU')}, {result['dtype']}, N={s['N']} H={s['H']} V={s['V']}: "
             f"vs materialised memory x{mem}, time x{result['time_ratio']:.2f}")
    if "throughput_ratio_vs_3gemm" in result:
        title += f"; throughput x{result['throughput_ratio_vs_3gemm']:.2f} of 3 GEMMs"
    fig.suptitle(title, fontsize=8)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7, labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_loss_types(B=8, T=128, H=512, V=32000, reps=3, backend="cpu", device="cpu", dtype=torch.float32,
                       chunk_size=None, out_dir=None):
    """The cost of loss_type (and weights) in linear_ppo_loss, as ratios to loss_type="ppo" in the same run:
    forward + backward, repetitions interleaved; agg seq-mean-token-mean (sequences = the B rows of T).
    "ppo" runs the fused pass; "ppo+weights" and "cispo" the general pass (row pass, reference per-token
    math under autograd, row backward); "gspo" the general pass after a logp-only pass over every chunk
    (one more GEMM and row pass per chunk). Writes linear_ppo_loss_loss_types.json."""
    torch.manual_seed(0)
    i = make_inputs(dict(N=B * T, H=H, V=V), dtype, device)
    i = {k: (v.reshape(B, T, *v.shape[1:]).detach().requires_grad_(v.requires_grad) if k != "weight" else v)
         for k, v in i.items()}
    weights = torch.rand(B, T, device=device)
    memory = Memory(device)
    kw = {**KW, "ref_logp": i["ref_logp"], "agg": "seq-mean-token-mean", "chunk_size": chunk_size,
          "backend": backend}
    cases = {"ppo": dict(loss_type="ppo"), "ppo+weights": dict(loss_type="ppo", weights=weights),
             "gspo": dict(loss_type="gspo", dual_clip=None), "cispo": dict(loss_type="cispo", dual_clip=None)}

    def run(case):
        loss, _ = rf.linear_ppo_loss(i["hidden"], i["weight"], i["labels"], i["old_logp"], i["advantages"], i["mask"],
                                     **{**kw, **cases[case]})
        loss.backward()
        i["hidden"].grad = i["weight"].grad = None

    runs = {}
    for case in cases:
        run(case)  # warm-up
        peak, extra = memory.measure(lambda: run(case))
        runs[case] = {"mem_extra_bytes": extra, "_times": []}
    for _ in range(reps):  # interleaved: a change in the machine's load hits every case alike
        for case in cases:
            t0 = time.perf_counter()
            run(case)
            runs[case]["_times"].append((time.perf_counter() - t0) * 1e3)
    for r in runs.values():
        r["time_ms"] = quantiles(r.pop("_times"))
    base = runs["ppo"]["time_ms"]["p50"]
    from rlhf_fast.ops.linear_ppo_loss import default_chunk_rows

    result = {"meta": environment(device), "backend": backend, "shape": dict(B=B, T=T, N=B * T, H=H, V=V),
              "dtype": DTYPE_NAMES[dtype], "agg": "seq-mean-token-mean", "threads": torch.get_num_threads(),
              "chunk_rows": chunk_size or default_chunk_rows(B * T, V), "memory_note": memory.note, "runs": runs,
              "time_ratio_vs_ppo": {c: r["time_ms"]["p50"] / base for c, r in runs.items()}}
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results", device_slug(device))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear_ppo_loss_loss_types.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# ----------------------------------------------------------------------------- where grad_weight is summed
def _accumulate_in_forward(inp, backend, chunk_size, acc_dtype):
    """grad_weight summed over the row chunks in the forward (the op's GRAD_WEIGHT_IN_BACKWARD = False design,
    written out here for the precision study only): per row chunk the logits GEMM, the fused pass,
    grad_hidden = g @ W and grad_weight += g.T @ h into a [V, H] accumulator of ``acc_dtype`` (fp32; or the
    weight's dtype: rounded at every chunk, as a half-precision addmm with beta = 1 rounds).
    Returns (grad_hidden, grad_weight)."""
    from rlhf_fast.ops import linear_ppo_loss as lpl
    from rlhf_fast.ops.linear_logprobs import _chunk_logits, _mm

    fused = {"cpu": lpl._cpu_pass, "triton": lpl._triton_pass}[backend]
    h, w = inp["hidden"].detach(), inp["weight"].detach()
    N, V = h.shape[0], w.shape[0]
    acc = torch.float32
    cfg = lpl._Config(1.0, 0.2, 0.28, 3.0, 0.05, "k3", 0.01, True)
    from rlhf_fast import reference

    scale = reference.agg_scale(inp["mask"], "token-mean", None, None, None).reshape(-1).to(acc).contiguous()
    lab, m = inp["labels"], inp["mask"]
    old, adv, ref = inp["old_logp"].float(), inp["advantages"].float(), inp["ref_logp"].float()
    wg = w.to(acc)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(w.shape, dtype=acc_dtype)
    C = chunk_size or lpl.default_chunk_rows(N, V)
    for i in range(0, N, C):
        j = min(N, i + C)
        hc = h[i:j].to(acc)
        logits = _chunk_logits(hc, wg, None, acc)
        fused(logits, lab[i:j], old[i:j], adv[i:j], m[i:j], scale[i:j], ref[i:j], cfg)
        grad_h[i:j] = _mm(logits, wg, acc)
        if acc_dtype == acc:
            grad_w.addmm_(logits.T, hc)
        else:  # fp32 products, the running sum stored in the weight's dtype
            grad_w.copy_(grad_w.to(acc).addmm_(logits.T, hc))
        del logits
    return grad_h, grad_w.to(w.dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grad_weight_designs(time_shape=dict(N=1024, H=512, V=151936), prec_shape=dict(N=2048, H=128, V=8192),
                        n_chunks=43, reps=4, backend="cpu", out_dir=None):
    """Where linear_ppo_loss sums grad_weight, measured on the CPU in one run:
    * time and memory, forward + backward, fp32 (the issue-13 CPU shape): the shipped design (grad_weight in
      the backward, per slice of vocabulary columns: 4 GEMMs) against the fp32 accumulator in the forward
      (3 GEMMs, the old design, GRAD_WEIGHT_IN_BACKWARD = False) and ppo_loss_from_logits on materialised
      logits, interleaved;
    * precision of grad_weight against float64 for bf16 hidden and weight, with the row chunks of the
      issue's shape (N=16384, V=151936: 43 chunks): fp32 accumulator, accumulator in the weight's dtype
      (bf16), and the shipped design. Relative Frobenius error, and the error where the sum cancels most
      (the 1% of entries smallest against Σ|terms|)."""
    memory = Memory("cpu")
    torch.manual_seed(0)
    inp = make_inputs(time_shape, torch.float32, "cpu")
    kept = {}

    from rlhf_fast.ops import linear_ppo_loss as lpl

    def run(name, in_backward):
        saved = []
        lpl.GRAD_WEIGHT_IN_BACKWARD = in_backward
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                loss, _ = rf.linear_ppo_loss(inp["hidden"], inp["weight"], inp["labels"], inp["old_logp"],
                                             inp["advantages"], inp["mask"], **{**KW, "ref_logp": inp["ref_logp"]},
                                             backend=backend)
            ins = {t.untyped_storage().data_ptr() for t in inp.values()}
            kept[name] = sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() not in ins)
            del saved
            loss.backward()
        finally:
            lpl.GRAD_WEIGHT_IN_BACKWARD = True
        return inp["hidden"].grad, inp["weight"].grad

    def shipped():
        return run("shipped", True)

    def old():  # the op with GRAD_WEIGHT_IN_BACKWARD = False
        return run("accumulate_fp32", False)

    def clear():
        inp["hidden"].grad = inp["weight"].grad = None

    def materialised():
        _materialised(inp, backend)
        return inp["hidden"].grad, inp["weight"].grad

    designs = {"shipped_recompute_in_backward": shipped, "accumulate_fp32_in_forward": old,
               "materialised_logits": materialised}
    runs = {k: {"_t": []} for k in designs}
    for name, fn in designs.items():  # warm-up, so that neither pays the allocator's first growth
        clear()
        fn()
    for name, fn in designs.items():
        clear()
        runs[name]["mem_peak_bytes"], runs[name]["mem_extra_bytes"] = memory.measure(fn)
    grads = {}
    for name, fn in designs.items():
        clear()
        grads[name] = [t.clone() for t in fn()]
    for _ in range(reps):  # interleaved
        for name, fn in designs.items():
            clear()
            t0 = time.perf_counter()
            fn()
            runs[name]["_t"].append((time.perf_counter() - t0) * 1e3)
    for name, r in runs.items():
        r["time_ms"] = quantiles(r.pop("_t"))
    runs["shipped_recompute_in_backward"]["kept_for_backward_bytes"] = kept["shipped"]
    runs["accumulate_fp32_in_forward"]["kept_for_backward_bytes"] = kept["accumulate_fp32"]
    a, b = grads["shipped_recompute_in_backward"], grads["accumulate_fp32_in_forward"]
    timing = {"shape": time_shape, "dtype": "float32", "backend": backend, "threads": torch.get_num_threads(),
              "runs": runs, "memory_note": memory.note,
              "time_ratio_shipped_over_old": runs["shipped_recompute_in_backward"]["time_ms"]["p50"]
              / runs["accumulate_fp32_in_forward"]["time_ms"]["p50"],
              "time_ratio_vs_materialised": {k: runs[k]["time_ms"]["p50"] / runs["materialised_logits"]["time_ms"]["p50"]
                                             for k in ("shipped_recompute_in_backward", "accumulate_fp32_in_forward")},
              "grad_rel_diff_between_designs": {"hidden": _rel(a[0], b[0]), "weight": _rel(a[1], b[1])}}
    del inp, grads, a, b

    # precision, bf16 hidden and weight
    torch.manual_seed(1)
    p = make_inputs(prec_shape, torch.bfloat16, "cpu")
    C = -(-prec_shape["N"] // n_chunks)
    h64, w64 = p["hidden"].detach().double().requires_grad_(), p["weight"].detach().double().requires_grad_()
    from rlhf_fast import reference

    loss64, _ = reference.linear_ppo_loss(h64, w64, p["labels"], p["old_logp"].double(), p["advantages"].double(),
                                          p["mask"], None, p["ref_logp"].double(), 0.05, "k3", 0.01, 1.0, 0.2, 0.28,
                                          3.0)
    loss64.backward()
    want = w64.grad
    # Σ|terms| per entry: the scale the sum cancels from (|d logits|.T @ |h|), from the float64 logits gradient
    with torch.no_grad():
        z = (h64 @ w64.T).detach().requires_grad_()
    with torch.enable_grad():
        l2, _ = reference.ppo_loss_from_logits(z, p["labels"], p["old_logp"].double(), p["advantages"].double(),
                                               p["mask"], p["ref_logp"].double(), 0.05, "k3", 0.01, 1.0, 0.2, 0.28,
                                               3.0)
        (gz,) = torch.autograd.grad(l2, z)
    mag = gz.abs().T @ h64.detach().abs()
    cancel = (want.abs() / mag.clamp_min(1e-300)).flatten()
    worst = cancel.argsort()[: max(1, cancel.numel() // 100)]
    results = {}
    for name, fn in {
        "accumulate_fp32_in_forward": lambda: _accumulate_in_forward(p, backend, C, torch.float32)[1],
        "accumulate_in_weight_dtype_bf16": lambda: _accumulate_in_forward(p, backend, C, torch.bfloat16)[1],
        "shipped_recompute_in_backward": None,
    }.items():
        if fn is None:
            h, w = p["hidden"].detach().requires_grad_(), p["weight"].detach().requires_grad_()
            loss, _ = rf.linear_ppo_loss(h, w, p["labels"], p["old_logp"], p["advantages"], p["mask"],
                                         **{**KW, "ref_logp": p["ref_logp"]}, chunk_size=C, backend=backend)
            loss.backward()
            got = w.grad
        else:
            got = fn()
        err = (got.double() - want).flatten()
        results[name] = {"rel_frobenius": (err.norm() / want.norm()).item(),
                         "rel_frobenius_most_cancelling_1pct": (err[worst].norm() / want.flatten()[worst].norm()).item(),
                         "max_abs_over_max_abs": (err.abs().max() / want.abs().max()).item()}
    one_rounding = (want.to(torch.bfloat16).double() - want).norm() / want.norm()
    precision = {"shape": prec_shape, "dtype": "bfloat16 hidden and weight", "row_chunks": n_chunks,
                 "chunk_rows": C, "backend": backend, "grad_weight_vs_float64": results,
                 "one_bf16_rounding_of_the_float64_grad": one_rounding.item()}
    result = {"meta": environment("cpu"), "what": grad_weight_designs.__doc__, "timing": timing,
              "precision": precision}
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results", "cpu")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear_ppo_loss_grad_weight.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# the defaults of each mode: (N, H, V, dtype, reps, chunk sizes)
DEFAULTS = {"cpu": dict(N=1024, H=512, V=151936, dtype="float32", reps=3, chunk_sizes=[None]),
            "cuda": dict(N=16384, H=4096, V=151936, dtype="bfloat16", reps=10, chunk_sizes=[None, 1024, 2048])}


def _chunks(text):
    return [None if c in ("default", "0") else int(c) for c in text.split(",")]


def parse_args(argv=None):
    """The command line, with the device's defaults filled in (no GPU needed to parse a CUDA run)."""
    ap = argparse.ArgumentParser(description="linear_ppo_loss vs ppo_loss_from_logits on materialised logits, "
                                             "and on a GPU vs three cuBLAS GEMMs")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--N", type=int, default=None, help="tokens (cpu 1024, cuda 16384)")
    ap.add_argument("--H", type=int, default=None, help="hidden size (cpu 512, cuda 4096)")
    ap.add_argument("--V", type=int, default=None, help="vocabulary (151936)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="of hidden and weight (cpu float32, "
                                                                          "cuda bfloat16)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (cpu 3, cuda 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (CUDA; the CPU makes one)")
    ap.add_argument("--backend", default=None, help="rlhf_fast backend (default: cpu on a CPU, the automatic "
                                                    "choice on a GPU)")
    ap.add_argument("--chunk-sizes", type=_chunks, default=None,
                    help="comma-separated rows per chunk, 'default' for the built-in choice; the first is the "
                         "headline run (cpu: default; cuda: default,1024,2048)")
    ap.add_argument("--gemm-baseline", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the three GEMMs of the same shapes (default: on a GPU only)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--loss-types", action="store_true", help="instead: the cost of loss_type gspo / cispo and "
                    "weights relative to ppo (compare_loss_types; B=8 sequences of N/8 tokens)")
    a = ap.parse_args(argv)
    mode = "cuda" if a.device.startswith("cuda") else "cpu"
    if mode == "cpu" and a.device != "cpu":
        ap.error(f"--device must be cpu or cuda[:i], got {a.device!r}")
    for k, v in DEFAULTS[mode].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.backend is None and mode == "cpu":
        a.backend = "cpu"
    if min(a.N, a.H, a.V, a.reps) < 1 or a.warmup < 1:
        ap.error("--N, --H, --V, --reps and --warmup must be positive")
    return a


def main(argv=None):
    if argv is None:
        import sys
        argv = sys.argv[1:]
    if "--grad-weight-designs" in argv:
        r = grad_weight_designs()
        print(json.dumps({k: r[k] for k in ("timing", "precision")}, indent=1))
        return r
    a = parse_args(argv)
    if a.loss_types:
        r = compare_loss_types(8, a.N // 8, a.H, a.V, a.reps, backend=a.backend, device=a.device,
                               dtype=DTYPES[a.dtype], chunk_size=(a.chunk_sizes or [None])[0], out_dir=a.out)
        for c, run in r["runs"].items():
            print(f"{c:12s} {run['time_ms']['p50']:10.2f} ms  x{r['time_ratio_vs_ppo'][c]:.3f} of ppo   "
                  f"extra {(run['mem_extra_bytes'] or 0) / 2**20:8.1f} MiB")
        return r
    r = compare(a.N, a.H, a.V, a.reps, backend=a.backend, out_dir=a.out, plots=not a.no_plots, device=a.device,
                dtype=DTYPES[a.dtype], chunk_sizes=a.chunk_sizes, gemm=a.gemm_baseline, warmup=a.warmup)
    print(f"{r['meta']['device_name']}, {r['dtype']}, N={a.N} H={a.H} V={a.V}, backend {r['backend']}, "
          f"default chunk {r['chunk_rows']} rows")
    runs = dict(r["runs"], **({"three_gemms": r["gemm_baseline"]} if "gemm_baseline" in r else {}))
    for n, run in runs.items():
        less = run.get("mem_extra_less_grads_bytes", run["mem_extra_bytes"])
        extra = "?" if less is None else f"{less / 2**20:8.1f}"
        print(f"{n:30s} {run['time_ms']['p50']:10.2f} ms {run['tflops']:8.3g} TFLOP/s   extra {extra} MiB")
    mem = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.4f}"
    print(f"vs materialised logits: memory ratio {mem} (bar <= 0.125), time ratio {r['time_ratio']:.3f} "
          f"(bar <= 1.2); loss rel diff {r['loss_rel_diff']:.1e}, grads {r['grad_rel_diff']}")
    if "gemm_baseline" in r:
        ex = r["extra_memory_bytes"]
        print(f"vs 3 GEMMs: throughput ratio {r['throughput_ratio_vs_3gemm']:.3f} (bar >= 0.9); extra memory "
              f"{'n/a' if ex is None else f'{ex / 1e9:.2f} GB'} (bar <= 2 GB); bars met: {r['bars_met']}")
    return r


if __name__ == "__main__":
    main()
