"""Aggregation modes, global normalisers, per-token weights, [B, 1] advantages, grouped advantages with an
index, the KL importance ratio and the one output-dtype rule: every backend against reference.py in float64."""
import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref

from utils import DEVICE, GRAD_TOL, OUT_TOL, assert_rel, backends

AGGS = rf.AGG_MODES


def _mask(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) > 0.3
    m[0] = False  # an all-masked row
    m[1, :] = False
    m[1, 0] = True  # a length-1 row
    return m.to(DEVICE)


def _by_hand(x, m, agg, num_tokens=None, num_seqs=None, w=None):
    """The aggregation written out row by row (independent of reference.aggregate)."""
    x = x.double() * (1 if w is None else w.double())
    m = m.double()
    rows = [(x[b] * m[b]).sum() for b in range(x.shape[0])]
    counts = [m[b].sum() for b in range(x.shape[0])]
    if agg == "token-sum":
        return sum(rows)
    if agg == "token-mean":
        n = sum(counts) if num_tokens is None else num_tokens
        return sum(rows) / n
    S = sum(1 for c in counts if c > 0) if num_seqs is None else num_seqs
    if agg == "seq-mean-token-mean":
        return sum(r / c for r, c in zip(rows, counts) if c > 0) / S
    out = sum(rows) / S
    return out / x.shape[1] if agg == "seq-mean-token-sum-norm" else out


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_aggregate_matches_the_formula(agg, norm, weighted):
    B, T = 5, 7
    x = torch.randn(B, T, dtype=torch.float64, device=DEVICE)
    m = _mask(B, T)
    w = torch.rand(B, T, dtype=torch.float64, device=DEVICE) if weighted else None
    kw = {}
    if norm and agg == "token-mean":
        kw["num_tokens"] = 41
    if norm and agg.startswith("seq-mean"):
        kw["num_seqs"] = 11
    out = rf.aggregate(x, m, agg, weights=w, **kw)
    expect = _by_hand(x, m, agg, kw.get("num_tokens"), kw.get("num_seqs"), w)
    assert abs(out.item() - float(expect)) < 1e-12 * max(1.0, abs(float(expect)))


def test_aggregate_errors():
    x = torch.randn(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        rf.aggregate(x, m, "seq-mean-token-sum", num_tokens=4)
    with pytest.raises(ValueError, match="num_seqs"):
        rf.aggregate(x, m, "token-mean", num_seqs=4)
    with pytest.raises(ValueError, match="num_tokens must be > 0"):
        rf.aggregate(x, m, "token-mean", num_tokens=0)
    with pytest.raises(ValueError, match="agg"):
        rf.aggregate(x, m, "seq-sum")
    with pytest.raises(ValueError, match="weights must be >= 0"):
        rf.ppo_policy_loss(x, x, x, m, weights=-torch.ones(2, 3))


def _norm_kwargs(agg, case):
    if case == "local":
        return {}
    if agg == "token-mean":
        return {"num_tokens": 37.0 if case == "number" else torch.tensor(37.0, device=DEVICE)}
    if agg.startswith("seq-mean"):
        return {"num_seqs": 9 if case == "number" else torch.tensor(9, device=DEVICE)}
    return {}


@pytest.mark.parametrize("backend", backends("ppo_policy_loss"))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("case", ["local", "number", "tensor"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("row_adv", [False, True])
def test_policy_loss_normalisers_weights(backend, agg, case, weighted, dtype, row_adv):
    B, T = 6, 9
    g = torch.Generator().manual_seed(1)
    lp = (torch.randn(B, T, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_()
    old = (torch.randn(B, T, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_()
    adv = torch.randn(B, 1 if row_adv else T, generator=g).to(DEVICE, dtype).requires_grad_()
    m = _mask(B, T, 2)
    w = torch.rand(B, T, generator=g).to(DEVICE, dtype) if weighted else None
    kw = _norm_kwargs(agg, case)
    loss, st = rf.ppo_policy_loss(lp, old, adv, m, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg,
                                  weights=w, backend=backend, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    leaves = [t.detach().double().requires_grad_() for t in (lp, old, adv)]
    r_loss, r_st = ref.ppo_policy_loss(*leaves, m, 0.2, 0.28, 3.0, agg, None if w is None else w.double(), **kw)
    assert_rel(loss, r_loss, OUT_TOL[dtype], f"{backend} {agg} loss")
    for k in ("clipfrac", "approx_kl", "dual_clipfrac"):
        assert_rel(st[k], r_st[k], OUT_TOL[dtype], f"{backend} {k}")
    go = torch.randn((), dtype=torch.float64)
    (loss.double() * go).backward()
    (r_loss * go).backward()
    for name, t, r in zip(("logp", "old_logp", "advantages"), (lp, old, adv), leaves):
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
        assert_rel(t.grad, r.grad, GRAD_TOL[dtype], f"{backend} {agg} d {name}")


@pytest.mark.parametrize("backend", backends("ppo_value_loss"))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("case", ["local", "number"])
@pytest.mark.parametrize("weighted", [False, True])
def test_value_loss_normalisers_weights(backend, agg, case, weighted):
    B, T = 5, 8
    g = torch.Generator().manual_seed(3)
    v, old, ret = (torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_() for _ in range(3))
    m = _mask(B, T, 4)
    w = torch.rand(B, T, generator=g, dtype=torch.float64).to(DEVICE) if weighted else None
    kw = _norm_kwargs(agg, case)
    loss, st = rf.ppo_value_loss(v, old, ret, m, clip=0.2, agg=agg, weights=w, backend=backend, **kw)
    leaves = [t.detach().clone().requires_grad_() for t in (v, old, ret)]
    r_loss, r_st = ref.ppo_value_loss(*leaves, m, 0.2, agg, w, **kw)
    assert_rel(loss, r_loss, 1e-10, f"{backend} {agg}")
    assert_rel(st["vf_clipfrac"], r_st["vf_clipfrac"], 1e-10, "vf_clipfrac")
    loss.backward()
    r_loss.backward()
    for t, r in zip((v, old, ret), leaves):
        assert_rel(t.grad, r.grad, 1e-10, f"{backend} {agg} grad")


@pytest.mark.parametrize("backend", backends("ppo_loss_from_logits"))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("row_adv", [False, True])
def test_loss_from_logits_normalisers(backend, agg, row_adv):
    B, T, V = 4, 6, 37
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    old = torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE) * 0.1 - 3.5
    adv = torch.randn(B, 1 if row_adv else T, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    rlp = old + 0.05
    m = _mask(B, T, 6)
    kw = _norm_kwargs(agg, "number")
    common = dict(ref_logp=rlp, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, agg=agg, **kw)
    loss, st = rf.ppo_loss_from_logits(logits, labels, old, adv, m, backend=backend, **common)
    lx, ax = logits.detach().clone().requires_grad_(), adv.detach().clone().requires_grad_()
    r_loss, r_st = ref.ppo_loss_from_logits(lx, labels, old, ax, m, rlp, 0.1, "k3", 0.01, 1.0, 0.2, None, 3.0, agg,
                                            None, kw.get("num_tokens"), kw.get("num_seqs"))
    assert_rel(loss, r_loss, 1e-10, f"{backend} {agg}")
    for k in ("pg_loss", "entropy", "kl", "clipfrac"):
        assert_rel(st[k], r_st[k], 1e-10, k)
    loss.backward()
    r_loss.backward()
    assert_rel(logits.grad, lx.grad, 1e-10, "d logits")
    assert_rel(adv.grad, ax.grad, 1e-10, "d advantages")


def test_loss_from_logits_weights_every_backend():
    B, T, V = 2, 3, 5
    logits = torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    x = torch.randn(B, T, dtype=torch.float64)
    m = torch.ones(B, T)
    w = torch.rand(B, T, dtype=torch.float64)
    logp = ref.logprobs(logits, labels)
    expect, _ = ref.ppo_policy_loss(logp, x, x, m, weights=w)
    for b in backends("ppo_loss_from_logits"):  # (tests/test_loss_types.py: every agg, dtype, loss_type)
        loss, _ = rf.ppo_loss_from_logits(logits, labels, x, x, m, weights=w, backend=b)
        assert_rel(loss, expect, 1e-12, f"{b} weighted policy term")


# ----------------------------------------------------------------------------- group advantages
def _groups_by_hand(s, idx, normalize_std, eps):
    out = torch.empty_like(s)
    for g in idx.unique():
        sel = idx == g
        x = s[sel]
        if x.numel() == 1:
            out[sel] = x / (1 + eps) if normalize_std else x
            continue
        y = x - x.mean()
        out[sel] = y / (x.std() + eps) if normalize_std else y
    return out


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_grpo_group_index_uneven(normalize_std, eps):
    g = torch.Generator().manual_seed(7)
    idx = torch.tensor([3, 1, 3, 3, 9, 1, 5, 5, 5, 5, 3])  # sizes 4, 2, 1, 4, interleaved
    s = torch.randn(idx.numel(), generator=g, dtype=torch.float64)
    s[6:10] = 0.5  # a constant group: std 0
    leaf = s.clone().requires_grad_()
    out = rf.grpo_advantages(leaf, group_index=idx, normalize_std=normalize_std, eps=eps)
    assert_rel(out, _groups_by_hand(s, idx, normalize_std, eps), 1e-12, "grpo group_index")
    out.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    # the same groups laid out consecutively agree with the kernels' group_size path
    even = torch.arange(12) // 4
    x = torch.randn(12, dtype=torch.float64)
    for b in backends("grpo_advantages"):
        assert_rel(rf.grpo_advantages(x, 4, eps=eps, backend=b), rf.grpo_advantages(x, group_index=even, eps=eps),
                   1e-10, f"{b} grpo eps={eps}")
    with pytest.raises(ValueError, match="not both"):
        rf.grpo_advantages(x, 4, group_index=even)
    with pytest.raises(NotImplementedError, match="reference"):
        rf.grpo_advantages(x, group_index=even, backend="cpu")


def test_grpo_eps_reaches_every_backend():
    x = torch.tensor([1.0, 1.0 + 1e-5, 2.0, 2.0], dtype=torch.float64)
    for b in backends("grpo_advantages"):
        a4 = rf.grpo_advantages(x, 2, eps=1e-4, backend=b)
        assert_rel(a4, ref.grpo_advantages(x, 2, True, 1e-4), 1e-10, f"{b} eps")
        assert not torch.allclose(a4, rf.grpo_advantages(x, 2, backend=b))  # the default 1e-6 differs here


def test_rloo_group_index():
    idx = torch.tensor([0, 0, 2, 1, 1, 1, 0])
    s = torch.randn(7, dtype=torch.float64)
    out = rf.rloo_advantages(s, group_index=idx)
    expect = torch.empty_like(s)
    for i in range(7):
        others = [s[j] for j in range(7) if idx[j] == idx[i] and j != i]
        expect[i] = s[i] - (sum(others) / len(others) if others else 0.0)
    assert_rel(out, expect, 1e-12, "rloo group_index")


# ----------------------------------------------------------------------------- KL ratio, dtype rule
@pytest.mark.parametrize("backend", backends("kl"))
def test_kl_importance_ratio(backend):
    g = torch.Generator().manual_seed(8)
    lp, rl, old = (torch.randn(4, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    out = rf.kl(lp, rl, estimator="k3", old_logp=old, backend=backend)
    leaves = [t.detach().clone().requires_grad_() for t in (lp, rl, old)]
    d = leaves[1] - leaves[0]
    expect = (torch.exp(d) - d - 1) * torch.exp(leaves[0] - leaves[2])  # TRL's use_bias_correction_kl
    assert_rel(out, expect, 1e-12, "kl·ratio")
    out.sum().backward()
    expect.sum().backward()
    for t, r in zip((lp, rl, old), leaves):
        assert_rel(t.grad, r.grad, 1e-12, "kl·ratio grad")


def test_one_output_dtype_rule():
    """Every op returns fp32 for half inputs and fp64 for fp64 inputs, on every backend."""
    B, T = 3, 4
    for dtype, out in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)):
        x = torch.randn(B, T).to(dtype)
        m = torch.ones(B, T, dtype=torch.bool)
        for b in backends("gae"):
            assert all(t.dtype == out for t in rf.gae(x, x, m, backend=b)), b
        for b in backends("reinforce_pp_returns"):
            assert rf.reinforce_pp_returns(x, m, backend=b).dtype == out, b
        for b in backends("kl"):
            assert rf.kl(x, x, backend=b).dtype == out, b
        for b in backends("ppo_policy_loss"):
            assert rf.ppo_policy_loss(x, x, x, m, backend=b)[0].dtype == out, b
        for b in backends("grpo_advantages"):
            assert rf.grpo_advantages(x.reshape(-1), 4, backend=b).dtype == out, b
        assert rf.aggregate(x, m).dtype == out
