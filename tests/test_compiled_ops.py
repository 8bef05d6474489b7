"""The compiled ops (csrc/) below the public API: torch.library.opcheck of every op, the in-place
logprobs backward, CUDA registration, and the loss ops on inputs the parametrised op tests do not
cover (weighted masks, any-shape token-mean, ties of the clipped branches, empty inputs)."""
import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import _compiled
from rlhf_fast import reference as ref
from utils import DEVICE, GRAD_TOL, OUT_TOL, assert_rel

pytestmark = pytest.mark.skipif(not _compiled.LOADED, reason="compiled extension not built")
ops = torch.ops.rlhf_fast if _compiled.LOADED else None
BACKEND = "cuda" if DEVICE == "cuda" else "cpu"  # the compiled backend for the test device

NEW_OPS = ("logprobs_bwd_", "kl_fwd", "ppo_policy_loss_fwd", "ppo_value_loss_fwd")
ALL_OPS = ("logprobs_fwd", "logprobs_bwd", "gae_fwd", "gae_bwd") + NEW_OPS


def test_cpu_kernels_registered():
    for op in ALL_OPS:
        assert _compiled.has_kernel(op, "CPU"), op


@pytest.mark.skipif(not (_compiled.LOADED and _compiled.has_kernel("gae_fwd", "CUDA")),
                    reason="rlhf_fast._C was built without CUDA sources")
def test_cuda_kernels_registered():
    for op in ALL_OPS:
        assert _compiled.has_kernel(op, "CUDA"), op


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k3+"])
def test_opcheck_kl(dtype, estimator):
    a = torch.randn(4, 9, dtype=dtype, device=DEVICE, requires_grad=True)
    b = torch.randn(4, 9, dtype=dtype, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.kl_fwd, (a, b, estimator, None))
    torch.library.opcheck(ops.kl_fwd, (a, b, estimator, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_opcheck_ppo_losses(dtype, agg):
    x, y, z = (torch.randn(3, 7, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(3))
    for mask in (torch.rand(3, 7, device=DEVICE) > 0.3, torch.rand(3, 7, dtype=dtype, device=DEVICE)):
        torch.library.opcheck(ops.ppo_policy_loss_fwd, (x, y, z, mask, 0.2, 0.28, 3.0, agg))
        torch.library.opcheck(ops.ppo_policy_loss_fwd, (x, y, z, mask, 0.2, 0.2, None, agg))
        torch.library.opcheck(ops.ppo_value_loss_fwd, (x, y, z, mask, 0.2, agg))
        torch.library.opcheck(ops.ppo_value_loss_fwd, (x, y, z, mask, None, agg))


def test_opcheck_logprobs_bwd_inplace():
    logits = torch.randn(5, 37, device=DEVICE)
    labels = torch.tensor([0, 36, -100, 5, 9], device=DEVICE)
    _, ent, lse = ops.logprobs_fwd(logits, labels, 1.25, -100)
    g = torch.randn(2, 5, device=DEVICE)
    torch.library.opcheck(ops.logprobs_bwd_, (logits.clone(), g[0], g[1], labels, lse, ent, 1.25, -100))


def test_losses_under_torch_compile():
    logp, old, adv = (torch.randn(3, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.rand(3, 8, device=DEVICE) > 0.2

    def f(logp, old, adv):
        pl, st = rf.ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean", backend=BACKEND)
        vl, _ = rf.ppo_value_loss(logp, old, adv, mask, backend=BACKEND)
        return pl + vl + rf.kl(logp, old, estimator="k3+", backend=BACKEND).mean() + 0 * st["clipfrac"]

    out = torch.compile(f, fullgraph=True)(logp, old, adv)
    grads = torch.autograd.grad(out, (logp, old, adv))
    out_e = f(logp, old, adv)
    grads_e = torch.autograd.grad(out_e, (logp, old, adv))
    assert torch.allclose(out, out_e)
    for g, g_e in zip(grads, grads_e):
        assert torch.allclose(g, g_e, atol=1e-6)


# ----------------------------------------------------------------------------- in-place logprobs backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_logprobs_bwd_inplace_matches_out_of_place(dtype):
    # a row stride != V, a masked vocabulary, an ignored row, the label at either end of the row
    buf = (torch.randn(6, 520) * 3).to(DEVICE, dtype)
    logits = buf[:, :517]
    logits[2, ::4] = float("-inf")
    labels = torch.tensor([0, 516, 3, -100, 200, 7], device=DEVICE)
    g_lp, g_ent = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g_lp, g_ent = g_lp.to(DEVICE, acc), g_ent.to(DEVICE, acc)
    _, ent, lse = ops.logprobs_fwd(logits, labels, 0.8, -100)
    want = ops.logprobs_bwd(g_lp, g_ent, logits, labels, lse, ent, 0.8, -100)
    ptr, tail = buf.data_ptr(), buf[:, 517:].clone()
    ops.logprobs_bwd_(logits, g_lp, g_ent, labels, lse, ent, 0.8, -100)
    assert buf.data_ptr() == ptr
    assert torch.equal(logits, want)  # same math, same rounding
    assert torch.equal(buf[:, 517:], tail)  # the padding past V is untouched
    assert (logits[3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logprobs_bwd_inplace_against_reference(dtype):
    logits = (torch.randn(5, 301, dtype=torch.float64) * 2).to(DEVICE, dtype)
    labels = torch.tensor([1, -100, 300, 0, 17], device=DEVICE)
    x64 = logits.double().requires_grad_()
    lp64, ent64 = ref.logprobs(x64, labels, 1.3, -100, True)
    g_lp, g_ent = torch.randn(5, dtype=torch.float64, device=DEVICE), torch.randn(5, dtype=torch.float64, device=DEVICE)
    ((lp64 * g_lp).sum() + (ent64 * g_ent).sum()).backward()
    _, ent, lse = ops.logprobs_fwd(logits, labels, 1 / 1.3, -100)
    buf = logits.clone()
    ops.logprobs_bwd_(buf, g_lp.to(ent.dtype), g_ent.to(ent.dtype), labels, lse, ent, 1 / 1.3, -100)
    assert_rel(buf, x64.grad, GRAD_TOL[dtype], "in-place grad logits")


def test_logprobs_bwd_inplace_empty():
    logits = torch.randn(0, 11, device=DEVICE)
    e = torch.zeros(0, device=DEVICE)
    ops.logprobs_bwd_(logits, e, None, torch.zeros(0, dtype=torch.long, device=DEVICE), e, e, 1.0, -100)


# ----------------------------------------------------------------------------- losses: more inputs
def _grads(fn, args):
    leaves = [a.detach().to(DEVICE).requires_grad_() for a in args]
    out = fn(*leaves)
    outs = out if isinstance(out, (tuple, list)) else [out]
    w = [torch.randn(o.shape, dtype=torch.float64).to(DEVICE) for o in outs]  # same weights for every dtype
    sum((o.double() * wi).sum() for o, wi in zip(outs, w)).backward()
    return [o.detach() for o in outs], [a.grad for a in leaves]


def _compare(cpu_fn, ref_fn, args, dtype, tol=None):
    torch.manual_seed(0)
    outs, grads = _grads(cpu_fn, [a.to(dtype) for a in args])
    torch.manual_seed(0)
    outs64, grads64 = _grads(ref_fn, [a.to(dtype).double() for a in args])
    tol = tol or OUT_TOL[dtype]
    for o, o64 in zip(outs, outs64):
        assert_rel(o, o64, tol, "output")
    for g, g64 in zip(grads, grads64):
        if g64 is None:  # an input this configuration does not use
            assert g is None or not g.any(), "gradient for an unused input"
        else:
            assert_rel(g, g64, max(tol, GRAD_TOL[dtype]), "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (1,), (5000,), (2, 3, 1500), (0, 4)])
def test_kl_any_shape(dtype, shape):
    a, b = -torch.rand(shape, dtype=torch.float64) * 4, -torch.rand(shape, dtype=torch.float64) * 4
    for est in ("k2", "k3", "abs+"):
        _compare(lambda x, y: rf.kl(x, y, estimator=est, clamp=1.0, backend=BACKEND),
                 lambda x, y: ref.kl(x, y, est, 1.0), [a, b], dtype)


def test_kl_gradient_conventions_at_kinks():
    # abs has gradient 0 at 0; clamp passes the gradient at its bounds (both as torch does)
    logp = torch.tensor([-1.0, -1.0, -0.5, -2.0], dtype=torch.float64)
    ref_logp = torch.tensor([-1.0, -1.5, -1.0, -1.0], dtype=torch.float64)
    for est, clamp in (("abs", None), ("k1", 0.5), ("k2", 0.125), ("abs+", 0.5)):
        _compare(lambda x, y: rf.kl(x, y, estimator=est, clamp=clamp, backend=BACKEND),
                 lambda x, y: ref.kl(x, y, est, clamp), [logp, ref_logp], torch.float64)


def _policy_args(shape, tie_fraction=0.0):
    logp = -torch.rand(shape, dtype=torch.float64) * 2
    old = logp + torch.randn(shape, dtype=torch.float64) * 0.4
    if tie_fraction:  # ratio exactly 1 (no clipping, pg1 == pg2) and advantages exactly 0
        tie = torch.rand(shape) < tie_fraction
        old = torch.where(tie, logp, old)
    adv = torch.randn(shape, dtype=torch.float64)
    adv = torch.where(torch.rand(shape) < 0.1, 0.0, adv)
    return logp, old, adv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_policy_loss_weighted_mask_and_ties(dtype, agg, dual_clip):
    logp, old, adv = _policy_args((6, 50), tie_fraction=0.3)
    weights = torch.rand(6, 50, dtype=torch.float64) * (torch.rand(6, 50) > 0.3)
    weights[2] = 0  # an empty row
    for mask in (weights.to(DEVICE), (weights > 0).to(DEVICE), (weights > 0).int().to(DEVICE)):
        _compare(lambda *a: _policy_outs(rf.ppo_policy_loss(*a, mask, clip_low=0.2, clip_high=0.28,
                                                            dual_clip=dual_clip, agg=agg, backend=BACKEND)),
                 lambda *a: _policy_outs(ref.ppo_policy_loss(*a, mask, 0.2, 0.28, dual_clip, agg)),
                 [logp, old, adv], dtype)


def _policy_outs(res):
    loss, st = res
    return [loss, st["clipfrac"], st["approx_kl"], st["dual_clipfrac"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (7,), (9000,), (2, 3, 40)])
def test_policy_loss_token_mean_any_shape(dtype, shape):
    # 9000 tokens span three token-mean segments
    logp, old, adv = _policy_args(shape)
    mask = (torch.rand(shape) > 0.2).to(DEVICE)
    _compare(lambda *a: _policy_outs(rf.ppo_policy_loss(*a, mask, dual_clip=3.0, backend=BACKEND)),
             lambda *a: _policy_outs(ref.ppo_policy_loss(*a, mask, 0.2, None, 3.0, "token-mean")),
             [logp, old, adv], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_all_aggregations(dtype, agg, clip):
    v = torch.randn(5, 40, dtype=torch.float64)
    # old == v: v_clipped == v, so l1 == l2 exactly in any precision (a tie of the maximum)
    old = torch.where(torch.rand(5, 40) < 0.2, v, v + torch.randn(5, 40, dtype=torch.float64) * 0.3)
    ret = torch.randn(5, 40, dtype=torch.float64)
    weights = torch.rand(5, 40, dtype=torch.float64) * (torch.rand(5, 40) > 0.3)
    weights[0] = 0
    for mask in (weights.to(DEVICE), (weights > 0).to(DEVICE)):
        _compare(lambda *a: _value_outs(rf.ppo_value_loss(*a, mask, clip=clip, agg=agg, backend=BACKEND)),
                 lambda *a: _value_outs(ref.ppo_value_loss(*a, mask, clip, agg)), [v, old, ret], dtype)


def _value_outs(res):
    loss, st = res
    return [loss, st["vf_clipfrac"]]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_losses_empty_and_all_masked(agg):
    for shape in ((0, 5), (3, 0), (2, 4)):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        mask = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
        loss, st = rf.ppo_policy_loss(x, x.detach() + 0.1, torch.randn(shape, device=DEVICE), mask, agg=agg, backend=BACKEND)
        vloss, vst = rf.ppo_value_loss(x, x.detach() + 0.1, torch.randn(shape, device=DEVICE), mask, agg=agg, backend=BACKEND)
        assert loss.item() == 0 and vloss.item() == 0
        assert all(s.item() == 0 for s in st.values()) and vst["vf_clipfrac"].item() == 0
        (loss + vloss).backward()
        assert x.grad.shape == shape and not x.grad.any()


def test_losses_non_contiguous_and_deterministic():
    base = torch.randn(3, 40, 12, dtype=torch.float64, device=DEVICE)
    logp, old, adv = base[..., 0], base[..., 1] * 0.3 + base[..., 0], base[..., 2]  # strided views
    mask = torch.rand(40, 3, device=DEVICE).T > 0.2
    a = _policy_outs(rf.ppo_policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum", backend=BACKEND))
    b = _policy_outs(ref.ppo_policy_loss(logp, old, adv, mask, 0.2, None, None, "seq-mean-token-sum"))
    for x, y in zip(a, b):
        assert_rel(x, y, 1e-12, "non-contiguous")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reduction order does not depend on the thread count
    try:
        c = _policy_outs(rf.ppo_policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum", backend=BACKEND))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_loss_ops_reject_bad_input_in_cpp():
    x = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="unknown estimator"):
        ops.kl_fwd(x, x, "k7", None)
    with pytest.raises(RuntimeError, match="unknown agg"):
        ops.ppo_value_loss_fwd(x, x, x, x > 0, 0.2, "mean")
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.ppo_policy_loss_fwd(x, x.double(), x, x > 0, 0.2, 0.2, None, "token-mean")
    with pytest.raises(RuntimeError, match="need \\[B, T\\]"):
        ops.ppo_policy_loss_fwd(x[0], x[0], x[0], x[0] > 0, 0.2, 0.2, None, "seq-mean-token-sum")


# ----------------------------------------------------------------------------- group advantages, shaped rewards
ADV_OPS = ("grpo_advantages_fwd", "grpo_advantages_bwd", "rloo_advantages_fwd", "kl_penalized_rewards_fwd",
           "kl_penalized_rewards_bwd")


def test_advantage_kernels_registered():
    keys = ["CPU"] + (["CUDA"] if _compiled.has_kernel("gae_fwd", "CUDA") else [])
    for op in ADV_OPS:
        for key in keys:
            assert _compiled.has_kernel(op, key), (op, key)
    for name in ("grpo_advantages", "rloo_advantages", "reinforce_pp_returns", "kl_penalized_rewards"):
        assert BACKEND in rf.backends_for(name, DEVICE), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_opcheck_group_advantages(dtype, group_size):
    s = torch.randn(4 * group_size, dtype=dtype, device=DEVICE, requires_grad=True)
    g = torch.randn(4 * group_size, dtype=dtype, device=DEVICE)
    torch.library.opcheck(ops.grpo_advantages_fwd, (s, group_size, False, 1e-6))
    torch.library.opcheck(ops.grpo_advantages_bwd, (g, s.detach(), group_size, False, 1e-6))
    if group_size > 1:
        torch.library.opcheck(ops.grpo_advantages_fwd, (s, group_size, True, 1e-6))
        torch.library.opcheck(ops.grpo_advantages_bwd, (g, s.detach(), group_size, True, 1e-6))
        torch.library.opcheck(ops.rloo_advantages_fwd, (s, group_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k3+"])
def test_opcheck_kl_penalized_rewards(dtype, estimator):
    score = torch.randn(4, dtype=dtype, device=DEVICE, requires_grad=True)
    logp, ref_logp = (-torch.rand(4, 9, dtype=dtype, device=DEVICE).requires_grad_() for _ in range(2))
    mask = torch.rand(4, 9, device=DEVICE) > 0.4
    mask[1] = False  # a row without a valid token
    torch.library.opcheck(ops.kl_penalized_rewards_fwd, (score, logp, ref_logp, mask, 0.05, estimator))
    _, d, last = ops.kl_penalized_rewards_fwd(score, logp, ref_logp, mask, 0.05, estimator)
    torch.library.opcheck(ops.kl_penalized_rewards_bwd, (torch.randn_like(d), d, last))


@pytest.mark.parametrize("group_size,G", [(1, 5), (2, 7), (5, 3), (16, 9), (100, 3), (40, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_group_advantages_against_reference(group_size, G, dtype):
    s = torch.randn(G * group_size, dtype=torch.float64)
    tol = OUT_TOL[torch.float32] if dtype != torch.float64 else 1e-10
    _compare(lambda x: rf.grpo_advantages(x, group_size, normalize_std=False, backend=BACKEND),
             lambda x: ref.grpo_advantages(x, group_size, False), [s], dtype, tol)
    if group_size == 1:
        return
    _compare(lambda x: rf.rloo_advantages(x, group_size, backend=BACKEND),
             lambda x: ref.rloo_advantages(x, group_size), [s], dtype, tol)
    # pairs: the normalised output is ±1/√2 up to eps, its gradient O(eps) cancels catastrophically
    # in fp32 (see test_rl_kernels_triton.test_group_advantages_fuzz): their gradient is checked in fp64
    if group_size > 2 or dtype == torch.float64:
        _compare(lambda x: rf.grpo_advantages(x, group_size, backend=BACKEND),
                 lambda x: ref.grpo_advantages(x, group_size), [s], dtype, tol if group_size > 2 else 1e-6)
    else:
        out = rf.grpo_advantages(s.to(DEVICE, dtype), group_size, backend=BACKEND)
        assert_rel(out, ref.grpo_advantages(s.to(dtype).double(), group_size), tol, "grpo pairs")


def test_group_advantages_dtypes_and_strides():
    s = torch.randn(24, dtype=torch.float64, device=DEVICE)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = s.to(dtype)
        for fn, r in ((lambda x: rf.grpo_advantages(x, 4, backend=BACKEND), ref.grpo_advantages(x, 4)),
                      (lambda x: rf.rloo_advantages(x, 4, backend=BACKEND), ref.rloo_advantages(x, 4))):
            out = fn(x)
            assert out.dtype == r.dtype  # fp32 for half inputs, as the reference
            leaf = x.clone().requires_grad_()
            fn(leaf).sum().backward()
            assert leaf.grad.dtype == dtype
    base = torch.randn(30, 3, dtype=torch.float64, device=DEVICE)
    x = base[:, 1]  # strided
    assert_rel(rf.grpo_advantages(x, 5, backend=BACKEND), ref.grpo_advantages(x, 5), 1e-12, "strided grpo")
    assert_rel(rf.rloo_advantages(x, 6, backend=BACKEND), ref.rloo_advantages(x, 6), 1e-12, "strided rloo")
    assert rf.grpo_advantages(torch.zeros(0, device=DEVICE), 3, backend=BACKEND).shape == (0,)


def test_grpo_constant_group_and_group_size_one():
    # a constant group: output 0; torch's std backward is 0 at σ = 0, so the gradient is
    # (g - mean(g)) / eps in the reference, and so it is here (the σ term dropped)
    s = torch.tensor([1.5, 1.5, 1.5, 0.0, 1.0, 2.0], dtype=torch.float64, device=DEVICE)
    g = torch.tensor([1.0, -2.0, 4.0, 0.5, 0.25, -1.0], dtype=torch.float64, device=DEVICE)
    x = s.clone().requires_grad_()
    out = rf.grpo_advantages(x, 3, backend=BACKEND)
    assert torch.equal(out[:3].detach(), torch.zeros(3, dtype=torch.float64, device=DEVICE))
    (out * g).sum().backward()
    assert torch.allclose(x.grad[:3], (g[:3] - g[:3].mean()) / 1e-6)
    x64 = s.clone().requires_grad_()
    (ref.grpo_advantages(x64, 3) * g).sum().backward()
    assert_rel(x.grad, x64.grad, 1e-12, "constant group")
    # group_size 1 without std: s - s = 0, zero gradient (with std the public API rejects it)
    x = torch.randn(5, device=DEVICE, requires_grad=True)
    out = rf.grpo_advantages(x, 1, normalize_std=False, backend=BACKEND)
    out.sum().backward()
    assert not out.any() and not x.grad.any()


def _rewards_mask(B, T, kind):
    pos = torch.arange(T)
    lengths = torch.randint(1, T + 1, (B,))
    if kind == "right":
        m = pos[None] < lengths[:, None]
    elif kind == "left":
        m = pos[None] >= (T - lengths)[:, None]
    elif kind == "holes":
        m = torch.rand(B, T) > 0.4
    else:  # every other row without a valid token
        m = torch.rand(B, T) > 0.5
        m[::2] = False
    return m.to(DEVICE)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"])
@pytest.mark.parametrize("kind", ["right", "left", "holes", "empty_rows"])
@pytest.mark.parametrize("T", [1, 45, 1500])
def test_kl_penalized_rewards_against_reference(estimator, kind, T):
    B = 3
    score = torch.randn(B, dtype=torch.float64)
    logp = -torch.rand(B, T, dtype=torch.float64) * 2
    ref_logp = logp + 0.3 * torch.randn(B, T, dtype=torch.float64)
    mask = _rewards_mask(B, T, kind)
    for dtype in (torch.float32, torch.float64):
        _compare(lambda *a: rf.kl_penalized_rewards(*a, mask, beta=0.05, estimator=estimator, backend=BACKEND),
                 lambda *a: ref.kl_penalized_rewards(*a, mask, 0.05, estimator), [score, logp, ref_logp], dtype)


def test_kl_penalized_rewards_masks_dtypes_and_score_gradient():
    B, T = 4, 7
    score = torch.randn(B, dtype=torch.float64, device=DEVICE)
    logp = -torch.rand(B, T, dtype=torch.float64, device=DEVICE)
    ref_logp = -torch.rand(B, T, dtype=torch.float64, device=DEVICE)
    m = torch.tensor([[1, 1, 0, 1, 0, 0, 0], [0] * 7, [0, 0, 0, 0, 0, 0, 1], [1] * 7], device=DEVICE)
    want = ref.kl_penalized_rewards(score, logp, ref_logp, m, 0.1, "k3")
    for mask in (m, m.bool(), m.double() * 0.5):  # masks: nonzero = valid, any dtype
        assert_rel(rf.kl_penalized_rewards(score, logp, ref_logp, mask, beta=0.1, estimator="k3", backend=BACKEND),
                   want, 1e-12, "mask dtype")
    x = score.clone().requires_grad_()
    g = torch.randn(B, T, dtype=torch.float64, device=DEVICE)
    (rf.kl_penalized_rewards(x, logp, ref_logp, m, beta=0.1, backend=BACKEND) * g).sum().backward()
    assert torch.equal(x.grad, torch.stack([g[0, 3], torch.zeros((), dtype=g.dtype, device=DEVICE), g[2, 6], g[3, 6]]))
    # mixed dtypes: math (and output) in fp64 when any input is fp64, as the reference
    out = rf.kl_penalized_rewards(score, logp.float(), ref_logp.bfloat16(), m, beta=0.1, backend=BACKEND)
    r = ref.kl_penalized_rewards(score, logp.float(), ref_logp.bfloat16(), m, 0.1)
    assert out.dtype == r.dtype == torch.float64
    assert_rel(out, r, OUT_TOL[torch.float32], "mixed dtypes")  # the reference's kl is fp32 here, ours fp64
    for dtype in (torch.bfloat16, torch.float16):
        lp = logp.to(dtype).requires_grad_()
        out = rf.kl_penalized_rewards(score.to(dtype), lp, ref_logp.to(dtype), m, beta=0.1, backend=BACKEND)
        assert out.dtype == torch.float32
        out.sum().backward()
        assert lp.grad.dtype == dtype
    e = torch.zeros(0, 5, device=DEVICE)
    assert rf.kl_penalized_rewards(torch.zeros(0, device=DEVICE), e, e, e, beta=0.1, backend=BACKEND).shape == (0, 5)


@pytest.mark.parametrize("B,T,kind", [(3, 1, "right"), (3, 1, "empty_rows"), (3, 37, "holes"), (4, 37, "empty_rows"),
                                      (1, 1100, "left")])
def test_reinforce_pp_returns_against_reference(B, T, kind):
    r = torch.randn(B, T, dtype=torch.float64)
    mask = _rewards_mask(B, T, kind)
    for dtype in (torch.float32, torch.float64):
        _compare(lambda x: rf.reinforce_pp_returns(x, mask, gamma=0.99, backend=BACKEND),
                 lambda x: ref.reinforce_pp_returns(x, mask, 0.99), [r], dtype)
    out = rf.reinforce_pp_returns(r.to(DEVICE, torch.bfloat16), mask, gamma=0.99, backend=BACKEND)
    assert out.dtype == torch.float32  # the math dtype, as every op and the reference


def test_advantages_under_torch_compile():
    s = torch.randn(12, device=DEVICE, requires_grad=True)
    logp = -torch.rand(3, 8, device=DEVICE, requires_grad=True)
    ref_logp = -torch.rand(3, 8, device=DEVICE)
    mask = torch.rand(3, 8, device=DEVICE) > 0.3

    def f(s, logp):
        a = rf.grpo_advantages(s, 4, backend=BACKEND) + rf.rloo_advantages(s, 3, backend=BACKEND)
        rew = rf.kl_penalized_rewards(a[:3], logp, ref_logp, mask, beta=0.1, estimator="k3+", backend=BACKEND)
        return (rf.reinforce_pp_returns(rew, mask, gamma=0.9, backend=BACKEND) ** 2).sum()

    out = torch.compile(f, fullgraph=True)(s, logp)
    grads = torch.autograd.grad(out, (s, logp))
    out_e = f(s, logp)
    grads_e = torch.autograd.grad(out_e, (s, logp))
    assert torch.allclose(out, out_e)
    for g, g_e in zip(grads, grads_e):
        assert torch.allclose(g, g_e, atol=1e-6)


def test_advantage_ops_reject_bad_input_in_cpp():
    x = torch.randn(6, device=DEVICE)
    with pytest.raises(RuntimeError, match="divide"):
        ops.grpo_advantages_fwd(x, 4, True, 1e-6)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.rloo_advantages_fwd(x.half(), 3)
    y = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="unknown estimator"):
        ops.kl_penalized_rewards_fwd(y[:, 0], y, y, y > 0, 0.1, "k9")
    with pytest.raises(RuntimeError, match="mask must be bool"):
        ops.kl_penalized_rewards_fwd(y[:, 0], y, y, y, 0.1, "k1")

# ----------------------------------------------------------------------------- ppo_loss_from_logits
FROM_LOGITS_OPS = ("ppo_from_logits_fwd", "ppo_from_logits_bwd")
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def test_from_logits_kernels_registered():
    for op in FROM_LOGITS_OPS:
        assert _compiled.has_kernel(op, "CPU"), op
        if _compiled.has_kernel("gae_fwd", "CUDA"):
            assert _compiled.has_kernel(op, "CUDA"), op


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_opcheck_ppo_from_logits(agg, with_ref):
    B, T, V = 3, 4, 37
    logits = torch.randn(B * T, V, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, V, (B * T,), device=DEVICE)
    labels[1] = -100
    old, adv, rf_ = (torch.randn(B, T, device=DEVICE, requires_grad=True) for _ in range(3))
    for mask in (torch.rand(B, T, device=DEVICE) > 0.3, torch.rand(B, T, device=DEVICE)):
        args = (logits, labels, old, adv, mask, rf_ if with_ref else None, 0.1, "k3", 0.01, 1 / 0.9, 0.2, 0.28,
                3.0, agg)
        torch.library.opcheck(ops.ppo_from_logits_fwd, args)
    _, _, saved = ops.ppo_from_logits_fwd(*args)
    torch.library.opcheck(ops.ppo_from_logits_bwd, (torch.tensor(0.7, device=DEVICE), logits.detach(), labels,
                                                    saved, 1 / 0.9))


_FL_OPTS = [
    dict(),
    dict(ref=True, kl_coef=0.1, entropy_coef=0.01, temperature=0.7),
    dict(ref=True, kl_coef=0.0, kl_estimator="k2+", clip_high=0.28, dual_clip=3.0),
    dict(ref=True, kl_coef=0.3, kl_estimator="abs", entropy_coef=0.2, dual_clip=2.0, temperature=1.3),
]
_FL_CASES = [(a, torch.float32, o) for a in AGGS for o in _FL_OPTS] + \
    [(a, d, _FL_OPTS[3]) for a in AGGS for d in (torch.bfloat16, torch.float16, torch.float64)]


@pytest.mark.parametrize("agg,dtype,opts", _FL_CASES)
def test_ppo_loss_from_logits_edge_cases(agg, dtype, opts):
    """Huge and -inf logits, an all-masked row, an ignored label, V over one 1024 chunk, vs float64."""
    B, T, V = 3, 5, 1301
    opts = dict(opts)
    use_ref = opts.pop("ref", False)
    logits = torch.randn(B, T, V, dtype=torch.float64) * 3
    logits[0] += 1e4  # the max is taken before the temperature: no precision lost
    labels = torch.randint(0, V, (B, T))
    logits[1, :, :7] = float("-inf")
    logits[1, :, 1100:] = float("-inf")  # a whole -inf chunk after the first
    labels[1] = torch.randint(7, 1100, (T,))
    mask = torch.rand(B, T) > 0.4
    mask[0, 1] = True
    mask[2] = False  # an all-masked row
    labels[0, 0], mask[0, 0] = -100, False
    logp_now = torch.log_softmax(logits / opts.get("temperature", 1.0), -1).gather(
        -1, labels.clamp(min=0)[..., None])[..., 0]
    old = logp_now + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    ref_logp = logp_now + 0.3 * torch.randn(B, T, dtype=torch.float64)
    keys = ["pg_loss", "entropy", "clipfrac", "approx_kl", "dual_clipfrac"] + (["kl"] if use_ref else [])

    def run(backend):
        def fn(x, o, a, *r):
            loss, st = rf.ppo_loss_from_logits(x, labels.to(DEVICE), o, a, mask.to(DEVICE),
                                               ref_logp=r[0] if r else None, agg=agg, backend=backend, **opts)
            return [loss] + [st[k] for k in keys]
        return fn
    args = [logits, old, adv] + ([ref_logp] if use_ref else [])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    _compare(run(BACKEND), run("reference"), args, dtype, tol=tol)


def test_ppo_loss_from_logits_strided_empty_deterministic():
    base = torch.randn(2, 6, 50, dtype=torch.float64, device=DEVICE)
    logits = base[..., :41]  # row stride 50, unit column stride: read in place
    labels = torch.randint(0, 41, (2, 6), device=DEVICE)
    old, adv = -torch.rand(2, 6, dtype=torch.float64, device=DEVICE), torch.randn(2, 6, dtype=torch.float64,
                                                                                   device=DEVICE)
    mask = torch.rand(2, 6, device=DEVICE) > 0.2
    kw = dict(ref_logp=old * 0.5, kl_coef=0.1, entropy_coef=0.05, agg="seq-mean-token-mean")
    a = rf.ppo_loss_from_logits(logits, labels, old, adv, mask, backend=BACKEND, **kw)
    b = rf.ppo_loss_from_logits(logits, labels, old, adv, mask, backend="reference", **kw)
    assert_rel(a[0], b[0], 1e-12, "strided logits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c = rf.ppo_loss_from_logits(logits, labels, old, adv, mask, backend=BACKEND, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[0], c[0]) and all(torch.equal(a[1][k], c[1][k]) for k in a[1])
    # logits stride on the vocabulary: copied by the wrapper
    x = base.transpose(1, 2).contiguous().transpose(1, 2)  # [2, 6, 50] with stride 6 on the vocabulary
    assert x.stride(-1) != 1
    assert_rel(rf.ppo_loss_from_logits(x[..., :41], labels, old, adv, mask, backend=BACKEND, **kw)[0],
               rf.ppo_loss_from_logits(x[..., :41], labels, old, adv, mask, backend="reference", **kw)[0], 1e-12,
               "vocabulary-strided logits")
    for agg in AGGS:  # N = 0 and all masked: zeros, no nan
        for shape in ((0, 5), (2, 3)):
            x = torch.randn(*shape, 9, device=DEVICE, requires_grad=True)
            z = torch.zeros(shape, device=DEVICE)
            loss, st = rf.ppo_loss_from_logits(x, torch.zeros(shape, dtype=torch.long, device=DEVICE), z, z + 1,
                                               z.bool(), ref_logp=z, kl_coef=0.1, entropy_coef=0.1, agg=agg,
                                               backend=BACKEND)
            assert loss.item() == 0 and all(v.item() == 0 for v in st.values())
            loss.backward()
            assert x.grad.shape == x.shape and not x.grad.any()
