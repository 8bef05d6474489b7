"""rf.linear_logprobs on every backend against the float64 reference, and the chunked backends'
promise: never an [N, V] tensor, in the forward or the backward."""
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_fast as rf
from rlhf_fast import reference as ref
from rlhf_fast._backend import select
from utils import DEVICE, DTYPES, GRAD_TOL, OUT_TOL, assert_rel, backends

CHUNKED = [b for b in backends("linear_logprobs") if b != "reference"]


def _inputs(N, H, V, dtype, bias=True, ignore_index=-100, n_ignored=0):
    hidden = (torch.randn(N, H, device=DEVICE) / H**0.25).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 2 / H**0.25).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.randperm(N)[:n_ignored]] = ignore_index
    return hidden, weight, b, labels


def _run(backend, hidden, weight, bias, labels, chunk_size=None, **kw):
    """The public function, or the backend's implementation directly when a chunk size is given."""
    if chunk_size is None:
        return rf.linear_logprobs(hidden, weight, labels, bias=bias, backend=backend, **kw)
    impl = select("linear_logprobs", hidden.device, backend)
    return impl(hidden, weight, labels, bias, kw.get("temperature", 1.0), kw.get("ignore_index", -100),
                kw.get("return_entropy", False), chunk_size=chunk_size)


def _check(backend, hidden, weight, bias, labels, temperature=1.0, ignore_index=-100, return_entropy=True,
           chunk_size=None, entropy_only=False, tol_dtype=None):
    """Forward and backward (hidden, weight, bias) against the reference in float64 on the same values."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = _run(backend, *leaves, labels, chunk_size, temperature=temperature, ignore_index=ignore_index,
               return_entropy=return_entropy)
    lp64, ent64 = ref.linear_logprobs(*leaves64[:2], labels, leaves64[2], temperature, ignore_index, True)
    lp, ent = out if return_entropy else (out, None)
    dt = tol_dtype or hidden.dtype
    want = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    assert lp.dtype == want
    assert_rel(lp, lp64, OUT_TOL[dt], f"{backend} logp")
    g_lp = torch.zeros_like(lp64) if entropy_only else torch.randn_like(lp64)
    loss, loss64 = (lp.double() * g_lp).sum(), (lp64 * g_lp).sum()
    if return_entropy:
        assert_rel(ent, ent64, OUT_TOL[dt], f"{backend} entropy")
        g_ent = torch.randn_like(ent64)
        loss, loss64 = loss + (ent.double() * g_ent).sum(), loss64 + (ent64 * g_ent).sum()
    if entropy_only:
        loss = (ent.double() * g_ent).sum()
    loss.backward()
    loss64.backward()
    for name, t, t64 in zip(("hidden", "weight", "bias"), leaves, leaves64):
        if t is not None:
            assert t.grad.dtype == t.dtype
            assert_rel(t.grad, t64.grad, GRAD_TOL[t.dtype] if t.dtype != torch.float32 else GRAD_TOL[dt],
                       f"{backend} grad {name}")


@pytest.mark.parametrize("backend", backends("linear_logprobs"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 16, 301), (1, 1, 1), (5, 24, 4099)])
def test_matches_reference(backend, dtype, shape):
    _check(backend, *_inputs(*shape, dtype, n_ignored=min(3, shape[0] - 1)))


@pytest.mark.parametrize("backend", backends("linear_logprobs"))
@pytest.mark.parametrize("temperature", [0.6, 1.7])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_temperature_entropy_no_bias(backend, temperature, return_entropy):
    hidden, weight, _, labels = _inputs(20, 12, 257, torch.float32, bias=False, ignore_index=5, n_ignored=4)
    _check(backend, hidden, weight, None, labels, temperature=temperature, ignore_index=5,
           return_entropy=return_entropy)


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("chunk_size", [1, 7, 8, 37, 1000])
def test_chunk_boundaries(backend, chunk_size):
    _check(backend, *_inputs(37, 16, 301, torch.float32, n_ignored=5), temperature=0.8, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunks_in_half_precision(backend, dtype):
    _check(backend, *_inputs(19, 32, 515, dtype, n_ignored=2), temperature=1.3, chunk_size=6)


@pytest.mark.parametrize("backend", backends("linear_logprobs"))
def test_entropy_only_gradient(backend):
    # logp unused by the loss: its gradient reaches the backward as None
    _check(backend, *_inputs(9, 8, 130, torch.float32, n_ignored=2), entropy_only=True)


@pytest.mark.parametrize("backend", backends("linear_logprobs"))
def test_mixed_dtypes_and_strided_inputs(backend):
    hidden, weight, bias, labels = _inputs(11, 20, 97, torch.float32, n_ignored=1)
    hidden = hidden.to(torch.bfloat16).T.contiguous().T  # column-major bf16 hidden, fp32 weight
    weight = torch.cat([weight, weight], 1)[:, ::2]  # strided columns
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    _check(backend, hidden, weight, bias, labels, tol_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", backends("linear_logprobs"))
def test_frozen_weight_and_all_ignored(backend):
    hidden, weight, bias, labels = _inputs(6, 8, 50, torch.float32)
    h = hidden.clone().requires_grad_()
    lp, ent = rf.linear_logprobs(h, weight, torch.full_like(labels, -100), bias=bias, return_entropy=True,
                                 backend=backend)
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (h.grad == 0).all()


@pytest.mark.parametrize("backend", backends("linear_logprobs"))
def test_empty(backend):
    h = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(30, 8, device=DEVICE, requires_grad=True)
    lp = rf.linear_logprobs(h, w, torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert lp.shape == (0,)
    lp.sum().backward()
    assert h.grad.shape == (0, 8) and (w.grad == 0).all()


@pytest.mark.parametrize("backend", CHUNKED)
def test_bad_chunk_size(backend):
    with pytest.raises(ValueError, match="chunk_size"):
        _run(backend, *_inputs(4, 4, 10, torch.float32), chunk_size=0)


# ----------------------------------------------------------------------------- memory
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any op produces while active, views included."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.nbytes:
                self.nbytes, self.op = t.numel() * t.element_size(), func
        return out


def _largest_tensor(backend, N, H, V, chunk_size=None):
    hidden, weight, bias, labels = _inputs(N, H, V, torch.float32, n_ignored=3)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    with _LargestTensor() as mode:
        lp, ent = _run(backend, *leaves, labels, chunk_size, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    return mode


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("default_chunk", [False, True])
def test_never_materialises_full_logits(backend, default_chunk, monkeypatch):
    N, H, V, C = 64, 8, 512, 4
    bound = 4 * max(C * V, V * H, N * H)  # a chunk's fp32 logits, the weight and its gradient, the hidden states
    assert bound * 8 <= 4 * N * V
    if default_chunk:  # the default chunking, with the byte budget shrunk to C rows
        from rlhf_fast.ops import linear_logprobs as lin

        monkeypatch.setattr(lin, "CHUNK_BYTES", C * V * 4)
        C = None
    mode = _largest_tensor(backend, N, H, V, chunk_size=C)
    assert mode.nbytes <= bound, f"{backend}: {mode.op} made a tensor of {mode.nbytes} bytes (fp32 [N, V]: {4 * N * V})"


def test_memory_check_catches_the_reference():
    # the check above is real: the reference materialises [N, V] and is caught
    mode = _largest_tensor("reference", 64, 8, 512)
    assert mode.nbytes >= 4 * 64 * 512


def test_default_chunk_rows_bound():
    from rlhf_fast.ops.linear_logprobs import CHUNK_BYTES, MAX_CHUNK_ROWS, default_chunk_rows

    for N, V in [(10**6, 152064), (10**6, 262144), (100, 32000), (10**7, 1), (3, 10**9)]:
        c = default_chunk_rows(N, V)
        assert 1 <= c <= min(N, MAX_CHUNK_ROWS) and (c == 1 or c * V * 4 <= CHUNK_BYTES)
