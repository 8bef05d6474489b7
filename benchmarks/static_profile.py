"""Static GPU profile: what the compilers make of every GPU kernel, without a GPU.

    python -m benchmarks.static_profile [--arch 90 80 100] [--out benchmarks/results/static]

Triton kernels (rlhf_fast/ops/*.py): each op's Triton launcher is run on meta tensors of the
benchmark shapes with ``JITFunction.run`` replaced by a capture that builds the specialisation
exactly as triton.runtime.jit does (its own binder: 16-byte alignment of pointers, divisibility by
16 of integer arguments, ints equal to 1 made constexpr), then compiles that for the target with
``triton.compile`` — so BLOCK, num_warps, dtypes and the divisibility hints are the launchers' own,
whatever the kernels currently are. CUDA kernels (csrc/*.cu): compiled to a cubin with the nvcc
flags of rlhf_fast/_build.py (and torch's cpp_extension flags). Per kernel and configuration it records, from
``ptxas -v`` and the SASS (``cuobjdump -sass``, the binary in the Triton wheel): registers, spill
bytes, shared memory, theoretical occupancy, the width of the global loads/stores in the hot loop
and SASS instructions per element of the hot loop.

Hot loop: the innermost SASS loop (a branch back to an earlier address) that loads from global
memory, the one loading the most bytes per iteration (the aligned body, not a peeled head/tail). A
kernel that chooses a path at run time (a vector loop for aligned rows, a scalar loop otherwise)
has several such loops: all are listed in the record's ``loading_loops``, and the hot one is the
one moving the most bytes per iteration, which for an unrolled scalar fallback can be that one.
Elements per thread per iteration: for the logits-row kernels, the bytes its global loads read over
the logit size (counts any unrolling), with a group read from the two aligned 16-byte packs it
straddles (a row off a 16-byte boundary; ptxas trims each load to the words used) counted once, see
``grouped_load_bytes``; for the CUDA row kernels cross-checked by the count of MUFU.EX2 (one per
element, plus one rebase per group in a forward: ``exp2_per_iter``); for the other kernels the BLOCK*
constexprs over the threads.
A kernel with no loop is profiled as straight-line code (its whole body).

Writes <out>/sm_<arch>.json (a list of records) and <out>/sm_<arch>.md. Compiled artefacts are
cached (RLHF_FAST_STATIC_CACHE, default ~/.cache/rlhf_fast/static; Triton's own cache for its
kernels), so a second run takes seconds. Needs no GPU; needs the Triton wheel (its ptxas and
cuobjdump) and, for the CUDA kernels, nvcc (CUDA_HOME or /usr/local/cuda).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "static"


def tree() -> Path:
    """The source tree profiled: the one the imported rlhf_fast comes from (its csrc/ and setup.py too), so
    `PYTHONPATH=<other tree> python benchmarks/static_profile.py --out DIR` profiles another checkout."""
    import rlhf_fast

    return Path(rlhf_fast.__file__).resolve().parent.parent
VOCABS = (32000, 50257, 128256, 151936)
ROW_DTYPES = ("bfloat16", "float32")
N_ROWS = 4096  # rows of the row-kernel shapes: the many-rows regime (>= 2x the SMs of any target)
ROW_OPS = ("logprobs", "ppo_loss_from_logits")

# Per-SM limits (CUDA occupancy calculator / programming guide, compute capability 8.0, 9.0, 10.0).
ARCHS = {
    80: dict(regs=65536, threads=2048, blocks=32, smem=167936, reserved_smem=1024, reg_unit=256, sms=108),
    90: dict(regs=65536, threads=2048, blocks=32, smem=233472, reserved_smem=1024, reg_unit=256, sms=132),
    100: dict(regs=65536, threads=2048, blocks=32, smem=233472, reserved_smem=1024, reg_unit=256, sms=148),
}


def cache_dir() -> Path:
    d = Path(os.environ.get("RLHF_FAST_STATIC_CACHE", Path.home() / ".cache" / "rlhf_fast" / "static"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------
# tools
def triton_bin(name: str) -> str:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: the static profile needs the Triton wheel's {name}")
    return str(p)


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


def _cached_text(key: str, suffix: str, make) -> str:
    """make() -> str, cached on disk under key (sha256 hex)."""
    p = cache_dir() / f"{key}.{suffix}"
    if p.exists():
        return p.read_text()
    text = make()
    tmp = p.with_suffix(p.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(p)
    return text


def sass_of(cubin: bytes) -> str:
    def make():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            return _run([triton_bin("cuobjdump"), "-sass", f.name]).stdout
    return _cached_text(hashlib.sha256(cubin).hexdigest(), "sass", make)


# ---------------------------------------------------------------------------------------------
# parsers (tested on small known inputs in tests/test_static_profile.py)
@dataclasses.dataclass
class PtxasInfo:
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int


_FN_RE = re.compile(r"Function properties for (\S+)")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Compiling entry function '(\S+)'|Used (\d+) registers(.*)")


def parse_ptxas(log: str) -> dict[str, PtxasInfo]:
    """``ptxas -v`` output -> {mangled entry name: PtxasInfo}."""
    out: dict[str, PtxasInfo] = {}
    props: dict[str, tuple[int, int, int]] = {}
    current = None
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = _FN_RE.search(line)
        if m and i + 1 < len(lines):
            s = _SPILL_RE.search(lines[i + 1])
            if s:
                props[m.group(1)] = (int(s.group(1)), int(s.group(2)), int(s.group(3)))
            continue
        m = _USED_RE.search(line)
        if not m:
            continue
        if m.group(1):
            current = m.group(1)
        elif current is not None:
            smem = re.search(r"(\d+) bytes smem", m.group(3))
            stack, st, ld = props.get(current, (0, 0, 0))
            out[current] = PtxasInfo(int(m.group(2)), st, ld, stack, int(smem.group(1)) if smem else 0)
            current = None
    return out


@dataclasses.dataclass
class Instr:
    addr: int
    op: str        # opcode with modifiers, e.g. "LDG.E.128"
    text: str
    target: int | None = None  # branch target address


_INSTR_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(sass: str) -> dict[str, list[Instr]]:
    """``cuobjdump -sass`` output -> {function name: instructions in address order}."""
    funcs: dict[str, list[Instr]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _INSTR_RE.search(line)
        if m and cur is not None:
            op, rest = m.group(2), m.group(3)
            target = None
            if op.split(".")[0] in ("BRA", "BRX", "JMP"):
                t = re.search(r"0x([0-9a-f]+)", rest)
                target = int(t.group(1), 16) if t else None
            cur.append(Instr(int(m.group(1), 16), op, line.strip(), target))
    return funcs


def access_bits(op: str) -> int:
    """Width in bits of one LDG/STG per thread, from its modifiers (LDG.E.128, LDG.E.U16, STG.E, ...)."""
    mods = op.split(".")[1:]
    for w in ("256", "128", "64"):
        if w in mods:
            return int(w)
    if any(m in ("U16", "S16") for m in mods):
        return 16
    if any(m in ("U8", "S8") for m in mods):
        return 8
    return 32


def is_global_load(op: str) -> bool:
    return op.split(".")[0] == "LDG"


def is_global_store(op: str) -> bool:
    return op.split(".")[0] in ("STG", "RED", "ATOMG")


@dataclasses.dataclass
class Loop:
    start: int
    end: int
    body: list[Instr]

    @property
    def loads(self):
        return [i for i in self.body if is_global_load(i.op)]

    @property
    def stores(self):
        return [i for i in self.body if is_global_store(i.op)]

    @property
    def load_bytes(self):
        return sum(access_bits(i.op) for i in self.loads) // 8


_ADDR_RE = re.compile(r"\[(R\d+)(?:\.64)?\s*(?:\+\s*(-?0x[0-9a-f]+))?\s*\]\s*$")


def load_address(text: str) -> tuple[str, int] | None:
    """(base register, immediate offset) of a global load's address: 'LDG.E.64 R2, desc[UR8][R24.64+-0x800] ;'
    -> ('R24', -0x800); None where the address is not register + immediate."""
    m = _ADDR_RE.search(text.split(";")[0].rstrip())
    return (m.group(1), int(m.group(2) or "0", 16)) if m else None


def grouped_load_bytes(loop: Loop, pack: int = 16) -> int:
    """The loop's global-load bytes with straddled groups counted once: a Triton forward row off a 16-byte boundary
    reads each 16-byte group from the two aligned packs it straddles, and ptxas trims each load to the words the
    group uses; two loads off one base register in adjacent packs, together under 2·pack bytes, are one group
    (pack bytes). Whole-pack pairs and other loads count their own bytes."""
    by_base: dict[str, list[tuple[int, int]]] = {}
    total = 0
    for i in loop.loads:
        a = load_address(i.text)
        if a is None:
            total += access_bits(i.op) // 8
        else:
            by_base.setdefault(a[0], []).append((a[1], access_bits(i.op) // 8))
    for accesses in by_base.values():
        accesses.sort()
        k = 0
        while k < len(accesses):
            (o1, b1), nxt = accesses[k], accesses[k + 1] if k + 1 < len(accesses) else None
            if nxt and nxt[0] // pack == o1 // pack + 1 and b1 + nxt[1] < 2 * pack:
                total += pack
                k += 2
            else:
                total += b1
                k += 1
    return total


def loops_of(instrs: list[Instr]) -> list[Loop]:
    """Innermost loops: back-edges (a branch to an address at or before itself) not containing another."""
    spans = [(i.target, i.addr) for i in instrs if i.target is not None and i.target <= i.addr]
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [Loop(a, b, [i for i in instrs if a <= i.addr <= b and i.op != "NOP"]) for a, b in sorted(set(inner))]


def hot_loop(instrs: list[Instr]) -> Loop | None:
    """The innermost loop that loads the most bytes from global memory per iteration (None: no such loop)."""
    cands = [lp for lp in loops_of(instrs) if lp.loads]
    return max(cands, key=lambda lp: (lp.load_bytes, len(lp.body))) if cands else None


def cuda_row_elements(lp: Loop, itemsize: int) -> float | None:
    """Elements one thread folds in per iteration of a CUDA row loop: bytes loaded / element size, a group read
    from the two packs it straddles counted once (grouped_load_bytes)."""
    if not lp.loads:
        return None
    return grouped_load_bytes(lp) / itemsize


def exp_count(lp: Loop) -> int:
    """MUFU.EX2 in a loop: one per element, plus one per group for the forward's rebase (a cross-check of
    the element count)."""
    return sum(1 for i in lp.body if i.op.startswith("MUFU.EX2"))


def occupancy(arch: int, regs: int, threads: int, smem: int) -> dict:
    """Theoretical blocks and warps per SM (CUDA occupancy calculator rules) for one block size."""
    a = ARCHS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / a["reg_unit"]) * a["reg_unit"]
    by_regs = (a["regs"] // regs_per_warp) // warps
    by_threads = a["threads"] // (warps * 32)
    by_smem = a["smem"] // (smem + a["reserved_smem"])
    blocks = min(a["blocks"], by_regs, by_threads, by_smem)
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps,
                occupancy=round(blocks * warps / (a["threads"] // 32), 4),
                limited_by=min((by_regs, "registers"), (by_threads, "threads"), (by_smem, "shared memory"),
                               (a["blocks"], "blocks"))[1])


def loop_metrics(instrs: list[Instr], elems_per_thread) -> dict:
    """load/store widths and SASS per element of the hot loop. elems_per_thread(loop) -> float."""
    lp = hot_loop(instrs)
    if lp is None:  # straight-line kernel: profile its whole body
        body = [i for i in instrs if i.op != "NOP"]
        lp = Loop(body[0].addr, body[-1].addr, body) if body else None
        kind = "straight-line"
    else:
        kind = "loop"
    if lp is None:
        return {}
    loads, stores = lp.loads, lp.stores
    e = elems_per_thread(lp)
    # every loop that loads, for kernels that pick a path at run time (e.g. vector body vs scalar fallback)
    loading = [dict(span=f"{x.start:#x}-{x.end:#x}", instructions=len(x.body), load_bytes=x.load_bytes,
                    load_widths=sorted({access_bits(i.op) for i in x.loads}), loads=len(x.loads),
                    grouped_bytes=grouped_load_bytes(x), elements=elems_per_thread(x),
                    exp2=exp_count(x)) for x in loops_of(instrs) if x.loads]
    return dict(hot_loop=kind, hot_loop_span=f"{lp.start:#x}-{lp.end:#x}", hot_loop_instructions=len(lp.body),
                loading_loops=loading,
                load_bits=min((access_bits(i.op) for i in loads), default=None),
                store_bits=min((access_bits(i.op) for i in stores), default=None),
                load_widths=sorted({access_bits(i.op) for i in loads}),
                loads_per_iter=len(loads), stores_per_iter=len(stores),
                elements_per_thread_iter=e, exp2_per_iter=exp_count(lp),
                sass_per_element=round(len(lp.body) / e, 2) if e else None)


# ---------------------------------------------------------------------------------------------
# Triton: capture the launchers' own launches
@dataclasses.dataclass
class Launch:
    op: str
    stage: str      # fwd / bwd
    dtype: str
    V: int | None
    row_stride: int | None
    fn: object      # JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object

    @property
    def kernel(self):
        return self.fn.fn.__name__

    @property
    def block(self):
        vals = [v for (k,), v in ((k, v) for k, v in self.constexprs.items())
                if self.fn.arg_names[k].startswith("BLOCK") and isinstance(v, int)]
        return math.prod(vals) if vals else None


@contextlib.contextmanager
def capture_triton(target, sink: list, meta: dict):
    """Inside: every ``kernel[grid](...)`` launch appends (fn, signature, constexprs, attrs, options) to sink
    instead of running; the specialisation is computed by triton.runtime.jit's own binder for ``target``."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime import jit as tjit

    backend = make_backend(target)
    orig = tjit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        # as JITFunction.run, minus the device queries and the launch
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = tjit.create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        sink.append(Launch(fn=self, signature=signature, constexprs=constexprs, attrs=attrs, options=options,
                           **meta))
        return None

    tjit.JITFunction.run = run
    try:
        yield
    finally:
        tjit.JITFunction.run = orig


def _stage(meta, stage):
    return dict(meta, stage=stage)


def _drive_logprobs(torch, fns, dtype, V, sliced, device, launches, target):
    width = V + 3 if sliced else V
    buf = torch.zeros(N_ROWS, width, dtype=dtype, device=device)
    x = (buf[:, :V] if sliced else buf).requires_grad_(True)
    labels = torch.zeros(N_ROWS, dtype=torch.long, device=device)
    meta = dict(op="logprobs", dtype=str(dtype).replace("torch.", ""), V=V, row_stride=width)
    with capture_triton(target, launches, _stage(meta, "fwd")):
        logp, ent = fns["logprobs"](x, labels, 1.0, -100, True)
    with capture_triton(target, launches, _stage(meta, "bwd")):
        (logp.sum() + ent.sum()).backward()


def _drive_ppo_from_logits(torch, fns, dtype, V, sliced, device, launches, target):
    B, T = N_ROWS // 512, 512
    width = V + 3 if sliced else V
    buf = torch.zeros(B, T, width, dtype=dtype, device=device)
    x = (buf[..., :V] if sliced else buf).requires_grad_(True)
    f32 = dict(dtype=torch.float32, device=device)
    labels = torch.zeros(B, T, dtype=torch.long, device=device)
    old, adv, ref = (torch.zeros(B, T, **f32) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    meta = dict(op="ppo_loss_from_logits", dtype=str(dtype).replace("torch.", ""), V=V, row_stride=width)
    with capture_triton(target, launches, _stage(meta, "fwd")):
        loss, _ = fns["ppo_loss_from_logits"](x, labels, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                              entropy_coef=0.01)
    with capture_triton(target, launches, _stage(meta, "bwd")):
        loss.backward()


def _drive_token_ops(torch, fns, device, launches, target):
    """One representative config per elementwise / scan kernel: fp32, B = 64 sequences of T = 4096."""
    B, T, G = 64, 4096, 8
    f32 = dict(dtype=torch.float32, device=device)

    def req(*shape):
        return torch.zeros(*shape, **f32).requires_grad_(True)

    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    meta = dict(dtype="float32", V=None, row_stride=None)
    cases = [
        ("kl", lambda: fns["kl"](req(B, T), req(B, T), "k3")),
        ("ppo_policy_loss", lambda: fns["ppo_policy_loss"](req(B, T), req(B, T), req(B, T), mask)[0]),
        ("ppo_value_loss", lambda: fns["ppo_value_loss"](req(B, T), req(B, T), req(B, T), mask)[0]),
        ("gae", lambda: fns["gae"](req(B, T), req(B, T), mask)[0]),
        ("grpo_advantages", lambda: fns["grpo_advantages"](req(B * G), G)),
        ("kl_penalized_rewards", lambda: fns["kl_penalized_rewards"](req(B), req(B, T), req(B, T), mask, 0.05)),
    ]
    for op, call in cases:
        if op not in fns:
            continue
        with capture_triton(target, launches, dict(meta, op=op, stage="fwd")):
            out = call()
        if out.requires_grad:
            with capture_triton(target, launches, dict(meta, op=op, stage="bwd")):
                out.sum().backward()


def triton_launches(target) -> list[Launch]:
    import torch

    import rlhf_fast  # noqa: F401  (registers the backends)
    from rlhf_fast import _backend

    fns = {op: impls["triton"] for op, impls in _backend._registry.items() if "triton" in impls}
    launches: list[Launch] = []
    for dtype in ROW_DTYPES:
        for V in VOCABS:
            for sliced in (False, True):
                for drive in (_drive_logprobs, _drive_ppo_from_logits):
                    drive(torch, fns, getattr(torch, dtype), V, sliced, "meta", launches, target)
    _drive_token_ops(torch, fns, "meta", launches, target)
    return launches


def _spec_key(lc: Launch, target) -> str:
    parts = [lc.fn.cache_key, lc.signature, sorted((str(k), str(v)) for k, v in lc.constexprs.items()),
             sorted((str(k), str(v)) for k, v in lc.attrs.items()), sorted(lc.options.__dict__.items()), str(target)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def compile_triton(lc: Launch, target) -> dict:
    """Compile one captured launch (Triton's own cache makes a repeat cheap); ptxas -v and SASS of it."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    k = triton.compile(ASTSource(lc.fn, lc.signature, lc.constexprs, lc.attrs), target=target,
                       options=lc.options.__dict__)
    cubin, ptx = k.asm["cubin"], k.asm["ptx"]
    key = hashlib.sha256(ptx.encode()).hexdigest()

    def ptxas_log():  # the flags of triton's make_cubin: same registers as the cubin it made
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "k.ptx"
            src.write_text(ptx)
            fmad = [] if lc.options.enable_fp_fusion else ["--fmad=false"]
            r = _run([get_ptxas(target.arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                      f"--gpu-name={sm_arch_from_capability(target.arch)}", str(src), "-o", str(Path(d) / "k.o")])
            return r.stdout + r.stderr

    info = parse_ptxas(_cached_text(key, "ptxas", ptxas_log))
    (name, pi), = info.items()
    funcs = parse_sass(sass_of(cubin))
    instrs = funcs[k.metadata.name] if k.metadata.name in funcs else next(iter(funcs.values()))
    return dict(regs=pi.regs, spill_stores=pi.spill_stores, spill_loads=pi.spill_loads, stack_bytes=pi.stack,
                smem_bytes=k.metadata.shared, num_warps=k.metadata.num_warps, instrs=instrs)


def triton_records(arch: int, jobs: int) -> list[dict]:
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    launches = triton_launches(target)
    keys = [_spec_key(lc, target) for lc in launches]
    uniq = dict(zip(reversed(keys), reversed(launches)))  # one compile per distinct specialisation
    with ThreadPoolExecutor(max(1, jobs)) as ex:  # triton.compile and ptxas release the GIL in their C++ / subprocesses
        compiled = dict(zip(uniq, ex.map(lambda lc: compile_triton(lc, target), uniq.values())))
    import torch

    records = []
    for lc, key in zip(launches, keys):
        c = compiled[key]
        warps = c["num_warps"]
        threads = 32 * warps
        is_row = lc.op in ROW_OPS
        itemsize = torch.empty(0, dtype=getattr(torch, lc.dtype)).element_size()

        def elems(loop, lc=lc, threads=threads):
            if is_row and loop.loads:
                return grouped_load_bytes(loop) / itemsize
            return lc.block / threads if lc.block else None

        rec = dict(kernel=lc.kernel, backend="triton", op=lc.op, row_kernel=is_row, stage=lc.stage, dtype=lc.dtype,
                   V=lc.V, row_stride=lc.row_stride, N=N_ROWS if is_row else None, block=lc.block, num_warps=warps,
                   regs=c["regs"], spill_bytes=c["spill_stores"] + c["spill_loads"], spill_stores=c["spill_stores"],
                   spill_loads=c["spill_loads"], smem_bytes=c["smem_bytes"],
                   divisible_by_16=[lc.fn.arg_names[k[0]] for k, v in lc.attrs.items()
                                    if ["tt.divisibility", 16] in v],
                   **occupancy(arch, c["regs"], threads, c["smem_bytes"]))
        rec.update(loop_metrics(c["instrs"], elems))
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# CUDA
def setup_nvcc_flags() -> list[str]:
    """The build's NVCC_FLAGS (rlhf_fast/_build.py, or setup.py in older trees), read from the source so
    that another tree's flags are read, not the imported one's."""
    for path in (tree() / "rlhf_fast" / "_build.py", tree() / "setup.py"):
        if not path.exists():
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
                return list(ast.literal_eval(node.value))
    module = ast.parse((tree() / "setup.py").read_text())
    for node in ast.walk(module):  # a setup.py from before NVCC_FLAGS: the list assigned to [...]["nvcc"]
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript)
                and isinstance(node.targets[0].slice, ast.Constant) and node.targets[0].slice.value == "nvcc"):
            return list(ast.literal_eval(node.value))
    raise RuntimeError(f"{tree() / 'setup.py'} defines no NVCC_FLAGS")


def nvcc_command(nvcc: str, src: Path, arch: int, out: Path, extra=()) -> list[str]:
    import torch

    os.environ.setdefault("CUDA_HOME", str(Path(nvcc).resolve().parent.parent))  # before cpp_extension reads it
    from torch.utils import cpp_extension as ce

    tinc = Path(torch.__file__).parent / "include"
    return [nvcc, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}", *setup_nvcc_flags(),
            *ce.COMMON_NVCC_FLAGS, f"-I{tree() / 'csrc'}", f"-I{tinc}", f"-I{tinc / 'torch/csrc/api/include'}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-Xptxas", "-v", *extra,
            str(src), "-o", str(out)]


def compile_cuda(nvcc: str, src: Path, arch: int, extra=()) -> tuple[str, bytes]:
    """(ptxas -v log, cubin) of one .cu file; cached on the sources, flags and nvcc."""
    deps = sorted((tree() / "csrc").glob("*.h")) + sorted((tree() / "csrc").glob("*.cuh")) + [src]
    h = hashlib.sha256()
    for p in deps:
        h.update(p.name.encode() + p.read_bytes())
    h.update(repr(nvcc_command(nvcc, Path("x"), arch, Path("y"), extra)).encode())
    key = h.hexdigest()
    cub = cache_dir() / f"{key}.cubin"
    log = cache_dir() / f"{key}.nvcclog"
    if not (cub.exists() and log.exists()):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "k.cubin"
            r = subprocess.run(nvcc_command(nvcc, src, arch, out, extra), capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{r.stderr[-4000:]}")
            shutil.copy(out, cub.with_suffix(f".{os.getpid()}.tmp"))
            cub.with_suffix(f".{os.getpid()}.tmp").replace(cub)
            log.write_text(r.stdout + r.stderr)
    return log.read_text(), cub.read_bytes()


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt:
        return {n: n for n in names}
    out = _run([filt], input="\n".join(names)).stdout.splitlines()
    return dict(zip(names, out))


_CU_DTYPES = {"c10::BFloat16": "bfloat16", "c10::Half": "float16", "float": "float32", "double": "float64"}


def short_cuda_name(demangled: str) -> tuple[str, str | None]:
    """'void rlhf_fast::(anonymous namespace)::fl_rows_kernel<c10::BFloat16, float>(...)'
    -> ('fl_rows_kernel<c10::BFloat16, float>', 'bfloat16'): the name with its template arguments, and the
    dtype of the first floating-point template argument."""
    s = demangled.replace("(anonymous namespace)::", "").replace("rlhf_fast::", "").removeprefix("void ")
    name = s.split("(")[0].strip()
    m = re.search(r"c10::BFloat16|c10::Half|\bfloat\b|\bdouble\b", name)
    return name, _CU_DTYPES[m.group(0)] if m else None


def _cuda_block_sizes() -> tuple[dict[str, list[int]], dict[str, dict[int, int]]]:
    """Threads per block of each CUDA kernel at its launch sites, where the block expression evaluates from
    the source (integer literals, namespace constexprs, threads_for(V) at the benchmark vocabularies):
    ({kernel: [threads]}, {kernel: {V: threads}} for the kernels launched with threads_for(V))."""
    consts: dict[str, int] = {}
    srcs = {p: p.read_text() for p in sorted((tree() / "csrc").glob("*.cu*"))}
    for text in srcs.values():
        for m in re.finditer(r"constexpr\s+(?:int|int64_t|unsigned)\s+(\w+)\s*=\s*([^;]+);", text):
            try:
                consts[m.group(1)] = int(eval(m.group(2).replace("int64_t(1)", "1"), {"__builtins__": {}}, consts))
            except Exception:  # noqa: BLE001  (an expression this small evaluator does not handle)
                pass
    funcs = {}
    for text in srcs.values():
        m = re.search(r"int\s+threads_for\(int64_t V\)\s*\{\s*return ([^;]+);", text)
        if m:  # C ternaries a ? b : c -> Python, right-associative
            expr = m.group(1)
            while "?" in expr:
                expr = re.sub(r"([^?:()]+)\?([^?:]+):([^?:]+)$", r"(\2 if \1 else \3)", expr, count=1)
                expr = re.sub(r"\(([^?:()]+)\?([^?:()]+):(\([^()]*\))\)", r"(\2 if \1 else \3)", expr)
            funcs["threads_for(V)"] = expr
    sizes: dict[str, set] = {}
    per_vocab: dict[str, dict[int, int]] = {}
    for text in srcs.values():
        for m in re.finditer(r"(\w+)(?:<[^<>;]*>)?<<<[^,]+,\s*([^,]+?),", text):
            expr = m.group(2).strip()
            vals = set()
            if expr in funcs:
                for V in VOCABS:
                    try:
                        t = int(eval(funcs[expr], {"__builtins__": {}}, {"V": V}))
                    except Exception:  # noqa: BLE001
                        continue
                    vals.add(t)
                    per_vocab.setdefault(m.group(1), {})[V] = t
            else:
                try:
                    vals.add(int(eval(expr, {"__builtins__": {}}, consts)))
                except Exception:  # noqa: BLE001  (a runtime variable: occupancy left unknown)
                    pass
            sizes.setdefault(m.group(1), set()).update(vals)
    return {k: sorted(v) for k, v in sizes.items()}, per_vocab


def cuda_records(arch: int, jobs: int) -> list[dict]:
    nvcc = find_nvcc()
    if nvcc is None:
        print("static_profile: no nvcc (CUDA_HOME, /usr/local/cuda, PATH): CUDA kernels skipped", file=sys.stderr)
        return []
    srcs = sorted((tree() / "csrc").glob("*.cu"))
    with ThreadPoolExecutor(max(1, jobs)) as ex:
        built = list(ex.map(lambda s: compile_cuda(nvcc, s, arch), srcs))
    blocks, vocab_blocks = _cuda_block_sizes()
    records = []
    for src, (log, cubin) in zip(srcs, built):
        info = parse_ptxas(log)
        funcs = parse_sass(sass_of(cubin))
        names = demangle(list(funcs))
        for mangled, instrs in funcs.items():
            pi = info.get(mangled)
            if pi is None:
                continue
            name, dtype = short_cuda_name(names[mangled])
            base = name.split("<")[0]
            is_row = base in ("logprobs_fwd_kernel", "logprobs_bwd_kernel", "fl_rows_kernel", "fl_bwd_kernel")
            itemsize = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}.get(dtype or "", 4)
            m = loop_metrics(instrs, lambda lp: cuda_row_elements(lp, itemsize))
            stage = "bwd" if "bwd" in base else "fwd"
            # a row kernel's block follows V (threads_for): one record per vocabulary; V and the row stride
            # are runtime arguments, so its SASS is the same for every V and stride (head/tail peeled at run time)
            configs = ([(V, t) for V, t in vocab_blocks.get(base, {}).items()] if is_row and vocab_blocks.get(base)
                       else [(None, t) for t in blocks.get(base) or [None]])
            for V, threads in configs:
                rec = dict(kernel=name, backend="cuda", op=src.stem.replace("_cuda", ""), row_kernel=is_row,
                           stage=stage, dtype=dtype,
                           V=V, row_stride=None, N=None, block=threads,
                           num_warps=threads // 32 if threads else None, regs=pi.regs,
                           spill_bytes=pi.spill_stores + pi.spill_loads, spill_stores=pi.spill_stores,
                           spill_loads=pi.spill_loads, smem_bytes=pi.smem)
                if threads:
                    rec.update(occupancy(arch, pi.regs, threads, pi.smem))
                else:
                    rec.update(blocks_per_sm=None, warps_per_sm=None, occupancy=None, limited_by=None)
                rec.update(m)
                records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
COLUMNS = ["kernel", "op", "stage", "dtype", "V", "row_stride", "block", "num_warps", "regs", "spill_bytes",
           "smem_bytes", "blocks_per_sm", "occupancy", "load_bits", "store_bits", "sass_per_element"]
SECTIONS = [(f"Triton, logits-row kernels (N = {N_ROWS} rows)", lambda r: r["backend"] == "triton" and r["row_kernel"]),
            ("Triton, per-token / scan kernels (fp32, B = 64, T = 4096)",
             lambda r: r["backend"] == "triton" and not r["row_kernel"]),
            ("CUDA, logits-row kernels (V, row stride and head/tail are runtime: one SASS for all shapes; "
             "block = threads_for(V))", lambda r: r["backend"] == "cuda" and r["row_kernel"]),
            ("CUDA, other kernels", lambda r: r["backend"] == "cuda" and not r["row_kernel"])]


def markdown(arch: int, records: list[dict]) -> str:
    lines = [f"# Static GPU profile, sm_{arch} (compiler output, no GPU run)", "",
             "Generated by `python -m benchmarks.static_profile`; benchmarks/static_profile.py says how each column "
             "is derived. row_stride = V + 3 is the sliced view buf[:, :V] of a wider buffer. load/store bits: the "
             "narrowest global access per thread in the hot loop. sass_per_element: SASS instructions of the hot "
             "loop per element one thread handles in an iteration. occupancy: theoretical warps per SM / max "
             "(64).", ""]
    for title, keep in SECTIONS:
        rows = [r for r in records if keep(r)]
        if not rows:
            continue
        lines += [f"## {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def profile(arch: int, jobs: int, cuda: bool = True) -> list[dict]:
    recs = triton_records(arch, jobs)
    if cuda:
        recs += cuda_records(arch, jobs)
    for r in recs:
        r["arch"] = f"sm_{arch}"
    return recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80, 100], choices=sorted(ARCHS))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-cuda", action="store_true", help="Triton kernels only")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("static_profile: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        recs = profile(arch, args.jobs, cuda=not args.no_cuda)
        (args.out / f"sm_{arch}.json").write_text(  # one record per line: diffs show what changed
            "[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n")
        (args.out / f"sm_{arch}.md").write_text(markdown(arch, recs))
        print(f"static_profile: {len(recs)} records -> {args.out / f'sm_{arch}.json'}")


if __name__ == "__main__":
    main()
