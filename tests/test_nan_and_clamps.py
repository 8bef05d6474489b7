"""NaN propagation and the gradient conventions at the exact ends of every clamp, for the per-token
ops (kl, PPO policy / value losses, GAE, REINFORCE++ returns, group advantages, shaped rewards and the
token part of ppo_loss_from_logits), every backend, forward and backward, against the float64
reference (issue 10, items 1 and 2).

Conventions pinned here (rlhf_fast/reference.py writes them out with torch.where):
  * a clamp passes its input, and the gradient, at its exact ends (lo <= x <= hi); NaN passes too;
  * max(a, b) / min(a, b) in the PPO losses take the second branch only where it is strictly
    larger / smaller (or NaN): on a tie the first (unclipped) branch takes the whole gradient.
"""
import math

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref
from utils import DEVICE, GRAD_TOL, OUT_TOL, assert_rel, backends

NAN = float("nan")
DTYPES = [torch.float32, torch.float64]


def _is_float(a):
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _flat(res):
    """An op's result as a list of tensors: (loss, stats) -> [loss, *stats in key order]."""
    if isinstance(res, torch.Tensor):
        return [res]
    out = []
    for r in res:
        out += [r[k] for k in sorted(r)] if isinstance(r, dict) else [r]
    return out


def _check(call, args64, backend, dtype, tol=None):
    """call(backend, *args) with the float inputs cast to dtype vs the reference on those values in
    float64: outputs and input gradients, NaN exactly where the reference has NaN."""
    xs = [a.detach().to(DEVICE, dtype).requires_grad_() if _is_float(a) else a for a in args64]
    xs64 = [a.detach().double().requires_grad_() if _is_float(a) else a for a in xs]
    outs, outs64 = _flat(call(backend, *xs)), _flat(call("reference", *xs64))
    assert len(outs) == len(outs64)
    tol = tol or OUT_TOL[dtype]
    loss = loss64 = 0
    for i, (o, o64) in enumerate(zip(outs, outs64)):
        assert_rel(o, o64, tol, f"{backend} output {i}")
        if o64.requires_grad:
            w = torch.randn(o64.shape, dtype=torch.float64, device=DEVICE)
            loss, loss64 = loss + (o.double() * w).sum(), loss64 + (o64 * w).sum()
    loss.backward()
    loss64.backward()
    for i, (a, a64) in enumerate(zip(xs, xs64)):
        if _is_float(a):
            if a64.grad is None:
                assert a.grad is None or not a.grad.any(), f"{backend}: gradient for unused input {i}"
            else:
                assert a.grad is not None, f"{backend}: no gradient for input {i}"
                assert_rel(a.grad, a64.grad, max(tol, GRAD_TOL[dtype]), f"{backend} grad of input {i}")
    return outs64


def _mask(B=3, T=8):
    m = torch.rand(B, T) > 0.3
    m[0, 3], m[1, 5], m[2] = True, False, False  # NaN goes to (0, 3) (valid) and (1, 5) (masked)
    m[2, 1] = True
    return m.to(DEVICE)


def _poison(x):
    x = x.clone()
    x[0, 3] = NAN
    x[1, 5] = NAN
    return x


# ----------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("backend", backends("kl"))
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k3+"])
@pytest.mark.parametrize("clamp", [None, 0.3])
@pytest.mark.parametrize("which", [0, 1])
def test_kl_nan(backend, estimator, clamp, which):
    args = [-torch.rand(3, 8, dtype=torch.float64) * 2, -torch.rand(3, 8, dtype=torch.float64) * 2]
    args[which] = _poison(args[which])
    outs = _check(lambda b, x, y: rf.kl(x, y, estimator=estimator, clamp=clamp, backend=b), args, backend,
                  torch.float32)
    assert outs[0].isnan().sum() == 2  # exactly the two poisoned tokens


@pytest.mark.parametrize("backend", backends("ppo_policy_loss"))
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("dual_clip,agg", [(None, "token-mean"), (2.5, "seq-mean-token-mean")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_nan(backend, which, dual_clip, agg, dtype):
    logp = -torch.rand(3, 8, dtype=torch.float64) * 2
    args = [logp, logp + 0.4 * torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)]
    args[which] = _poison(args[which])
    mask = _mask()
    outs = _check(lambda b, *a: rf.ppo_policy_loss(*a, mask, clip_high=0.3, dual_clip=dual_clip, agg=agg, backend=b),
                  args, backend, dtype)
    assert outs[0].isnan()  # the loss (the NaN at a masked token too: masked tokens are weighted by 0)


@pytest.mark.parametrize("backend", backends("ppo_value_loss"))
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_loss_nan(backend, which, clip, dtype):
    args = [torch.randn(3, 8, dtype=torch.float64) for _ in range(3)]
    args[which] = _poison(args[which])
    mask = _mask()
    outs = _check(lambda b, *a: rf.ppo_value_loss(*a, mask, clip=clip, backend=b), args, backend, dtype)
    assert outs[0].isnan() == (which != 1 or clip is not None)  # old_values only enter the clipped loss


@pytest.mark.parametrize("backend", backends("gae"))
@pytest.mark.parametrize("which", [0, 1])
def test_gae_nan(backend, which):
    args = [torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)]
    args[which] = _poison(args[which])
    mask = _mask()
    adv, _ = _check(lambda b, r, v: rf.gae(r, v, mask, gamma=0.9, lam=0.8, backend=b), args, backend, torch.float32)
    # back in time from (0, 3) over the valid positions; the NaN at a masked position is skipped
    assert adv[0, :4][mask[0, :4]].isnan().all() and not adv[0, 4:].isnan().any() and not adv[1:].isnan().any()


@pytest.mark.parametrize("backend", backends("reinforce_pp_returns"))
def test_reinforce_pp_returns_nan(backend):
    mask = _mask()
    _check(lambda b, r: rf.reinforce_pp_returns(r, mask, gamma=0.9, backend=b),
           [_poison(torch.randn(3, 8, dtype=torch.float64))], backend, torch.float32)


@pytest.mark.parametrize("op,kw", [("grpo_advantages", {}), ("grpo_advantages", {"normalize_std": False}),
                                   ("rloo_advantages", {})])
def test_group_advantages_nan(op, kw):
    s = torch.randn(12, dtype=torch.float64)
    s[5] = NAN  # the second group of 4
    for backend in backends(op):
        outs = _check(lambda b, x: getattr(rf, op)(x, 4, backend=b, **kw), [s], backend, torch.float32)
        assert outs[0].isnan().tolist() == [False] * 4 + [True] * 4 + [False] * 4


@pytest.mark.parametrize("backend", backends("kl_penalized_rewards"))
@pytest.mark.parametrize("which", [0, 1, 2])
def test_kl_penalized_rewards_nan(backend, which):
    args = [torch.randn(3, dtype=torch.float64), -torch.rand(3, 8, dtype=torch.float64),
            -torch.rand(3, 8, dtype=torch.float64)]
    if which == 0:
        args[0][0] = NAN  # a row with valid tokens
        args[0][2] = NAN  # row 2: one valid token
    else:
        args[which] = _poison(args[which])
    mask = _mask()
    outs = _check(lambda b, *a: rf.kl_penalized_rewards(*a, mask, beta=0.1, estimator="k3", backend=b), args,
                  backend, torch.float32)
    if which == 0:  # only the last valid token of a row depends on its score
        assert outs[0].isnan().sum() == 2


@pytest.mark.parametrize("backend", backends("ppo_loss_from_logits"))
@pytest.mark.parametrize("which", [2, 3, 5])
def test_ppo_loss_from_logits_nan_in_token_inputs(backend, which):
    B, T, V = 3, 8, 37
    logits = torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    args = [logits, labels, -torch.rand(B, T, dtype=torch.float64) * 4, torch.randn(B, T, dtype=torch.float64),
            _mask(), -torch.rand(B, T, dtype=torch.float64) * 4]
    args[which] = _poison(args[which])
    for kl_coef in (0.0, 0.1):  # with kl_coef = 0 the KL is a statistic only: NaN there, not in the loss
        outs = _check(lambda b, *a: rf.ppo_loss_from_logits(*a[:5], ref_logp=a[5], kl_coef=kl_coef, entropy_coef=0.01,
                                                            dual_clip=3.0, backend=b),
                      args, backend, torch.float32, tol=1e-4)
        assert outs[0].isnan() == (which != 5 or kl_coef != 0)


# ----------------------------------------------------------------------------- clamp endpoints
def _endpoint_policy_inputs():
    """Tokens at ratio exactly 1 and at log-ratio exactly ±20, each with A > 0 and A < 0, plus ordinary ones."""
    lp = torch.tensor([-1.0, -1.0, 0.0, 0.0, -20.0, -20.0, -0.5, -1.5], dtype=torch.float64)
    old = torch.tensor([-1.0, -1.0, -20.0, -20.0, 0.0, 0.0, -0.25, -2.0], dtype=torch.float64)
    adv = torch.tensor([0.75, -1.5, 0.5, -0.5, 2.0, -2.0, 1.0, -1.0], dtype=torch.float64)
    return lp, old, adv


def _policy_grad_by_hand(lp, old, adv, lo, hi):
    """d token-mean loss / d logp under the documented conventions (ties: the unclipped branch;
    clamp ends pass the gradient)."""
    g = []
    for x, o, a in zip(lp.tolist(), old.tolist(), adv.tolist()):
        lr = x - o
        r = math.exp(min(max(lr, -20.0), 20.0))
        rc = min(max(r, lo), hi)
        clipped = -a * rc > -a * r  # strictly: a tie takes the unclipped branch (there rc == r)
        g.append(0.0 if clipped else -a * r * (1.0 if -20.0 <= lr <= 20.0 else 0.0))
    return torch.tensor(g, dtype=torch.float64) / len(g)


@pytest.mark.parametrize("backend", backends("ppo_policy_loss"))
@pytest.mark.parametrize("clip_low,clip_high", [(0.0, 0.3), (0.2, 0.0)])  # ratio 1 = 1 - clip_low / 1 + clip_high
@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_at_clip_endpoints(backend, clip_low, clip_high, dtype):
    lp, old, adv = _endpoint_policy_inputs()
    mask = torch.ones(8, dtype=torch.bool, device=DEVICE)
    x = lp.clone().requires_grad_()
    loss, _ = ref.ppo_policy_loss(x, old, adv, mask.cpu(), clip_low, clip_high, None, "token-mean")
    loss.backward()
    want = _policy_grad_by_hand(lp, old, adv, 1 - clip_low, 1 + clip_high)
    assert torch.allclose(x.grad, want, rtol=1e-12, atol=0), (x.grad, want)  # the reference states the convention
    assert want[0] != 0 and want[1] != 0 and want[3] != 0 and want[4] != 0  # the endpoint tokens pass gradient
    _check(lambda b, *a: rf.ppo_policy_loss(*a, mask, clip_low=clip_low, clip_high=clip_high, backend=b),
           [lp, old, adv], backend, dtype)


@pytest.mark.parametrize("backend", backends("ppo_value_loss"))
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
def test_value_loss_at_clip_endpoints(backend, dtype):
    # v - old_v exactly ±clip (dyadic numbers: exact in every dtype): the clipped value is v itself, a tie
    old = torch.tensor([0.5, 0.5, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    v = old + torch.tensor([0.25, -0.25, 0.25, -0.25, 1.0, 0.125], dtype=torch.float64)
    ret = torch.tensor([2.0, -1.0, 0.5, 2.5, 0.5, 0.0], dtype=torch.float64)
    mask = torch.ones(6, dtype=torch.bool, device=DEVICE)
    xv, xo = v.clone().requires_grad_(), old.clone().requires_grad_()
    ref.ppo_value_loss(xv, xo, ret, mask.cpu(), 0.25, "token-mean")[0].backward()
    e = (v - ret) / 6
    assert torch.allclose(xv.grad[:4], e[:4], rtol=1e-14, atol=0) and not xo.grad[:4].any()  # a tie: all to v
    _check(lambda b, *a: rf.ppo_value_loss(*a, mask, clip=0.25, backend=b), [v, old, ret], backend, dtype)


@pytest.mark.parametrize("backend", backends("kl"))
@pytest.mark.parametrize("estimator,d,clamp", [("k1", 0.5, 0.5), ("k2", 1.0, 0.5), ("abs", 0.5, 0.5),
                                               ("k1+", 0.5, 0.5), ("abs+", 0.25, 0.25)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
def test_kl_at_clamp_endpoints(backend, estimator, d, clamp, dtype):
    # values exactly ±clamp (k1, abs) or +clamp (k2: ½·1² = 0.5) pass the gradient; beyond, 0
    ref_logp = torch.tensor([-1.0, -1.0, -2.0, -0.5, -1.0], dtype=torch.float64)
    logp = ref_logp + torch.tensor([d, -d, 2 * d, 0.5 * d, -2 * d], dtype=torch.float64)
    x = logp.clone().requires_grad_()
    ref.kl(x, ref_logp, estimator, clamp).sum().backward()
    plus, name = estimator.endswith("+"), estimator.rstrip("+")
    dd = logp - ref_logp
    grad_inside = dd if plus or name == "k2" else (torch.ones_like(dd) if name == "k1" else dd.sign())
    val = {"k1": dd, "k2": 0.5 * dd * dd, "abs": dd.abs()}[name]
    passes = (val >= -clamp) & (val <= clamp)
    assert torch.equal(x.grad, torch.where(passes, grad_inside, 0.0))
    assert passes[0] and passes[1] and not passes[2]
    _check(lambda b, *a: rf.kl(*a, estimator=estimator, clamp=clamp, backend=b), [logp, ref_logp], backend, dtype)
