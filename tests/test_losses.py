"""kl, masked reductions, PPO policy / value losses, reward-model loss, group advantages, shaped rewards."""
import math

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref
from utils import DEVICE, GRAD_TOL, OUT_TOL, assert_rel, backends

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _leaf(x, dtype=torch.float32):
    return x.to(DEVICE, dtype).requires_grad_()


def _compare(op, backend, args64, make_args, out_fn=lambda o: [o], dtype=torch.float32, tol=None):
    """Run op on `backend` with inputs cast to dtype, and the reference in float64; compare outputs and grads."""
    leaves = [a.detach().to(DEVICE, dtype).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for a in args64]
    leaves64 = [a.detach().to(DEVICE, dtype).double().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in args64]
    outs = out_fn(make_args(op, backend, leaves))
    outs64 = out_fn(make_args(op, "reference", leaves64))
    tol = tol or OUT_TOL[dtype]
    loss, loss64 = 0, 0
    for o, o64 in zip(outs, outs64):
        assert_rel(o, o64, tol, f"{backend} {op.__name__} output")
        w = torch.randn_like(o64)
        loss, loss64 = loss + (o.double() * w).sum(), loss64 + (o64 * w).sum()
    loss.backward()
    loss64.backward()
    for a, a64 in zip(leaves, leaves64):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            if a64.grad is None:  # input not used by this configuration
                assert a.grad is None or not a.grad.any(), f"{backend} {op.__name__}: gradient for an unused input"
                continue
            assert_rel(a.grad, a64.grad, max(tol, GRAD_TOL[dtype]), f"{backend} {op.__name__} grad")


# ----------------------------------------------------------------------------- kl
@pytest.mark.parametrize("backend", backends("kl"))
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"])
@pytest.mark.parametrize("clamp", [None, 0.3])
@pytest.mark.parametrize("dtype", FLOATS)
def test_kl_matches_reference(backend, estimator, clamp, dtype):
    logp, ref_logp = -torch.rand(6, 33, dtype=torch.float64) * 3, -torch.rand(6, 33, dtype=torch.float64) * 3
    _compare(rf.kl, backend, [logp, ref_logp],
             lambda op, b, a: op(a[0], a[1], estimator=estimator, clamp=clamp, backend=b), dtype=dtype)


def test_kl_values_and_straight_through_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    d = (logp - ref_logp).detach()
    assert torch.allclose(rf.kl(logp, ref_logp, estimator="k1"), d)
    assert torch.allclose(rf.kl(logp, ref_logp, estimator="k2"), 0.5 * d**2)
    assert torch.allclose(rf.kl(logp, ref_logp, estimator="k3"), torch.exp(-d) + d - 1)
    assert torch.allclose(rf.kl(logp, ref_logp, estimator="abs"), d.abs())
    out = rf.kl(logp, ref_logp, estimator="k3+")
    assert torch.allclose(out, torch.exp(-d) + d - 1)
    out.sum().backward()
    assert torch.allclose(logp.grad, d)  # k2's gradient
    assert torch.allclose(rf.kl(logp, ref_logp, estimator="k1", clamp=0.7), d.clamp(-0.7, 0.7))


def test_kl_bad_input():
    with pytest.raises(ValueError, match="estimator"):
        rf.kl(torch.zeros(3), torch.zeros(3), estimator="k4")
    with pytest.raises(ValueError, match="shape"):
        rf.kl(torch.zeros(3), torch.zeros(4))


# ----------------------------------------------------------------------------- masked reductions
def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert rf.masked_mean(x, m).item() == pytest.approx(7 / 3)
    assert torch.allclose(rf.masked_mean(x, m, dim=1), torch.tensor([1.5, 4.0], dtype=torch.float64))
    assert rf.masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty mask: 0, not nan
    w = rf.masked_whiten(x, m)
    vals = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    expect = (x.detach() - vals.mean()) / torch.sqrt(vals.var() + 1e-8)
    assert torch.allclose(w[m.bool()], expect[m.bool()])
    assert torch.allclose(rf.masked_whiten(x, m, shift_mean=False)[m.bool()], expect[m.bool()] + vals.mean())
    torch.autograd.gradcheck(lambda x: ref.masked_whiten(x, m), (x,))
    torch.autograd.gradcheck(lambda x: ref.masked_mean(x, torch.zeros_like(m), 1), (x,))
    with pytest.raises(ValueError, match="at least two"):
        rf.masked_whiten(x, torch.tensor([[0, 0, 0], [0, 1, 0]]))


# ----------------------------------------------------------------------------- PPO policy loss
def _ppo_by_hand(logp, old, adv, mask, clip_low, clip_high, dual_clip):
    """Per-token PPO loss written out with Python floats (token-mean)."""
    total, n = 0.0, 0
    for lp, o, a, m in zip(logp.flatten().tolist(), old.flatten().tolist(), adv.flatten().tolist(),
                           mask.flatten().tolist()):
        if not m:
            continue
        r = math.exp(max(-20.0, min(20.0, lp - o)))
        loss = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
        if dual_clip is not None and a < 0:
            loss = min(loss, -a * dual_clip)
        total, n = total + loss, n + 1
    return total / max(n, 1)


@pytest.mark.parametrize("clip_high,dual_clip", [(None, None), (0.28, None), (0.28, 3.0)])
def test_policy_loss_by_hand(clip_high, dual_clip):
    logp = -torch.rand(4, 9, dtype=torch.float64) * 2
    old = logp + torch.randn(4, 9, dtype=torch.float64) * 0.6
    adv = torch.randn(4, 9, dtype=torch.float64) * 2
    mask = torch.rand(4, 9) > 0.3
    loss, stats = rf.ppo_policy_loss(logp, old, adv, mask, clip_high=clip_high, dual_clip=dual_clip)
    want = _ppo_by_hand(logp, old, adv, mask, 0.2, clip_high or 0.2, dual_clip)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert 0 <= stats["clipfrac"].item() <= 1
    assert stats["approx_kl"].item() == pytest.approx(ref.masked_mean(old - logp, mask).item())


@pytest.mark.parametrize("backend", backends("ppo_policy_loss"))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("dual_clip", [None, 2.5])
@pytest.mark.parametrize("dtype", FLOATS)
def test_policy_loss_matches_reference(backend, agg, dual_clip, dtype):
    B, T = 5, 40
    logp = -torch.rand(B, T, dtype=torch.float64) * 2
    old = logp + torch.randn(B, T, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = (torch.rand(B, T) > 0.3).to(DEVICE)
    mask[1] = False  # an all-masked row
    _compare(rf.ppo_policy_loss, backend, [logp, old, adv, mask],
             lambda op, b, a: op(*a, clip_low=0.2, clip_high=0.3, dual_clip=dual_clip, agg=agg, backend=b),
             out_fn=lambda o: [o[0], o[1]["clipfrac"], o[1]["approx_kl"]], dtype=dtype)


def test_policy_loss_reference_gradcheck():
    logp = (-torch.rand(3, 5, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.5 * torch.randn(3, 5, dtype=torch.float64)
    adv = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.2
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        torch.autograd.gradcheck(lambda x: ref.ppo_policy_loss(x, old, adv, mask, 0.2, 0.3, 3.0, agg)[0], (logp,))


def test_policy_loss_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert ref.aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert ref.aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert ref.aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)


def test_policy_loss_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="agg"):
        rf.ppo_policy_loss(x, x, x, x, agg="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        rf.ppo_policy_loss(x, x, x, x, dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages must have the shape"):
        rf.ppo_policy_loss(x, x, torch.zeros(2, 4), x)
    with pytest.raises(ValueError, match="seq-mean"):
        rf.ppo_policy_loss(x[0], x[0], x[0], x[0], agg="seq-mean-token-sum")


# ----------------------------------------------------------------------------- value loss
def test_value_loss_by_hand():
    v = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    old = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    ret = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1])
    # token 0: unclipped (1-0)^2=1, clipped v=0.7 -> 0.49, max 1; token 1: 1 vs 1; token 2: 0.25, clipped 1.2 -> 1.69
    loss, stats = rf.ppo_value_loss(v, old, ret, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 1.69) / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss, _ = rf.ppo_value_loss(v, old, ret, mask, clip=None)
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 0.25) / 3)


@pytest.mark.parametrize("backend", backends("ppo_value_loss"))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_reference(backend, agg, clip):
    B, T = 4, 33
    v, old, ret = (torch.randn(B, T, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(B, T) > 0.3).to(DEVICE)
    _compare(rf.ppo_value_loss, backend, [v, old, ret, mask],
             lambda op, b, a: op(*a, clip=clip, agg=agg, backend=b), out_fn=lambda o: [o[0]])


# ----------------------------------------------------------------------------- reward model loss
def test_pairwise_reward_loss():
    c = torch.tensor([2.0, 0.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss = rf.pairwise_reward_loss(c, r)
    want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(want)
    assert rf.pairwise_reward_loss(c, r, margin=0.5).item() == pytest.approx(
        (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2)
    torch.autograd.gradcheck(lambda c: ref.pairwise_reward_loss(c, r, 0.1), (c,))
    with pytest.raises(ValueError, match="shape"):
        rf.pairwise_reward_loss(c, r[:1])


# ----------------------------------------------------------------------------- group advantages
def test_group_advantages_by_hand():
    s = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0], dtype=torch.float64)
    g = rf.grpo_advantages(s, 3)
    assert torch.allclose(g[:3], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (1.0 + 1e-6))
    assert torch.allclose(rf.grpo_advantages(s, 3, normalize_std=False)[3:],
                          torch.tensor([-4 / 3, -4 / 3, 8 / 3], dtype=torch.float64))
    r = rf.rloo_advantages(s, 3)
    assert torch.allclose(r[:3], torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="group_size"):
        rf.grpo_advantages(s, 4)


@pytest.mark.parametrize("backend", backends("grpo_advantages"))
def test_grpo_matches_reference(backend):
    s = torch.randn(8 * 4, dtype=torch.float64)
    _compare(rf.grpo_advantages, backend, [s], lambda op, b, a: op(a[0], 4, backend=b))


@pytest.mark.parametrize("backend", backends("rloo_advantages"))
def test_rloo_matches_reference(backend):
    s = torch.randn(8 * 5, dtype=torch.float64)
    _compare(rf.rloo_advantages, backend, [s], lambda op, b, a: op(a[0], 5, backend=b))


def test_reinforce_pp_returns_by_hand():
    r = torch.tensor([[1.0, 0.0, 2.0, 5.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 0]])
    out = rf.reinforce_pp_returns(r, m, gamma=0.5)
    assert torch.allclose(out, torch.tensor([[1 + 0.25 * 2, 0.5 * 2, 2.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("backend", backends("reinforce_pp_returns"))
def test_reinforce_pp_matches_reference(backend):
    r = torch.randn(6, 50, dtype=torch.float64)
    m = (torch.rand(6, 50) > 0.2).to(DEVICE)
    _compare(rf.reinforce_pp_returns, backend, [r, m], lambda op, b, a: op(a[0], a[1], gamma=0.97, backend=b))


# ----------------------------------------------------------------------------- shaped rewards
def test_kl_penalized_rewards_by_hand():
    score = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -1.0, -1.0]] * 3, dtype=torch.float64)
    ref_logp = torch.tensor([[-2.0, -1.0, -1.5]] * 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    out = rf.kl_penalized_rewards(score, logp, ref_logp, mask, beta=0.1)
    want = torch.tensor([[-0.1, 0.0 + 10.0, 0.0], [0.0, 0.0, -0.05 + 20.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(out, want)


@pytest.mark.parametrize("backend", backends("kl_penalized_rewards"))
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalized_rewards_matches_reference(backend, estimator):
    B, T = 5, 30
    score, logp, ref_logp = torch.randn(B, dtype=torch.float64), -torch.rand(B, T, dtype=torch.float64), \
        -torch.rand(B, T, dtype=torch.float64)
    mask = (torch.rand(B, T) > 0.3).to(DEVICE)
    _compare(rf.kl_penalized_rewards, backend, [score, logp, ref_logp, mask],
             lambda op, b, a: op(*a, beta=0.05, estimator=estimator, backend=b))


# ----------------------------------------------------------------------------- PPO loss from logits
@pytest.mark.parametrize("backend", backends("ppo_loss_from_logits"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_loss_from_logits_matches_reference(backend, dtype):
    B, T, V = 3, 7, 301
    logits = torch.randn(B, T, V, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    old = -torch.rand(B, T, dtype=torch.float64) * 6
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = (torch.rand(B, T) > 0.2).to(DEVICE)
    ref_logp = -torch.rand(B, T, dtype=torch.float64) * 6
    _compare(rf.ppo_loss_from_logits, backend, [logits, labels, old, adv, mask, ref_logp],
             lambda op, b, a: op(*a[:5], ref_logp=a[5],
                                 kl_coef=0.1, entropy_coef=0.01, temperature=0.9, backend=b),
             out_fn=lambda o: [o[0], o[1]["entropy"], o[1]["kl"]], dtype=dtype, tol=1e-4)


def test_ppo_loss_from_logits_is_the_composition():
    B, T, V = 2, 5, 17
    logits = torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    old, adv, ref_logp = -torch.rand(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64), \
        -torch.rand(B, T, dtype=torch.float64)
    mask = torch.ones(B, T)
    loss, stats = rf.ppo_loss_from_logits(logits, labels, old, adv, mask, ref_logp=ref_logp, kl_coef=0.2,
                                          entropy_coef=0.05)
    logp, ent = rf.logprobs(logits, labels, return_entropy=True)
    pg, _ = rf.ppo_policy_loss(logp, old, adv, mask)
    want = pg + 0.2 * rf.kl(logp, ref_logp).mean() - 0.05 * ent.mean()
    assert loss.item() == pytest.approx(want.item())
