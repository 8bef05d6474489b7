"""The CUDA logits-row kernels' per-thread code on the CPU (no GPU here): csrc/row_math.cuh compiled for the
host by tests/csrc/row_math_emulator.cpp, run thread by thread with the kernels' merge order, against the float64
reference. Covers what the CUDA forward/backward do per row: the 16-byte groups read at every offset from a
16-byte boundary (two straddling packs, compile-time realignment), the running triple and its merges, -inf /
NaN / huge logits, the label's column fixed by its owner thread, in place or not, head/body/tail, ignored and
out-of-range labels; each with an exact 2^u and with a stand-in for ex2.approx.ftz (its error bound, flush to
zero). Not covered (GPU only): ex2.approx itself, the ld.global.nc asm, the cross-block merge's memory ordering,
scheduling."""
import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rlhf_fast import reference as ref

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("g++") or shutil.which("c++")
CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.fixture(scope="module", params=["exp2", "ex2.approx"])
def lib(request, tmp_path_factory):
    """The emulator with an exact 2^u, and with a stand-in for the GPU's ex2.approx.ftz (relative error 2^-21 both
    ways, results under 2^-126 flushed to 0): the reference bounds must hold for both."""
    if CXX is None:
        pytest.skip("no C++ compiler for the CUDA row emulator")
    so = tmp_path_factory.mktemp("emu") / "row_math_emulator.so"
    approx = ["-DEMULATE_EX2_APPROX"] if request.param == "ex2.approx" else []
    r = subprocess.run([CXX, "-O2", "-std=c++20", "-shared", "-fPIC", *approx, f"-I{ROOT / 'csrc'}",
                        str(ROOT / "tests" / "csrc" / "row_math_emulator.cpp"), "-o", str(so)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    i64, dbl, vp = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    lib.rf_emu_fwd.argtypes = [ctypes.c_int, vp, i64, i64, ctypes.c_int, dbl, ctypes.POINTER(dbl)]
    lib.rf_emu_split.argtypes = [ctypes.c_int, i64, ctypes.c_int]
    lib.rf_emu_bwd.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, i64, i64, ctypes.c_int, ctypes.c_int,
                               dbl, dbl, dbl, dbl, dbl, dbl]
    return lib


def vec(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def placed(values, offset, dtype):
    """`values` (1-D) copied into a fresh buffer so that element 0 lies `offset` elements past a 16-byte boundary."""
    V, es = values.numel(), values.element_size() if values.dtype == dtype else torch.empty((), dtype=dtype).element_size()
    buf = torch.full((V + 64,), float("nan"), dtype=dtype)  # NaN around the row: a read outside it would show
    start = next(s for s in range(64) if (buf.data_ptr() + s * es) % 16 == (offset * es) % 16 and s >= 8)
    out = buf[start:start + V]
    out.copy_(values.to(dtype))
    return out


def fwd(lib, row, label, nthreads=128, T=1.0):
    out = (ctypes.c_double * 5)()
    lib.rf_emu_fwd(CODES[row.dtype], row.data_ptr(), row.numel(), label, nthreads, 1.0 / T, out)
    return list(out)  # logp, entropy, lse, m, log_s


def reference_fwd(row, label, T):
    x = row.double()[None]
    logp, ent = ref.logprobs(x, torch.tensor([label]), temperature=T, return_entropy=True)
    return logp.item(), ent.item(), torch.logsumexp(x / T, -1).item()


def tol(dtype):
    return 1e-12 if dtype == torch.float64 else 3e-5


def close(a, b, t):
    return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= t * max(1.0, abs(b))


# ------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V, nthreads", [(1, 128), (5, 128), (8, 128), (9, 128), (33, 128), (1000, 128), (4099, 512),
                                         (20011, 32)])
def test_forward_matches_reference_at_every_offset(lib, dtype, V, nthreads):
    if V == 20011:  # 32 threads: a row of > 512 groups is split over blocks, merged in order by its last block
        assert lib.rf_emu_split(CODES[dtype], V, nthreads) >= 5
    g = torch.Generator().manual_seed(V)
    values = (torch.randn(V, generator=g, dtype=torch.float64) * 3).to(dtype)
    for T in (1.0, 0.7):
        for label in sorted({0, V // 2, V - 1}):
            want = reference_fwd(values, label, T)
            first = None
            for offset in range(vec(dtype)):
                got = fwd(lib, placed(values, offset, dtype), label, nthreads, T)
                for name, a, b in zip(("logp", "entropy", "lse"), got, want):
                    assert close(a, b, tol(dtype)), (name, dtype, V, T, label, offset, a, b)
                # batch invariance: the groups follow column indices, so every offset gives the same bits
                first = first or got
                assert got == first, (offset, got, first)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_special_values(lib, dtype):
    V = 300
    base = torch.randn(V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cases = {}
    x = base.clone(); x[::7] = -math.inf; cases["some -inf"] = (x, 3)
    x = base.clone(); x[::7] = -math.inf; cases["label at -inf"] = (x, 7)
    x = base.clone(); x[11] = math.nan; cases["one NaN"] = (x, 3)
    x = torch.full((V,), -math.inf, dtype=torch.float64); x[250] = math.nan; cases["NaN among -inf"] = (x, 3)
    x = torch.full((V,), -math.inf, dtype=torch.float64); cases["all -inf"] = (x, 3)
    x = torch.full((V,), -math.inf, dtype=torch.float64); x[299] = 2.0; cases["one finite, at the tail"] = (x, 299)
    if dtype != torch.bfloat16:  # bf16 cannot hold 1e4 + small differences
        cases["huge"] = (base + 1.0e4, 5)
    x = base.clone(); x[42] = math.inf; cases["+inf"] = (x, 3)
    # the running max jumps from the lowest finite value to ~3e38: m_old - m_new overflows to -inf unless clamped
    x = torch.full((V,), -math.inf, dtype=torch.float64); x[100] = 3.0e38; x[200] = 2.9e38; cases["~max float"] = (x, 100)
    for name, (x, label) in cases.items():
        x = x.to(dtype)
        want = reference_fwd(x, label, 1.0)
        for offset in range(vec(dtype)):
            got = fwd(lib, placed(x, offset, dtype), label)
            t = 1e-4 if name == "huge" and dtype == torch.float32 else tol(dtype)
            for what, a, b in zip(("logp", "entropy"), got, want):
                assert close(a, b, t), (name, what, offset, a, b)
            if name in ("one NaN", "NaN among -inf", "+inf"):
                assert math.isnan(got[0]) and math.isnan(got[1]), (name, got)


# ------------------------------------------------------------------------------------------------ backward
def reference_grad(values, label, T, g_lp, g_ent):
    x = values.double().clone().requires_grad_(True)
    logp, ent = ref.logprobs(x[None], torch.tensor([label]), temperature=T, return_entropy=True)
    (g_lp * logp.sum() + g_ent * ent.sum()).backward()
    return x.grad


def bwd(lib, row, orow, label, stats, T, g_lp, g_ent, two_part, ignored=False, nthreads=128):
    logp, ent, lse, m, log_s = stats
    inv_t = 1.0 / T
    shift, ls = (m, log_s) if two_part else (0.0, lse)
    lib.rf_emu_bwd(CODES[row.dtype], int(two_part), row.data_ptr(), orow.data_ptr(), row.numel(), label, int(ignored),
                   nthreads, g_lp * inv_t, g_ent * inv_t, shift, ls, ent, inv_t)
    return orow


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("two_part", [False, True], ids=["lse", "two-part"])
@pytest.mark.parametrize("V, nthreads", [(1003, 128), (20011, 32)], ids=["one-block", "split"])
def test_backward_matches_reference(lib, dtype, two_part, V, nthreads):
    T, g_lp, g_ent = 0.8, 0.7, -0.3
    values = (torch.randn(V, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2).to(dtype)
    VEC = vec(dtype)
    # in the head, the body (the first and a later span when split) and the tail
    for label in (0, 1, VEC + 3, 517, V // 2 + 1, V - 2, V - 1):
        want = reference_grad(values, label, T, g_lp, g_ent)
        outs = []
        for x_off, o_off, inplace in [(0, 0, False), (3 % VEC, 3 % VEC, False), (1 % VEC, 0, False),
                                      (VEC - 1, VEC - 1, True), (2 % VEC, 2 % VEC, True)]:
            row = placed(values, x_off, dtype)
            stats = fwd(lib, row, label, nthreads, T)
            orow = row if inplace else placed(torch.zeros(V), o_off, dtype)
            got = bwd(lib, row, orow, label, stats, T, g_lp, g_ent, two_part, nthreads=nthreads).double()
            t = 1e-10 if dtype == torch.float64 else (2e-6 if dtype == torch.float32 else 0)
            err = (got - want).abs()
            bound = t + (2.0 ** -8 if dtype == torch.bfloat16 else 1e-5) * want.abs()
            assert (err <= bound).all(), (label, x_off, o_off, inplace, err.max().item(), int(err.argmax()))
            outs.append(got)
        # elementwise: the path (vector body or scalar, in place or not) never changes an element
        assert all(torch.equal(o, outs[0]) for o in outs), label


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V, nthreads", [(77, 128), (20011, 32)], ids=["one-block", "split"])
def test_backward_ignored_and_bad_labels_are_not_read(lib, dtype, V, nthreads):
    values = torch.full((V,), math.nan, dtype=dtype)  # reading the row would show as NaN in the zero fill
    for offset in range(vec(dtype)):
        row = placed(values, offset, dtype)
        out = placed(torch.ones(V), offset, dtype)
        bwd(lib, row, out, 5, [0.0] * 5, 1.0, 1.0, 1.0, False, ignored=True, nthreads=nthreads)
        assert torch.equal(out, torch.zeros(V, dtype=dtype))
        for bad in (-1, V, 10 ** 9):
            out = placed(torch.ones(V), offset, dtype)
            bwd(lib, placed(torch.randn(V), offset, dtype), out, bad, [0.0] * 5, 1.0, 1.0, 1.0, True, nthreads=nthreads)
            assert out.isnan().all(), bad
