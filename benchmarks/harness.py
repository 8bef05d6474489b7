"""Shared machinery for the benchmarks: cases, timing, memory, bandwidth, and the output files.

A ``bench_<op>.py`` module defines one or more :class:`Bench` objects (sizes, dtypes, an input
builder, how to call a function with the reference signature, the bytes the op must move, its
peers). :func:`run` times every rlhf_fast backend registered for the op on the device
(``rf.backends_for``) and every installed peer, for each case and phase:

  fwd    the forward with autograd on (what a training step runs)
  bwd    the backward alone (a fresh forward before each repetition, untimed)
  full   forward + backward

Times: median and 20/80 % quantiles of many repetitions — CUDA events on a GPU (the L2 cache is
flushed before each repetition), ``time.perf_counter`` on the CPU. Memory: on a GPU the peak of
``torch.cuda.max_memory_allocated`` during one run, absolute and above the inputs; on the CPU the
rise of the process's resident-set high-water mark (Linux ``/proc``, reset through
``clear_refs``), approximate because the allocator keeps freed pages. Memory-bound ops state the
bytes each phase must move (each bench file documents its byte model); dividing by the time gives
GB/s and, against the copy bandwidth measured in the same run (a large ``copy_``), % of the floor.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import rlhf_fast as rf
from rlhf_fast import _backend
from rlhf_fast import reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("fwd", "bwd", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PRESETS = ("tiny", "cpu", "gpu")


# ----------------------------------------------------------------------------- definitions
@dataclass
class Impl:
    """One thing to time: an rlhf_fast backend or a peer. ``fn(inputs) -> output``; None if skipped."""
    name: str
    kind: str  # "backend" | "peer"
    fn: Callable[[dict], Any] | None
    note: str | None = None  # why it is skipped, or a caveat about what it computes
    mutates_inputs: bool = False  # writes into its inputs (e.g. the gradient into the logits): gets copies
    primary: Callable[[Any, dict], torch.Tensor] | None = None  # output to compare; default Bench.primary
    ref_view: Callable[[torch.Tensor], torch.Tensor] | None = None  # reference primary mapped to ours


@dataclass
class Bench:
    """An op to benchmark. ``sizes[preset]`` is a list of shape dicts; ``dtypes[device_type]`` names."""
    op: str
    sizes: dict[str, list[dict]]
    dtypes: dict[str, list[str]]
    make_inputs: Callable[[dict, torch.dtype, str], dict]
    args: Callable[[dict], tuple]  # positional args of the reference signature
    size: Callable[[dict], int]  # the x axis of the plots
    size_label: str
    grad_inputs: tuple[str, ...] = ()  # inputs that require grad; empty: forward only
    outputs: Callable[[Any], list[torch.Tensor]] = lambda out: [out]  # what the backward starts from
    primary: Callable[[Any, dict], torch.Tensor] = lambda out, inp: out if torch.is_tensor(out) else out[0]
    bytes_model: Callable[[dict, torch.dtype], dict[str, int]] | None = None  # memory-bound ops
    flops_model: Callable[[dict, torch.dtype], dict[str, int]] | None = None  # compute-bound ops
    peers: Callable[["Bench", str], list[Impl]] = lambda bench, device: []
    check_tol: float = 2e-2  # ‖impl − reference‖/‖reference‖ above this is reported as a mismatch

    @property
    def has_backward(self) -> bool:
        return bool(self.grad_inputs)

    def call_reference_signature(self, fn) -> Callable[[dict], Any]:
        return lambda inp: fn(*self.args(inp))


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# ----------------------------------------------------------------------------- peers shared by ops
def optional_import(module: str, pip_name: str):
    """(module, None) or (None, note) — peers are benchmarked only when installed."""
    import importlib

    try:
        return importlib.import_module(module), None
    except Exception as e:  # ImportError, or a broken install that fails on import
        return None, f"not installed ({type(e).__name__}: {str(e)[:120]}); `pip install {pip_name}`"


def compile_peer(bench: Bench, device: str, enabled: bool = True, why_not: str | None = None) -> Impl:
    """torch.compile of the reference function (dynamic=False: one graph per shape)."""
    if not enabled:
        return Impl("torch.compile", "peer", None, why_not)
    compiled = torch.compile(getattr(ref, bench.op), dynamic=False)
    return Impl("torch.compile", "peer", bench.call_reference_signature(compiled),
                "torch.compile(reference, dynamic=False); compile time excluded (first call)")


# ----------------------------------------------------------------------------- environment
def _git_commit() -> str:
    env = os.environ.get("RLHF_FAST_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU: {_cpu_name()} ({os.cpu_count()} cores, {platform.machine()})"


def device_slug(device: str) -> str:
    """results folder name: "cpu", or the GPU's name ("nvidia-h100-80gb-hbm3")."""
    if not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(torch.device(device)).lower()).strip("-")


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "rlhf_fast": rf.__version__,
        "rlhf_fast_backends": rf.available_backends(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- timing
def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """Repeats ``fn(before())`` and returns the times of ``fn`` in ms."""

    def __init__(self, device: str, budget_s: float, min_reps: int, max_reps: int):
        self.device, self.budget_s, self.min_reps, self.max_reps = device, budget_s, min_reps, max_reps
        self.cuda = device.startswith("cuda")
        # the caches are flushed before each repetition (L2 on a GPU, the last-level cache on a CPU):
        # small ops would otherwise read their inputs from cache and beat the DRAM copy bandwidth
        self._flush = torch.empty((256 if self.cuda else 64) * 2**20, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[Any], Any], before: Callable[[], Any] = lambda: None) -> list[float]:
        times: list[float] = []
        t0 = time.perf_counter()
        while len(times) < self.max_reps and (len(times) < self.min_reps or time.perf_counter() - t0 < self.budget_s):
            state = before()
            self._flush.zero_()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(state)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                s = time.perf_counter()
                fn(state)
                times.append((time.perf_counter() - s) * 1e3)
            del state
        return times


def quantiles(times: list[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"p20": q[0], "p50": q[1], "p80": q[2], "n": len(times)}


def copy_bandwidth(device: str, nbytes: int, timer: Timer) -> float:
    """Bytes/s of ``dst.copy_(src)`` on a large tensor: read + write, so 2·nbytes per copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    ms = quantiles(timer(lambda _: dst.copy_(src)))["p50"]
    return 2 * src.numel() * 4 / (ms * 1e-3)


# ----------------------------------------------------------------------------- memory
class Memory:
    """Peak memory of one call: (absolute peak, peak above what was allocated before), in bytes."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.note = None
        if not self.cuda:
            self.note = ("CPU: rise of the resident-set high-water mark (VmHWM) over one run; approximate, "
                         "the allocator keeps freed pages")
            try:
                self._reset_hwm()
                self._status()
            except OSError as e:
                self.note = f"CPU memory not measured: /proc/self/clear_refs or status unusable ({e})"
                self.ok = False
            else:
                self.ok = True

    @staticmethod
    def _status() -> dict:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "VmHWM")}

    @staticmethod
    def _reset_hwm():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS to the current RSS (Linux >= 4.0)

    def measure(self, fn: Callable[[], Any]) -> tuple[int | None, int | None]:
        if self.cuda:
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            out = fn()
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            del out
            return peak, peak - before
        if not self.ok:
            return None, None
        self._reset_hwm()
        before = self._status()["VmRSS"]
        out = fn()
        peak = self._status()["VmHWM"]
        del out
        return peak, max(0, peak - before)


# ----------------------------------------------------------------------------- running
@dataclass
class Options:
    device: str = "cpu"
    preset: str = "cpu"
    ops: list[str] | None = None
    dtypes: list[str] | None = None
    backends: list[str] | None = None  # None: every registered backend for the device
    peers: list[str] | None = None  # None: every peer
    peer_notes: dict[str, str] = dataclasses.field(default_factory=dict)  # peers left out, recorded with why
    phases: tuple[str, ...] = PHASES
    budget_s: float = 0.3  # per phase and case
    min_reps: int = 3
    max_reps: int = 100
    time_budget_s: float | None = None  # the whole run; remaining cases are recorded as skipped
    log: Callable[[str], None] = print


def grads_for(outs: list[torch.Tensor], cache: dict) -> list[torch.Tensor | None]:
    """The upstream gradient for each output: None for scalars, a fixed random tensor otherwise."""
    grads = []
    for o in outs:
        if o.dim() == 0:
            grads.append(None)
            continue
        key = (tuple(o.shape), o.dtype, o.device)
        if key not in cache:
            cache[key] = torch.randn(o.shape, dtype=o.dtype, device=o.device)
        grads.append(cache[key])
    return grads


def _copy_inputs(inp: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
            for k, v in inp.items()}


def impls_for(bench: Bench, opts: Options) -> list[Impl]:
    dev = torch.device(opts.device)
    out = []
    for b in rf.backends_for(bench.op, dev):
        if opts.backends is not None and b not in opts.backends:
            continue
        if b == "triton" and dev.type == "cpu" and (opts.backends is None or "triton" not in opts.backends):
            out.append(Impl(b, "backend", None, "Triton on CPU runs under the interpreter only: not timed "
                                                  "(pass --backends triton to force)"))
            continue
        out.append(Impl(b, "backend", bench.call_reference_signature(_backend.select(bench.op, dev, b))))
    if opts.backends is not None:
        for b in opts.backends:
            if b not in rf.backends_for(bench.op, dev):
                why = rf.why_unavailable(b) or f"{bench.op} has no {b!r} backend on {dev.type}"
                out.append(Impl(b, "backend", None, why))
    if opts.peers is None or opts.peers or opts.peer_notes:
        for p in bench.peers(bench, opts.device):
            if opts.peers is None or p.name in opts.peers:
                out.append(p)
            elif p.name in opts.peer_notes:
                out.append(Impl(p.name, "peer", None, p.note if p.fn is None else opts.peer_notes[p.name]))
    return out


def _record_base(bench: Bench, shape: dict, dtype: torch.dtype, impl: Impl, env: dict) -> dict:
    return {
        "op": bench.op, "impl": impl.name, "kind": impl.kind, "case": shape_label(shape), "shape": dict(shape),
        "size": bench.size(shape), "size_label": bench.size_label, "dtype": DTYPE_NAMES[dtype],
        "device": env["device"], "device_name": env["device_name"], "torch": env["torch"],
        "triton": env["triton"], "cuda": env["cuda"], "date": env["date"], "git_commit": env["git_commit"],
        "status": "skipped", "note": impl.note, "time_ms": {p: None for p in PHASES}, "first_call_ms": None,
        "mem_peak_bytes": {"fwd": None, "full": None}, "mem_extra_bytes": {"fwd": None, "full": None},
        "mem_note": None, "speedup_vs_reference": {p: None for p in PHASES},
        "bytes": {p: None for p in PHASES}, "gbps": {p: None for p in PHASES},
        "bandwidth_pct": {p: None for p in PHASES}, "flops": {p: None for p in PHASES},
        "tflops": {p: None for p in PHASES}, "rel_err_vs_reference": None,
    }


def _run_impl(bench, impl, inputs, rec, timer, memory, opts, grad_cache, ref_primary):
    inp = _copy_inputs(inputs) if impl.mutates_inputs else inputs
    grad_leaves = [inp[k] for k in bench.grad_inputs]

    def zero():
        for t in grad_leaves:
            t.grad = None

    def fwd():
        return impl.fn(inp)

    def backward(out):
        outs = bench.outputs(out)
        torch.autograd.backward(outs, grads_for(outs, grad_cache))

    def full():
        zero()
        out = fwd()
        if bench.has_backward:
            backward(out)
        return out

    s = time.perf_counter()
    out = full()  # warm-up: compiles, autotunes, allocates
    _sync(opts.device)
    rec["first_call_ms"] = (time.perf_counter() - s) * 1e3
    primary = (impl.primary or bench.primary)(out, inp)
    if ref_primary is not None:
        want = impl.ref_view(ref_primary) if impl.ref_view else ref_primary
        if want.shape == primary.shape:
            err = float(((primary.detach().double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)))
            rec["rel_err_vs_reference"] = err
            if err > bench.check_tol:
                rec["note"] = ((rec["note"] + "; ") if rec["note"] else "") + f"MISMATCH vs reference: rel err {err:.2e}"
    del out, primary

    phases = [p for p in opts.phases if bench.has_backward or p == "fwd"]
    for p in phases:
        if p == "fwd":
            times = timer(lambda _: fwd(), before=zero)
        elif p == "bwd":
            times = timer(backward, before=lambda: (zero(), fwd())[1])
        else:
            times = timer(lambda _: full())
        rec["time_ms"][p] = quantiles(times)
    zero()
    rec["mem_peak_bytes"]["fwd"], rec["mem_extra_bytes"]["fwd"] = memory.measure(fwd)
    zero()
    if bench.has_backward:
        rec["mem_peak_bytes"]["full"], rec["mem_extra_bytes"]["full"] = memory.measure(full)
    zero()
    rec["mem_note"] = memory.note
    rec["status"] = "ok"


def _derive(rec: dict, bench: Bench, shape: dict, dtype: torch.dtype, bw: float):
    nbytes = bench.bytes_model(shape, dtype) if bench.bytes_model else {}
    flops = bench.flops_model(shape, dtype) if bench.flops_model else {}
    for p in PHASES:
        t = rec["time_ms"][p]
        if t is None:
            continue
        sec = t["p50"] * 1e-3
        if p in nbytes:
            rec["bytes"][p] = nbytes[p]
            rec["gbps"][p] = nbytes[p] / sec / 1e9
            rec["bandwidth_pct"][p] = 100.0 * nbytes[p] / sec / bw
        if p in flops:
            rec["flops"][p] = flops[p]
            rec["tflops"][p] = flops[p] / sec / 1e12


def load_benches() -> list[Bench]:
    """The BENCHES of every benchmarks/bench_*.py, in file-name order."""
    import importlib
    import pkgutil

    pkg = os.path.dirname(os.path.abspath(__file__))
    benches = []
    for m in sorted(pkgutil.iter_modules([pkg]), key=lambda m: m.name):
        if m.name.startswith("bench_"):
            benches += importlib.import_module(f"benchmarks.{m.name}").BENCHES
    return benches


def run(benches: list[Bench], opts: Options, on_record: Callable[[dict], None] = lambda r: None,
        result: dict | None = None) -> dict:
    """Run every case of ``benches`` into ``result`` ({"meta", "records"}, filled as it goes, so an
    interrupted run still has what it measured); ``on_record`` sees each record as it is made."""
    env = environment(opts.device)
    timer = Timer(opts.device, opts.budget_s, opts.min_reps, opts.max_reps)
    memory = Memory(opts.device)
    cuda = opts.device.startswith("cuda")
    copy_bytes = (1 << 30) if cuda else (64 << 20 if opts.preset == "tiny" else 256 << 20)
    bw = copy_bandwidth(opts.device, copy_bytes, timer)
    env["copy_bandwidth_gbps"] = bw / 1e9
    env["copy_bandwidth_bytes"] = copy_bytes
    opts.log(f"# {env['device_name']} | torch {env['torch']} triton {env['triton']} cuda {env['cuda']} | "
             f"copy bandwidth {bw / 1e9:.1f} GB/s")
    t_start = time.perf_counter()
    result = {} if result is None else result
    result["meta"], result["records"] = env, []
    records: list[dict] = result["records"]
    grad_cache: dict = {}
    dev_type = "cuda" if cuda else "cpu"
    if opts.ops is not None:  # in the order asked for: the most important first, in case time runs out
        benches = sorted((b for b in benches if b.op in opts.ops), key=lambda b: opts.ops.index(b.op))
    for bench in benches:
        dtypes = opts.dtypes or bench.dtypes[dev_type]
        impls = impls_for(bench, opts)
        for dname in dtypes:
            dtype = DTYPES[dname]
            for shape in bench.sizes[opts.preset]:
                out_of_time = opts.time_budget_s is not None and time.perf_counter() - t_start > opts.time_budget_s
                inputs = None if out_of_time else bench.make_inputs(shape, dtype, opts.device)
                case_recs, ref_primary = [], None
                # the reference first: its output is what the others are checked against
                for impl in sorted(impls, key=lambda i: i.name != "reference"):
                    rec = _record_base(bench, shape, dtype, impl, env)
                    if out_of_time:
                        rec["note"] = "time budget of the run exhausted"
                    elif impl.fn is not None:
                        try:
                            _run_impl(bench, impl, inputs, rec, timer, memory, opts, grad_cache, ref_primary)
                            if impl.name == "reference" and impl.kind == "backend":
                                with torch.no_grad():
                                    ref_primary = bench.primary(impl.fn(inputs), inputs).detach()
                        except Exception as e:  # one failing implementation must not stop the run
                            rec["status"] = "error"
                            rec["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                            if cuda:
                                torch.cuda.empty_cache()
                    _derive(rec, bench, shape, dtype, bw)
                    case_recs.append(rec)
                ref_rec = next((r for r in case_recs if r["impl"] == "reference" and r["status"] == "ok"), None)
                for rec in case_recs:
                    if ref_rec is not None and rec["status"] == "ok":
                        for p in PHASES:
                            a, b = ref_rec["time_ms"][p], rec["time_ms"][p]
                            if a and b:
                                rec["speedup_vs_reference"][p] = a["p50"] / b["p50"]
                    records.append(rec)
                    opts.log(format_line(rec))
                    on_record(rec)
                del inputs, ref_primary
                grad_cache.clear()
                if cuda:
                    torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- output
def _ms(t: dict | None) -> str:
    return "—" if t is None else (f"{t['p50']:.3f}" if t["p50"] < 10 else f"{t['p50']:.1f}")


def _mb(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:.1f}"


def _main_phase(rec: dict) -> str:
    return "full" if rec["time_ms"]["full"] is not None else "fwd"


def _throughput(rec: dict) -> str:
    p = _main_phase(rec)
    if rec["bandwidth_pct"][p] is not None:
        return f"{rec['gbps'][p]:.3g} GB/s ({rec['bandwidth_pct'][p]:.2g}%)"
    if rec["tflops"][p] is not None:
        return f"{rec['tflops'][p]:.3g} TFLOP/s"
    return "—"


def format_line(rec: dict) -> str:
    head = f"{rec['op']:22s} {rec['case']:26s} {rec['dtype']:9s} {rec['impl']:14s}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}: {rec['note']}"
    sp = rec["speedup_vs_reference"][_main_phase(rec)]
    return (f"{head} fwd {_ms(rec['time_ms']['fwd']):>8s} bwd {_ms(rec['time_ms']['bwd']):>8s} "
            f"full {_ms(rec['time_ms']['full']):>8s} ms  x{sp or 0:5.2f}  {_throughput(rec)}")


MD_HEADER = ("| op | case | dtype | impl | fwd ms | bwd ms | full ms | × ref | extra mem MiB (full) "
             "| throughput (% copy BW) |")


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# rlhf_fast benchmarks — {meta['device_name']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, commit {meta['git_commit']}, "
        f"{meta['date']}. Measured copy bandwidth {meta['copy_bandwidth_gbps']:.1f} GB/s."
        + (f" CPU threads {meta['cpu_threads']}, load average at start "
           f"{', '.join(f'{x:.1f}' for x in meta['load_average'])} (a shared machine: CPU timings are noisy)."
           if meta["device"] == "cpu" and meta.get("load_average") else ""),
        "",
        "Times are medians (ms); × ref = reference time / this time for the full step (fwd+bwd, or fwd for "
        "forward-only ops) in the same run; extra memory = peak above the inputs during fwd+bwd; "
        "throughput = bytes the op must move / time (and % of the measured copy bandwidth) for "
        "memory-bound ops, TFLOP/s for matmul ops.",
        "",
        MD_HEADER,
        "|" + "---|" * 10,
    ]
    skipped: dict[tuple, list[str]] = {}  # (op, impl, status, note) -> cases
    for r in result["records"]:
        if r["status"] != "ok":
            skipped.setdefault((r["op"], r["impl"], r["status"], r["note"]), []).append(f"{r['case']} {r['dtype']}")
            continue
        sp = r["speedup_vs_reference"][_main_phase(r)]
        mem = r["mem_extra_bytes"]["full"] if r["mem_extra_bytes"]["full"] is not None else r["mem_extra_bytes"]["fwd"]
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['impl']} | {_ms(r['time_ms']['fwd'])} | "
                     f"{_ms(r['time_ms']['bwd'])} | {_ms(r['time_ms']['full'])} | "
                     f"{'—' if sp is None else f'{sp:.2f}'} | {_mb(mem)} | {_throughput(r)} |")
    notes = sorted({r["note"] for r in result["records"] if r["status"] == "ok" and r["note"]})
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if skipped:
        lines += ["", "Not measured:"] + [f"- {op} **{impl}** ({'; '.join(cases)}): {status} — {note}"
                                          for (op, impl, status, note), cases in skipped.items()]
    mem_notes = sorted({r["mem_note"] for r in result["records"] if r["mem_note"]})
    lines += [""] + [f"Memory: {n}" for n in mem_notes]
    return "\n".join(lines) + "\n"


def plot(result: dict, out_dir: str) -> list[str]:
    """One PNG per op (time and memory vs size, a line per implementation and dtype) and a summary grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_op: dict[str, list[dict]] = {}
    for r in result["records"]:
        if r["status"] == "ok":
            by_op.setdefault(r["op"], []).append(r)
    paths = []
    meta = result["meta"]
    grid, axes_grid = plt.subplots(len(by_op) or 1, 2, figsize=(11, 3.2 * max(1, len(by_op))), squeeze=False)
    for row, (op, recs) in enumerate(sorted(by_op.items())):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax_pair in (axes, axes_grid[row]):
            _plot_op(ax_pair, op, recs)
        fig.suptitle(f"{op} — {meta['device_name']} — torch {meta['torch']}", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    grid.suptitle(f"rlhf_fast — {meta['device_name']}", fontsize=10)
    grid.tight_layout(rect=(0, 0, 1, 1 - 0.3 / max(1, len(by_op))))
    path = os.path.join(out_dir, "summary.png")
    grid.savefig(path, dpi=70)
    plt.close(grid)
    return [path] + paths


def _plot_op(axes, op: str, recs: list[dict]):
    series: dict[tuple, list[dict]] = {}
    for r in recs:
        series.setdefault((r["impl"], r["dtype"]), []).append(r)
    phase = "full" if any(r["time_ms"]["full"] for r in recs) else "fwd"
    for (impl, dtype), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["size"])
        xs = [r["size"] for r in rs]
        t = [r["time_ms"][phase]["p50"] if r["time_ms"][phase] else float("nan") for r in rs]
        lo = [r["time_ms"][phase]["p20"] if r["time_ms"][phase] else float("nan") for r in rs]
        hi = [r["time_ms"][phase]["p80"] if r["time_ms"][phase] else float("nan") for r in rs]
        m = [(r["mem_extra_bytes"][phase] or 0) / 2**20 if r["mem_extra_bytes"][phase] is not None else float("nan")
             for r in rs]
        label = f"{impl} ({dtype})"
        (line,) = axes[0].plot(xs, t, marker="o", label=label)
        axes[0].fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())  # 20-80 % quantiles
        axes[1].plot(xs, m, marker="o", label=label, color=line.get_color())
    xl = recs[0]["size_label"]
    for ax, yl in zip(axes, (f"{phase} time, median ms", f"extra memory ({phase}), MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log") if ax is axes[0] else None
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(op, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)


def write(result: dict, out_dir: str, plots: bool = True, log: Callable[[str], None] = print) -> dict:
    """results.json, results.md and (matplotlib permitting) the PNGs; returns {kind: path or note}."""
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    written["json"] = os.path.join(out_dir, "results.json")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(result))
    written["markdown"] = os.path.join(out_dir, "results.md")
    if plots:
        try:
            written["plots"] = plot(result, out_dir)
        except ImportError as e:
            written["plots"] = f"no plots: matplotlib is not installed ({e}); `pip install matplotlib`"
            log(written["plots"])
    return written


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def as_dict(opts: Options) -> dict:
    d = dataclasses.asdict(opts)
    d.pop("log")
    return d

