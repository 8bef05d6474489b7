"""Edge cases of the Triton logprobs kernels (rlhf_fast/ops/logprobs.py) beyond tests/test_logprobs.py:
odd vocabularies, -inf rows, fp64 temperature, N = 0 without a launch, the in-place backward,
determinism, and an ahead-of-time compile for sm_90 (what the interpreter cannot check)."""

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref
from test_logprobs import _check
from utils import DEVICE, GRAD_TOL, assert_rel, backends

if "triton" not in backends("logprobs"):
    pytest.skip(f"the triton backend cannot run here: {rf.why_unavailable('triton')}", allow_module_level=True)

from rlhf_fast.ops import logprobs as tlp  # noqa: E402  (imports triton)


def _randn(*shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_of_one(dtype):
    logits = _randn(5, 1, dtype=dtype)
    labels = torch.zeros(5, dtype=torch.long, device=DEVICE)
    lp, ent = rf.logprobs(logits, labels, return_entropy=True, backend="triton")
    assert (lp == 0).all() and (ent == 0).all()
    _check("triton", logits, labels)


@pytest.mark.parametrize("V", [4099, 65537])  # primes: every block boundary and the tail are exercised
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prime_and_large_vocab(V, dtype):
    labels = torch.randint(0, V, (2,), device=DEVICE)
    labels[1] = V - 1  # the label in the masked tail block
    _check("triton", _randn(2, V, dtype=dtype), labels)


def test_vocab_262144():
    V = 262144
    _check("triton", _randn(1, V), torch.tensor([V // 2 + 3], device=DEVICE))


def test_all_neg_inf_but_label_across_blocks():
    # several whole blocks of -inf before the first finite value: the running max stays -inf there
    V = 3 * 4096 + 5
    logits = torch.full((3, V), float("-inf"), device=DEVICE)
    labels = torch.tensor([V - 1, 9000, 3], device=DEVICE)
    logits[0, V - 1] = -7.0
    logits[1, 9000] = 2.0
    logits[1, 11000] = 1.0  # two finite values in different blocks
    logits[2, 3] = 0.5
    logits[2, 5000:5010] = torch.randn(10) - 50  # all-negative finite values
    lp, ent = rf.logprobs(logits, labels, return_entropy=True, backend="triton")
    assert lp[0] == 0 and ent[0] == 0
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    _check("triton", logits, labels)


def test_label_at_neg_inf_in_neg_inf_row():
    logits = torch.full((1, 70), float("-inf"), device=DEVICE)
    logits[0, 5] = 1.0
    lp, ent = rf.logprobs(logits, torch.tensor([6], device=DEVICE), return_entropy=True, backend="triton")
    assert lp[0] == float("-inf") and ent[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.6, 1.3e-3, 7.0])
def test_temperature(dtype, temperature):
    # fp64 rows get 1/T to ~1e-14 (an fp32 pair), not just fp32's 6e-8
    logits = _randn(4, 1000, dtype=dtype, scale=3.0 * min(1.0, temperature))
    _check("triton", logits, torch.randint(0, 1000, (4,), device=DEVICE), temperature=temperature)


def test_ignored_rows_exact_zeros():
    V = 5000
    logits = _randn(5, V, dtype=torch.bfloat16).requires_grad_()
    labels = torch.tensor([3, 3, 17, 3, 4999], device=DEVICE)  # ignore_index = 3 is also a valid id
    lp, ent = rf.logprobs(logits, labels, ignore_index=3, return_entropy=True, backend="triton")
    ign = labels == 3
    assert (lp[ign] == 0).all() and (ent[ign] == 0).all() and (lp[~ign] < 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (logits.grad[ign] == 0).all() and (logits.grad[~ign] != 0).any(-1).all()
    all_ignored = torch.full((5,), -100, device=DEVICE)
    _check("triton", logits.detach(), all_ignored)


def test_empty_launches_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"kernel launched with grid {grid} for N = 0")

    monkeypatch.setattr(tlp, "_logprobs_fwd_kernel", NoLaunch())
    monkeypatch.setattr(tlp, "_logprobs_bwd_kernel", NoLaunch())
    x = torch.randn(0, 70000, device=DEVICE, requires_grad=True)
    lp, ent = tlp.logprobs(x, torch.zeros(0, dtype=torch.long, device=DEVICE), return_entropy=True)
    assert lp.shape == ent.shape == (0,) and lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 70000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_inplace_backward(dtype, entropy):
    """Same gradient as the normal backward, written into the logits buffer itself."""
    N, H, V = 6, 8, 1500
    h = _randn(N, H, dtype=dtype, scale=1.0).requires_grad_()
    w = _randn(H, V, dtype=dtype, scale=1.0)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[2] = -100
    g_lp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)

    def run(fn):
        logits = h @ w  # a non-leaf, as it comes out of the lm_head
        seen = {}
        logits.register_hook(lambda g: seen.update(ptr=g.data_ptr(), grad=g.clone()))
        out = fn(logits, labels, temperature=0.8, return_entropy=entropy)
        seen["logits"] = logits.detach().clone()  # before the in-place backward overwrites them
        loss = (out[0] * g_lp).sum() + (out[1] * g_ent).sum() if entropy else (out * g_lp).sum()
        h.grad = None
        loss.backward()
        return out, seen, logits.data_ptr(), h.grad.clone()

    def normal(logits, labels, **kw):
        return rf.logprobs(logits, labels, backend="triton", **kw)

    out_n, seen_n, ptr_n, gh_n = run(normal)
    out_i, seen_i, ptr_i, gh_i = run(tlp.logprobs_inplace_backward)
    assert seen_i["ptr"] == ptr_i, "the in-place backward did not write into the logits buffer"
    assert seen_n["ptr"] != ptr_n
    for a, b in zip(out_i if entropy else [out_i], out_n if entropy else [out_n]):
        assert torch.equal(a, b)
    assert torch.equal(seen_i["grad"], seen_n["grad"])
    assert torch.equal(gh_i, gh_n)
    # and both against the float64 reference on the same logits
    x64 = seen_n["logits"].double().requires_grad_()
    lp64, ent64 = ref.logprobs(x64, labels, 0.8, -100, True)
    ((lp64 * g_lp).sum() + ((ent64 * g_ent).sum() if entropy else 0)).backward()
    assert_rel(seen_i["grad"], x64.grad, GRAD_TOL[dtype], "in-place grad logits")


def test_inplace_backward_refuses_a_second_backward():
    logits = torch.randn(3, 40, device=DEVICE, requires_grad=True) * 2
    lp = tlp.logprobs_inplace_backward(logits, torch.tensor([1, 2, 3], device=DEVICE))
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        lp.sum().backward()


def test_inplace_backward_checks_input():
    with pytest.raises(ValueError, match="labels must be in"):
        tlp.logprobs_inplace_backward(torch.randn(2, 5, device=DEVICE), torch.tensor([0, 5], device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deterministic(dtype):
    logits = _randn(3, 9001, dtype=dtype)
    labels = torch.randint(0, 9001, (3,), device=DEVICE)
    g = torch.randn(3, device=DEVICE)

    def run():
        x = logits.clone().requires_grad_()
        lp, ent = rf.logprobs(x, labels, return_entropy=True, backend="triton", temperature=0.7)
        ((lp + ent) * g).sum().backward()
        return lp, ent, x.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- ahead-of-time compile
# Compiled in a child process without TRITON_INTERPRET: the interpreter patches triton.language
# in this one, which the real code generator cannot run on.
_AOT_SCRIPT = r"""
import inspect, json, sys
import triton, triton.language as tl
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(json.dumps({"skip": f"this Triton has no ahead-of-time compile API ({e})"})); sys.exit()
if "constexprs" not in inspect.signature(ASTSource).parameters:
    print(json.dumps({"skip": "this Triton's ASTSource takes no constexprs= (Triton >= 3.3 expected)"})); sys.exit()
from rlhf_fast.ops import logprobs as tlp

out = {}
for dtype in ("bf16", "fp64"):
    acc, stat = (tl.float64, "*fp64") if dtype == "fp64" else (tl.float32, "*fp32")
    common = {"V": "i32", "ignore_index": "i32", "inv_t_hi": "fp32", "inv_t_lo": "fp32"}
    vec = 2 if dtype == "fp64" else 8
    row = {"VEC": vec, "BLOCK_V": 256 * vec, "SPAN": 4096 * vec}
    kernels = {
        "fwd": (tlp._logprobs_fwd_kernel,
                {"x_ptr": f"*{dtype}", "T": "i64", "s0": "i64", "s1": "i64", "phase0": "i32", "labels_ptr": "*i64",
                 "logp_ptr": stat, "ent_ptr": stat, "lse_ptr": stat, "part_ptr": stat, "count_ptr": "*i32",
                 **{k: v for k, v in common.items()}, "c2_hi": "fp32", "c2_lo": "fp32", "ACC": "constexpr",
                 "VEC": "constexpr", "BLOCK_V": "constexpr", "SPAN": "constexpr", "SPLIT": "constexpr",
                 "SPLIT_P2": "constexpr", "ALIGNED": "constexpr", "FAST": "constexpr"},
                {"ACC": acc, **row, "SPLIT": 3, "SPLIT_P2": 4, "ALIGNED": False, "FAST": dtype != "fp64"}),
        "bwd": (tlp._logprobs_bwd_kernel,
                {"x_ptr": f"*{dtype}", "T": "i64", "s0": "i64", "s1": "i64", "g_ptr": f"*{dtype}", "g0": "i64",
                 "g1": "i64", "phase0": "i32",
                 "labels_ptr": "*i64", "glp_ptr": stat, "gent_ptr": stat, "lse_ptr": stat, "ent_ptr": stat, **common,
                 "HAS_GENT": "constexpr", "ACC": "constexpr", "VEC": "constexpr", "BLOCK_V": "constexpr",
                 "SPAN": "constexpr", "SPLIT": "constexpr", "SAME": "constexpr", "FAST": "constexpr"},
                {"HAS_GENT": True, "ACC": acc, **row, "SPLIT": 3, "SAME": True, "FAST": dtype != "fp64"}),
    }
    for which, (kernel, sig, constexprs) in kernels.items():
        params = list(inspect.signature(kernel.fn).parameters)
        try:
            assert list(sig) == params, f"signature {list(sig)} out of date with the kernel {params}"
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
            out[f"{which}-{dtype}"] = {"sm_90": ".target sm_90" in ptx, "local": ".local" in ptx}
        except Exception as e:
            out[f"{which}-{dtype}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sm90_build():
    import json
    import os
    import pathlib
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


@pytest.mark.parametrize("dtype", ["bf16", "fp64"])
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_compiles_for_sm90(sm90_build, which, dtype):
    r = sm90_build[f"{which}-{dtype}"]
    assert "error" not in r, r.get("error")
    assert r["sm_90"]
    assert not r["local"], "register spills (local memory) at the largest block"


# ------------------------------------------------------------------------------ rows split over programs
@pytest.fixture
def split_rows(monkeypatch):
    """Chunks of 64 columns, one chunk per program: a 1031-wide row is split over 17 programs."""
    monkeypatch.setattr(tlp, "_MAX_BLOCK_V", 64)
    monkeypatch.setattr(tlp, "_CHUNKS_PER_PROGRAM", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_split_rows_match_the_reference(split_rows, dtype):
    V = 1031
    buf = _randn(3, 6, V + 3, dtype=dtype)
    x = buf[:, 1:, :V]  # strided [3, 5, V] rows whose 16-byte phase varies row by row
    labels = torch.randint(0, V, (3, 5), device=DEVICE)
    labels[0, 0], labels[0, 1], labels[1, 2] = 0, V - 1, -100
    x[0, 2, :500] = float("-inf")  # whole programs of -inf
    labels[0, 2] = 700
    assert tlp.row_launch(V, tlp.as_rows(x.reshape(-1, V)), tlp._MAX_BLOCK_V)["SPLIT"] > 8
    _check("triton", x, labels, temperature=0.7)


def test_split_rows_nan_and_inplace_backward(split_rows):
    V = 1031
    x = _randn(4, V)
    x[1, 900] = float("nan")
    labels = torch.tensor([3, 5, 1030, 64], device=DEVICE)
    g = torch.randn(4, device=DEVICE)
    lp, ent = rf.logprobs(x, labels, return_entropy=True, backend="triton")
    assert lp[1].isnan() and ent[1].isnan() and not lp[[0, 2, 3]].isnan().any()
    xr = x.clone().requires_grad_()
    lp2, ent2 = rf.logprobs(xr, labels, return_entropy=True, backend="triton")
    (want,) = torch.autograd.grad((lp2 * g).sum() + ent2.sum(), xr)
    y = x.clone().requires_grad_()
    z = y * 1.0
    lp3, ent3 = tlp.logprobs_inplace_backward(z, labels, return_entropy=True)
    ((lp3 * g).sum() + ent3.sum()).backward()
    assert torch.equal(y.grad.isnan(), want.isnan()) and torch.equal(y.grad.nan_to_num(), want.nan_to_num())
    assert want[1].isnan().all() and not want[0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_batch_invariant(split_rows, dtype):
    V = 1031
    x = _randn(9, V, dtype=dtype)
    labels = torch.randint(0, V, (9,), device=DEVICE)
    full = rf.logprobs(x, labels, return_entropy=True, backend="triton")
    for i in (0, 3, 4, 8):
        alone = rf.logprobs(x[i:i + 1].clone(), labels[i:i + 1], return_entropy=True, backend="triton")
        for a, b in zip(alone, full):
            assert torch.equal(a, b[i:i + 1]), f"row {i} alone differs from the batch"


def test_small_batch_launch_fills_the_gpu(monkeypatch):
    """N = 64 rows of V = 151,936: the forward and backward launches have >= 128 programs (an H100/H200 has
    132 SMs), with the same split for any N (here N = 1 and N = 64 give the same programs per row)."""
    grids = []
    for name in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"):
        real = getattr(tlp, name)

        class Spy:
            def __getitem__(self, grid, real=real, name=name):
                grids.append((name, grid))
                return lambda *a, **kw: None  # the launch itself is not needed (and slow in the interpreter)
        monkeypatch.setattr(tlp, name, Spy())
    V = 151936
    for N in (64, 1):
        x = torch.zeros(N, V, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        lp, ent = tlp.logprobs(x, torch.zeros(N, dtype=torch.long, device=DEVICE), return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    (fwd64, bwd64, fwd1, bwd1) = [g for _, g in grids]
    assert fwd64[0] * fwd64[1] >= 128 and bwd64[0] * bwd64[1] >= 128, grids
    assert fwd1[1:] == fwd64[1:] and bwd1[1:] == bwd64[1:], "the split must not depend on N"
