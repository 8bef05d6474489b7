"""verl 0.9.1's log-prob / entropy hot path: verl's own functions against the ones
``rlhf_fast.integrations.verl.register()`` swaps in, same inputs, same run.

    python -m benchmarks.verl_hot_path [--rows N] [--vocab V] [--hidden H] [--threads T] [--out DIR]
    python -m benchmarks.verl_hot_path --tp 2      # 2 CPU processes, gloo, Megatron TP = 2

Each case is forward + backward (a fixed random upstream gradient) of what verl's engine calls:
  logprobs_from_logits, entropy_from_logits, entropy_from_logits_with_chunking   [N, V] logits
  fsdp_engine_step       FSDPEngineWithLMHead.prepare_model_outputs, remove-padding path, entropy and log-probs
                         of the same logits (verl: two passes; rf: one fused pass)
  megatron_engine_step   MegatronEngineWithLMHead._lm_head_logits_processor, TP = 1 (verl: clone of the logits,
                         its vocab_parallel_entropy, Megatron's cross entropy; rf: one pass, no clone)
  vocab_parallel_entropy, vocab_parallel_log_probs_from_logits   TP = 1 (a 1-process gloo group)
  FusedLinearForPPO      the torch backend, hidden [N, H] and lm_head [V, H]
verl's ``linear_cross_entropy`` kernel asserts CUDA tensors, so it is not timed on the CPU (recorded as such).
With ``--tp 2``: two gloo processes, each holding V/2 columns (Megatron's layout), time the vocab_parallel_* functions,
the Megatron engine step and rf's linear_cross_entropy(dist_process_group) for a fixed number of repetitions, and
count the elements each side sends through c10d per step (a dispatch mode over the c10d ops); rank 0 writes
verl_hot_path_tp2.{json,md}. Peaks are not recorded there.
Time: median of repetitions (time.perf_counter). Peak: the rise of the resident-set high-water mark over one call,
the leaves' gradients included (they start unallocated): the harness's CPU measure, with the process re-executed
under MALLOC_MMAP_THRESHOLD_ so that freed tensors go back to the system and the high-water mark is the tensors'. Ratios verl / rf: above 1, rf is faster or
smaller. CPU numbers, labelled so; writes verl_hot_path.json and .md into benchmarks/results/cpu/ (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import types
import warnings

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="tokens N")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256, help="H of the FusedLinearForPPO case")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of repetitions per case and side")
    p.add_argument("--cases", default=None, help="comma-separated subset")
    p.add_argument("--out", default=None)
    p.add_argument("--tp", type=int, default=1, help="2+: tensor-parallel processes under gloo (Megatron TP)")
    p.add_argument("--reps", type=int, default=10, help="repetitions per case and side with --tp")
    return p.parse_args(argv)


class CommCount:
    """Elements sent through the c10d ops (eager and functional collectives) while active."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace in ("c10d", "_c10d_functional") and "wait" not in func.__name__ \
                        and "wrap" not in func.__name__:
                    t = next(a for a in args if isinstance(a, (torch.Tensor, list)))
                    t = t[0] if isinstance(t, list) else t
                    counter.calls += 1
                    counter.elements += t.numel()
                return func(*args, **(kwargs or {}))

        self.mode, self.calls, self.elements = Mode(), 0, 0


def _tp_worker(rank, a, port):
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=a.tp)
    mpu.initialize_model_parallel(tensor_model_parallel_size=a.tp)
    from benchmarks.harness import Timer, environment, quantiles
    import rlhf_fast as rf
    from rlhf_fast.integrations import verl as rv
    vtp = __import__("verl.utils.megatron.tensor_parallel", fromlist=["_"])
    meg = __import__("verl.workers.engine.megatron.transformer_impl", fromlist=["_"])
    lce = __import__("verl.utils.kernel.linear_cross_entropy", fromlist=["_"])
    N, V, H, tp = a.rows, a.vocab, a.hidden, a.tp
    Vl = V // tp
    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank; each takes its shard
    logits = (2 * torch.randn(N, V, generator=g))[:, rank * Vl:(rank + 1) * Vl].contiguous().requires_grad_()
    labels = torch.randint(0, Vl * tp, (N,), generator=g)
    hidden = (torch.randn(N, H, generator=g) / H ** 0.5).requires_grad_()
    weight = torch.randn(Vl * tp, H, generator=g)[rank * Vl:(rank + 1) * Vl].contiguous().requires_grad_()
    w_out = torch.randn(N, generator=g)
    verl_lm = meg.MegatronEngineWithLMHead._lm_head_logits_processor
    eng = types.SimpleNamespace(engine_config=types.SimpleNamespace(entropy_from_logits_with_chunking=False,
                                                                    entropy_from_logits_chunk_size=2048))
    group = mpu.get_tensor_model_parallel_group()

    def meg_step(method):
        out = method(eng, logits.unsqueeze(0) * 1.0, labels.unsqueeze(0), torch.ones(1, N),
                     calculate_sum_pi_squared=False, calculate_entropy=True, distillation_use_topk=False,
                     distillation_only=False, logits_processor_func=None, batch=None, data_format="thd")
        return out["log_probs"], out["entropy"]

    cases = {  # name -> (verl step, rf step); rf steps run registered
        "vocab_parallel_entropy": (lambda: vtp.vocab_parallel_entropy(logits * 1.0),) * 2,
        "vocab_parallel_log_probs_from_logits": (lambda: vtp.vocab_parallel_log_probs_from_logits(logits * 1.0,
                                                                                                   labels),) * 2,
        "megatron_engine_step": (lambda: meg_step(verl_lm),
                                 lambda: meg_step(meg.MegatronEngineWithLMHead._lm_head_logits_processor)),
        "linear_cross_entropy": (None, lambda: lce.linear_cross_entropy(hidden, weight, labels, 1.0, "none", group)),
    }
    timer = Timer("cpu", 0.0, a.reps, a.reps)  # a fixed count: every rank runs the same collectives
    rows = {}
    for name, (verl_fn, rf_fn) in cases.items():
        rec = {}
        # rf_nochecks: rf.checks(False), the default for CUDA tensors (no label / geometry exchange)
        for side, fn in (("verl", verl_fn), ("rf", rf_fn), ("rf_nochecks", rf_fn)):
            if fn is None:
                rec["note"] = "verl's kernel asserts CUDA tensors: rf only"
                continue
            (rv.unregister if side == "verl" else rv.register)()

            def step(fn=fn, side=side):
                with rf.checks(False if side == "rf_nochecks" else None):
                    out = fn()
                outs = out if isinstance(out, (tuple, list)) else [out]
                torch.autograd.backward([o.float() for o in outs], [w_out.view(o.shape) for o in outs])

            def fresh():
                logits.grad = hidden.grad = weight.grad = None
            fresh()
            step()
            cc = CommCount()
            fresh()
            with cc.mode:
                step()
            rec[f"{side}_ms"] = quantiles(timer(lambda _: step(), fresh))["p50"]
            rec[f"{side}_comm_calls"], rec[f"{side}_comm_elements"] = cc.calls, cc.elements
        rv.unregister()
        if "verl_ms" in rec:
            rec["time_ratio_verl_over_rf"] = rec["verl_ms"] / rec["rf_ms"]
            rec["time_ratio_verl_over_rf_nochecks"] = rec["verl_ms"] / rec["rf_nochecks_ms"]
        rows[name] = rec
        if rank == 0:
            print(name, json.dumps(rec), flush=True)
    if rank == 0:
        import verl
        result = {"label": "CPU measurement (not a GPU number)", "meta": environment("cpu"), "verl": verl.__version__,
                  "tp": tp, "backend": "gloo", "threads": torch.get_num_threads(),
                  "shape": {"N": N, "V": V, "V_local": Vl, "H": H, "dtype": "float32"}, "cases": rows}
        out_dir = a.out or os.path.join(os.path.dirname(__file__), "results", "cpu")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"verl_hot_path_tp{tp}.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out_dir, f"verl_hot_path_tp{tp}.md"), "w") as f:
            f.write(markdown_tp(result))
        print("wrote", os.path.join(out_dir, f"verl_hot_path_tp{tp}.json"))
    dist.destroy_process_group()


def markdown_tp(result):
    s = result["shape"]
    lines = [f"# verl {result['verl']} hot path at TP = {result['tp']} ({result['backend']}, {result['label']})", "",
             f"N = {s['N']} tokens, V = {s['V']} ({s['V_local']} per rank), H = {s['H']}, {s['dtype']}, forward + "
             f"backward, rank 0's median, {result['threads']} thread(s) per rank, {result['meta']['device_name']}.",
             "Elements: sent through c10d per step by this rank (all collectives, their input sizes).", "",
             "rf: checks on (the CPU default: labels and shard geometry exchanged too); rf no-checks: "
             "rf.checks(False), the default for CUDA tensors.", "",
             "| case | verl ms | rf ms | rf no-checks ms | time verl/rf | time verl/rf no-checks | verl c10d calls / "
             "elements | rf calls / elements | rf no-checks calls / elements |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["cases"].items():
        f = lambda k, fmt="{:.1f}": fmt.format(r[k]) if k in r else ""  # noqa: E731
        c = lambda k: f"{r[k + '_comm_calls']} / {r[k + '_comm_elements']}" if k + "_comm_calls" in r else ""  # noqa
        lines.append(f"| {name} | {f('verl_ms')} | {f('rf_ms')} | {f('rf_nochecks_ms')} | "
                     f"{f('time_ratio_verl_over_rf', '{:.2f}')} | {f('time_ratio_verl_over_rf_nochecks', '{:.2f}')} | "
                     f"{c('verl')} | {c('rf')} | {c('rf_nochecks')} |" + (f" {r['note']}" if "note" in r else ""))
    return "\n".join(lines) + "\n"


def _megatron_tp1():
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)


def _cases(a):
    """name -> (verl_step, rf_step, note); a step runs forward + backward once. rf steps run registered."""
    from rlhf_fast.integrations import verl as rv
    import verl.utils.torch_functional as tf
    import verl.utils.experimental.torch_functional as etf

    N, V, H = a.rows, a.vocab, a.hidden
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(N, V, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    w_out = torch.randn(N, generator=g)

    def fb(fn, *leaves):
        def step():
            out = fn()
            outs = out if isinstance(out, (tuple, list)) else [out]
            torch.autograd.backward([o.float() for o in outs], [w_out.view(o.shape) for o in outs])
        step.leaves = leaves
        return step

    cases = {}
    for name, args in (("logprobs_from_logits", (labels,)), ("entropy_from_logits", ()),
                       ("entropy_from_logits_with_chunking", ())):
        verl_fn, rf_fn = getattr(tf, name), getattr(rv, name)
        cases[name] = (fb(lambda f=verl_fn, a=args: f(logits, *a), logits),
                       fb(lambda f=rf_fn, a=args: f(logits, *a), logits), "")

    # the FSDP engine: remove-padding path, entropy and log-probs of the same logits
    fsdp = __import__("verl.workers.engine.fsdp.transformer_impl", fromlist=["_"])
    verl_prepare = fsdp.FSDPEngineWithLMHead.prepare_model_outputs

    def fsdp_step(entropy_fn, method):
        eng = object.__new__(fsdp.FSDPEngineWithLMHead)
        eng.engine_config = types.SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False,
                                                  entropy_from_logits_chunk_size=2048)
        eng.use_ulysses_sp = False
        eng.compute_entropy_from_logits = entropy_fn
        mb = {"input_ids": torch.nested.nested_tensor_from_jagged(labels, torch.tensor([0, N // 2, N])),
              "calculate_entropy": True, "use_remove_padding": True}
        oa = {"input_ids_rmpad_rolled": labels, "temperature_rmpad": torch.ones(N), "temperature_is_one": True,
              "pad_size": 0}
        out = method()(eng, types.SimpleNamespace(logits=logits.unsqueeze(0)), oa, mb, None)
        return out["log_probs"].values(), out["entropy"].values()

    cases["fsdp_engine_step"] = (
        fb(lambda: fsdp_step(tf.entropy_from_logits, lambda: verl_prepare), logits),
        fb(lambda: fsdp_step(rv.entropy_from_logits, lambda: fsdp.FSDPEngineWithLMHead.prepare_model_outputs), logits),
        "verl: entropy_from_logits then logprobs_from_logits; rf: one fused row pass")

    # Megatron, TP = 1
    try:
        _megatron_tp1()
        meg = __import__("verl.workers.engine.megatron.transformer_impl", fromlist=["_"])
        vtp = __import__("verl.utils.megatron.tensor_parallel", fromlist=["_"])
    except Exception as e:  # noqa: BLE001
        cases["megatron"] = (None, None, f"not measured: {type(e).__name__}: {e}")
    else:
        verl_lm = meg.MegatronEngineWithLMHead._lm_head_logits_processor
        temp = torch.ones(1, N)
        eng = types.SimpleNamespace(engine_config=types.SimpleNamespace(entropy_from_logits_with_chunking=False,
                                                                        entropy_from_logits_chunk_size=2048))

        def meg_step(method):
            x = logits.unsqueeze(0) * 1.0  # the engine divides by the temperature in place
            out = method()(eng, x, labels.unsqueeze(0), temp, calculate_sum_pi_squared=False, calculate_entropy=True,
                           distillation_use_topk=False, distillation_only=False, logits_processor_func=None,
                           batch=None, data_format="thd")
            return out["log_probs"], out["entropy"]

        cases["megatron_engine_step"] = (
            fb(lambda: meg_step(lambda: verl_lm), logits),
            fb(lambda: meg_step(lambda: meg.MegatronEngineWithLMHead._lm_head_logits_processor), logits),
            "verl: clone + vocab_parallel_entropy + Megatron cross entropy; rf: one pass, no clone (TP = 1)")
        for name, args in (("vocab_parallel_entropy", ()), ("vocab_parallel_log_probs_from_logits", (labels,))):
            verl_fn, rf_fn = getattr(vtp, name), getattr(rv, name)
            # Megatron's cross entropy writes into fp32 logits: verl's side gets a copy (outside the timing? no:
            # the copy is what verl's engine pays, its clone); both sides start from `logits * 1.0`
            cases[name] = (fb(lambda f=verl_fn, a=args: f(logits * 1.0, *a), logits),
                           fb(lambda f=rf_fn, a=args: f(logits * 1.0, *a), logits), "TP = 1; both sides take logits*1")

    # FusedLinearForPPO, torch backend
    hidden = (torch.randn(N, H, generator=g) / H ** 0.5).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    verl_fl = etf.FusedLinearForPPO
    rf_fl = rv._make_fused_linear_for_ppo(verl_fl)
    cases["FusedLinearForPPO"] = (
        fb(lambda: verl_fl()(hidden, weight, labels, 1.0), hidden, weight),
        fb(lambda: rf_fl()(hidden, weight, labels, 1.0), hidden, weight),
        "torch backend (verl's default); hidden [N, H], weight [V, H]")
    cases["linear_cross_entropy"] = (None, None, "not measured: verl's kernel asserts CUDA tensors")
    return cases


def main(argv=None):
    if MMAP_ENV not in os.environ:  # glibc reads it at start: re-execute with it set
        env = dict(os.environ, **{MMAP_ENV: "65536"})
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.verl_hot_path", *(argv or sys.argv[1:])], env)
    a = parse_args(argv)
    if a.tp > 1:
        import torch.multiprocessing as mp
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_tp_worker, args=(a, port), nprocs=a.tp, join=True)
        return 0
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    from benchmarks.harness import Memory, Timer, environment, quantiles
    from rlhf_fast.integrations import verl as rv

    cases = _cases(a)
    if a.cases:
        keep = set(a.cases.split(","))
        cases = {k: v for k, v in cases.items() if k in keep}
    timer, mem = Timer("cpu", a.budget, 3, 50), Memory("cpu")
    rows = {}
    for name, (verl_step, rf_step, note) in cases.items():
        if verl_step is None:
            rows[name] = {"note": note}
            print(f"{name:40s} {note}")
            continue
        rec = {"note": note}
        for side, step in (("verl", verl_step), ("rf", rf_step)):
            (rv.register if side == "rf" else rv.unregister)()
            def fresh(step=step):  # the gradients start unallocated: the peak counts the step's own grad
                for t in step.leaves:
                    t.grad = None
            fresh()
            step()  # warm up (torch.compile inside verl's Megatron entropy, rf's first launch)
            rec[f"{side}_ms"] = quantiles(timer(lambda _: step(), fresh))["p50"]
            fresh()
            rec[f"{side}_peak_mib"] = (mem.measure(step)[1] or 0) / 2**20
        rv.unregister()
        rec["time_ratio_verl_over_rf"] = rec["verl_ms"] / rec["rf_ms"]
        rec["peak_ratio_verl_over_rf"] = rec["verl_peak_mib"] / max(rec["rf_peak_mib"], 1e-9)
        rows[name] = rec
        print(f"{name:40s} verl {rec['verl_ms']:9.1f} ms {rec['verl_peak_mib']:8.1f} MiB | rf {rec['rf_ms']:9.1f} ms "
              f"{rec['rf_peak_mib']:8.1f} MiB | time x{rec['time_ratio_verl_over_rf']:.2f} "
              f"peak x{rec['peak_ratio_verl_over_rf']:.2f}", flush=True)
    import verl
    result = {"label": "CPU measurement (not a GPU number)", "meta": environment("cpu"), "verl": verl.__version__,
              "threads": torch.get_num_threads(), "shape": {"N": a.rows, "V": a.vocab, "H": a.hidden,
                                                             "dtype": "float32"},
              "memory": mem.note + f"; {MMAP_ENV}=65536", "cases": rows}
    out_dir = a.out or os.path.join(os.path.dirname(__file__), "results", "cpu")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "verl_hot_path.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "verl_hot_path.md"), "w") as f:
        f.write(markdown(result))
    print("wrote", os.path.join(out_dir, "verl_hot_path.json"))
    return 0


def markdown(result):
    s = result["shape"]
    lines = [f"# verl {result['verl']} hot path: verl's functions vs rlhf_fast's swaps ({result['label']})", "",
             f"N = {s['N']} tokens, V = {s['V']}, H = {s['H']}, {s['dtype']}, forward + backward, "
             f"{result['threads']} thread(s), {result['meta']['device_name']}, commit {result['meta']['git_commit']}.",
             f"Peak: {result['memory']}.", "",
             "| case | verl ms | rf ms | time verl/rf | verl peak MiB | rf peak MiB | peak verl/rf | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in result["cases"].items():
        if "verl_ms" not in r:
            lines.append(f"| {name} | | | | | | | {r['note']} |")
            continue
        lines.append(f"| {name} | {r['verl_ms']:.1f} | {r['rf_ms']:.1f} | {r['time_ratio_verl_over_rf']:.2f} | "
                     f"{r['verl_peak_mib']:.0f} | {r['rf_peak_mib']:.0f} | {r['peak_ratio_verl_over_rf']:.2f} | "
                     f"{r['note']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
