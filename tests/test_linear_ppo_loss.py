"""rf.linear_ppo_loss on every backend against the float64 reference of the padded, materialised
computation (ppo_loss_from_logits(hidden @ weight.T + bias)), and the chunked backends' promise:
no tensor of N·V/4 elements, forward or backward."""
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_fast as rf
from rlhf_fast import reference as ref
from utils import DEVICE, GRAD_TOL, OUT_TOL, assert_rel, backends

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
STAT_KEYS = ["pg_loss", "clipfrac", "approx_kl", "dual_clipfrac", "entropy", "kl"]
CHUNKED = [b for b in backends("linear_ppo_loss") if b != "reference"]


def _inputs(B, T, H, V, dtype, bias=True, with_ref=True, n_ignored=0):
    """Random PPO inputs: an empty row (row 1), a length-1 row (row 0) when B >= 3, ignored labels."""
    hidden = (torch.randn(B, T, H, device=DEVICE) / H**0.25).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 1.5 / H**0.25).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels.view(-1)[torch.randperm(B * T)[:n_ignored]] = -100
    mask = torch.rand(B, T, device=DEVICE) > 0.25
    if B >= 3:
        mask[0] = False
        mask[0, T // 2] = True  # a length-1 sequence
        mask[1] = False         # an empty one
    # old_logp near the new logp so that some tokens clip and some do not
    with torch.no_grad():
        lp = ref.linear_logprobs(hidden.reshape(-1, H).double(), weight.double(),
                                 torch.where(labels < 0, 0, labels).reshape(-1), None if b is None else b.double())
    old = (lp.reshape(B, T) + 0.3 * torch.randn(B, T, device=DEVICE, dtype=torch.float64)).float()
    adv = torch.randn(B, T, device=DEVICE)
    ref_logp = (lp.reshape(B, T) + 0.2 * torch.randn(B, T, device=DEVICE, dtype=torch.float64)).float() \
        if with_ref else None
    return hidden, weight, b, labels, old, adv, mask, ref_logp


def _check(backend, hidden, weight, bias, labels, old, adv, mask, ref_logp, tol_dtype=None, **kw):
    """Loss, stats and grads (hidden, weight, bias) against the float64 reference on the same values."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    pt64 = [t.double() if t is not None else None for t in (old, adv, ref_logp)]
    loss, st = rf.linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2], ref_logp=ref_logp,
                                  backend=backend, **kw)
    kw64 = {k: v for k, v in kw.items() if k not in ("chunk_size", "head_dtype")}
    loss64, st64 = ref.ppo_loss_from_logits(leaves64[0] @ leaves64[1].T + (0 if bias is None else leaves64[2]),
                                            labels, pt64[0], pt64[1], mask, pt64[2], **kw64)
    dt = tol_dtype or hidden.dtype
    assert_rel(loss, loss64, OUT_TOL[dt], f"{backend} loss")
    assert sorted(st) == sorted(st64), f"{backend}: stats {sorted(st)} != {sorted(st64)}"
    for k in st64:
        assert_rel(st[k], st64[k], OUT_TOL[dt], f"{backend} stat {k}")
    loss.backward()
    loss64.backward()
    for name, t, t64 in zip(("hidden", "weight", "bias"), leaves, leaves64):
        if t is not None:
            assert t.grad is not None and t.grad.dtype == t.dtype, f"{backend} grad {name}"
            assert_rel(t.grad, t64.grad, GRAD_TOL[t.dtype] if t.dtype != torch.float32 else GRAD_TOL[dt],
                       f"{backend} grad {name}")


@pytest.mark.parametrize("backend", backends("linear_ppo_loss"))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_reference(backend, agg, dtype):
    x = _inputs(4, 9, 16, 301, dtype, n_ignored=3)
    _check(backend, *x, agg=agg, kl_coef=0.05, entropy_coef=0.01, chunk_size=5)


@pytest.mark.parametrize("backend", backends("linear_ppo_loss"))
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "abs", "k3+"])
def test_kl_estimators_dual_clip_temperature(backend, kl_estimator):
    x = _inputs(3, 11, 12, 257, torch.float32, bias=False, n_ignored=4)
    _check(backend, *x, kl_estimator=kl_estimator, kl_coef=0.2, entropy_coef=0.03, dual_clip=2.0, clip_high=0.28,
           temperature=0.7, agg="seq-mean-token-mean", chunk_size=8)


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("chunk_size", [1, 7, 36, 1000, None])
def test_chunk_boundaries(backend, chunk_size):
    x = _inputs(4, 9, 8, 130, torch.float32, n_ignored=2)
    _check(backend, *x, agg="seq-mean-token-sum", entropy_coef=0.02, kl_coef=0.1, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", backends("linear_ppo_loss"))
def test_no_ref_no_terms_and_vocab_past_the_block(backend):
    # V above the Triton block (4096): the row loop runs twice; no ref_logp: no "kl" stat
    x = _inputs(2, 3, 8, 4099, torch.float32, with_ref=False)
    _check(backend, *x, chunk_size=4)


@pytest.mark.parametrize("backend", backends("linear_ppo_loss"))
def test_fp32_head_for_bf16_inputs(backend):
    x = _inputs(3, 5, 16, 97, torch.bfloat16, n_ignored=1)
    _check(backend, *x, head_dtype=torch.float32, entropy_coef=0.01, chunk_size=4)


@pytest.mark.parametrize("backend", backends("linear_ppo_loss"))
def test_all_masked_and_frozen_weight(backend):
    hidden, weight, bias, labels, old, adv, mask, ref_logp = _inputs(2, 4, 8, 50, torch.float32)
    h = hidden.clone().requires_grad_()
    loss, st = rf.linear_ppo_loss(h, weight, labels, old, adv, torch.zeros_like(mask), bias=bias, ref_logp=ref_logp,
                                  kl_coef=0.1, entropy_coef=0.1, backend=backend)
    assert loss.item() == 0 and all(v.item() == 0 for v in st.values())
    loss.backward()
    assert (h.grad == 0).all()


@pytest.mark.parametrize("backend", CHUNKED)
def test_advantage_gradient_and_single_backward(backend):
    hidden, weight, bias, labels, old, adv, mask, ref_logp = _inputs(3, 4, 8, 40, torch.float64)
    a, a64 = adv.double().clone().requires_grad_(), adv.double().clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    loss, _ = rf.linear_ppo_loss(h, weight, labels, old.double(), a, mask, bias=bias, agg="seq-mean-token-mean",
                                 backend=backend)
    loss64, _ = ref.linear_ppo_loss(hidden, weight, labels, old.double(), a64, mask, bias, agg="seq-mean-token-mean")
    (2 * loss).backward(retain_graph=True)
    (2 * loss64).backward()
    assert_rel(a.grad, a64.grad, 1e-10, "advantages grad")
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


@pytest.mark.parametrize("backend", CHUNKED)
def test_no_grad_skips_the_gradient_gemms(backend):
    hidden, weight, bias, labels, old, adv, mask, ref_logp = _inputs(2, 5, 8, 30, torch.float32)
    h = hidden.clone().requires_grad_()
    calls = []
    with torch.no_grad(), _CountMM(calls):
        loss, st = rf.linear_ppo_loss(h, weight.requires_grad_(), labels, old, adv, mask, chunk_size=4, backend=backend)
    want, _ = ref.linear_ppo_loss(hidden, weight.detach(), labels, old, adv, mask)
    assert_rel(loss, want, 2e-5, "no_grad loss")
    assert len(calls) == 3  # one logits GEMM per chunk of 4 rows out of 10, no gradient GEMMs


class _CountMM(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm_.default, torch.ops.aten.addmm.default):
            self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_bad_inputs():
    hidden, weight, bias, labels, old, adv, mask, _ = _inputs(2, 3, 4, 10, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rf.linear_ppo_loss(hidden, weight[:, :3], labels, old, adv, mask)
    with pytest.raises(ValueError, match="labels"):
        rf.linear_ppo_loss(hidden, weight, labels.clamp(max=3) + 10, old, adv, mask)
    with pytest.raises(ValueError, match="chunk_size"):
        rf.linear_ppo_loss(hidden, weight, labels, old, adv, mask, chunk_size=0, backend=CHUNKED[0])
    with pytest.raises(ValueError, match="head_dtype"):
        rf.linear_ppo_loss(hidden, weight, labels, old, adv, mask, head_dtype=torch.int32)


# ----------------------------------------------------------------------------- memory
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active, views included, in fp32 elements
    (bytes / 4: the Triton interpreter sees buffers as bytes; every tensor here is fp32 or smaller)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() / 4 > self.numel:
                self.numel, self.op = t.numel() * t.element_size() / 4, func
        return out


def _largest(backend, B, T, H, V):
    hidden, weight, bias, labels, old, adv, mask, ref_logp = _inputs(B, T, H, V, torch.float32, n_ignored=3)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    with _LargestTensor() as mode:
        loss, _ = rf.linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2], ref_logp=ref_logp,
                                     kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean", backend=backend)
        loss.backward()
    return mode


@pytest.mark.parametrize("backend", [b for b in CHUNKED if b != "triton"])
def test_no_quarter_logits_tensor_at_2048x50000(backend):
    N, V = 2048, 50000
    mode = _largest(backend, 4, N // 4, 8, V)
    assert mode.numel < N * V / 4, f"{backend}: {mode.op} made a tensor of {mode.numel} elements (N·V = {N * V})"


@pytest.mark.parametrize("backend", CHUNKED)
def test_no_quarter_logits_tensor_small(backend):
    N, V = 256, 600  # the same default rule at a size the Triton interpreter runs quickly
    mode = _largest(backend, 2, N // 2, 8, V)
    assert mode.numel < N * V / 4, f"{backend}: {mode.op} made a tensor of {mode.numel} elements (N·V = {N * V})"


def test_memory_check_catches_the_reference():
    mode = _largest("reference", 2, 128, 8, 600)
    assert mode.numel >= 256 * 600


def test_default_chunk_rows():
    from rlhf_fast.ops.linear_ppo_loss import CHUNK_BYTES, ROW_MULTIPLE, default_chunk_rows

    for N, V in [(1024, 151936), (2048, 50000), (16384, 151936), (10**6, 262144), (100, 32000), (7, 10),
                 (10**7, 1), (3, 10**9)]:
        c = default_chunk_rows(N, V)
        assert 1 <= c <= max(1, -(-N // 8)), (N, V, c)
        assert c == 1 or c * V * 4 <= CHUNK_BYTES
        assert c < ROW_MULTIPLE or c % ROW_MULTIPLE == 0
    assert default_chunk_rows(1024, 151936) == 128 and default_chunk_rows(2048, 50000) == 256
