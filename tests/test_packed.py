"""Packed sequences (cu_seqlens): every op gives, on every backend, what its padded [S, T] call gives,
forward and backward, with sequence lengths that include 0 and 1; checked against the float64
reference of the padded call."""
import pytest
import torch

import rlhf_fast as rf
from utils import DEVICE, assert_rel, backends

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
# random lengths (a fixed draw), with empty and length-1 sequences among them
LENGTHS = torch.randint(0, 9, (9,), generator=torch.Generator().manual_seed(13)).tolist() + [0, 1]
LENGTHS[2], LENGTHS[5] = 0, 1


def _layout(lengths=LENGTHS):
    """cu_seqlens, and the padded (seq, pos) of each packed token (built on the host, independently)."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    seq = torch.tensor([s for s, n in enumerate(lengths) for _ in range(n)], device=DEVICE, dtype=torch.long)
    pos = torch.tensor([t for n in lengths for t in range(n)], device=DEVICE, dtype=torch.long)
    return cu, seq, pos, len(lengths), max(lengths)


def _pad(x, seq, pos, S, T, fill=0):
    out = torch.full((S, T, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    out[seq, pos] = x.detach()
    return out


def _compare(op, backend, packed_args, n_seq_args=(), pad_fill=None, tol=1e-10, out_is_tokens=False, **kw):
    """op(packed, cu_seqlens) vs op(padded) on one backend (float64): outputs and gradients of the packed inputs."""
    cu, seq, pos, S, T = _layout()
    pad_fill = pad_fill or {}
    leaves = [a.clone().requires_grad_() if a.is_floating_point() else a for a in packed_args]
    padded = [a if i in n_seq_args else _pad(a, seq, pos, S, T, pad_fill.get(i, 0)) for i, a in enumerate(packed_args)]
    padded = [a.requires_grad_() if a.is_floating_point() else a for a in padded]
    out_p = op(*leaves, cu_seqlens=cu, backend=backend, **kw)
    out_d = op(*padded, backend=backend, **kw)
    outs_p = list(out_p) if isinstance(out_p, tuple) else [out_p]
    outs_d = list(out_d) if isinstance(out_d, tuple) else [out_d]
    if isinstance(outs_p[-1], dict):  # (loss, stats)
        sp, sd = outs_p.pop(), outs_d.pop()
        assert sorted(sp) == sorted(sd)
        for k in sd:
            assert_rel(sp[k], sd[k], tol, f"{backend} {op.__name__} stat {k}")
    total_p, total_d = 0, 0
    for o_p, o_d in zip(outs_p, outs_d):
        if out_is_tokens:
            o_d = o_d[seq, pos]
        assert_rel(o_p, o_d, tol, f"{backend} {op.__name__} output")
        g = torch.randn_like(o_p)
        total_p, total_d = total_p + (o_p * g).sum(), total_d + (o_d * g).sum()
    total_p.backward()
    total_d.backward()
    for i, (a, b) in enumerate(zip(leaves, padded)):
        if a.is_floating_point() and b.grad is not None:
            gb = b.grad if i in n_seq_args else b.grad[seq, pos]
            assert a.grad is not None, f"{backend} {op.__name__}: no gradient for input {i}"
            assert_rel(a.grad, gb, tol, f"{backend} {op.__name__} grad of input {i}")


def _tokens(n=None):
    n = n or sum(LENGTHS)
    return torch.randn(n, dtype=torch.float64, device=DEVICE)


def _mask(n=None):
    m = torch.rand(n or sum(LENGTHS), device=DEVICE) > 0.2
    return m


@pytest.mark.parametrize("backend", backends("gae"))
def test_gae(backend):
    _compare(rf.gae, backend, [_tokens(), _tokens(), _mask()], out_is_tokens=True, gamma=0.9, lam=0.8)


@pytest.mark.parametrize("backend", backends("reinforce_pp_returns"))
def test_reinforce_pp_returns(backend):
    _compare(rf.reinforce_pp_returns, backend, [_tokens(), _mask()], out_is_tokens=True, gamma=0.95)


@pytest.mark.parametrize("backend", backends("kl_penalized_rewards"))
def test_kl_penalized_rewards(backend):
    score = torch.randn(len(LENGTHS), dtype=torch.float64, device=DEVICE)
    _compare(lambda score, logp, ref, mask, **kw: rf.kl_penalized_rewards(score, logp, ref, mask, **kw), backend,
             [score, -torch.rand(sum(LENGTHS), dtype=torch.float64, device=DEVICE), _tokens(), _mask()],
             n_seq_args=(0,), out_is_tokens=True, beta=0.1, estimator="k3")


@pytest.mark.parametrize("backend", backends("ppo_policy_loss"))
@pytest.mark.parametrize("agg", AGGS)
def test_ppo_policy_loss(backend, agg):
    lp = -torch.rand(sum(LENGTHS), dtype=torch.float64, device=DEVICE)
    _compare(rf.ppo_policy_loss, backend, [lp, lp + 0.3 * _tokens(), _tokens(), _mask()], agg=agg, dual_clip=3.0)


@pytest.mark.parametrize("backend", backends("ppo_value_loss"))
@pytest.mark.parametrize("agg", AGGS)
def test_ppo_value_loss(backend, agg):
    v = _tokens()
    _compare(rf.ppo_value_loss, backend, [v, v + 0.3 * _tokens(), _tokens(), _mask()], agg=agg, clip=0.2)


@pytest.mark.parametrize("backend", backends("ppo_loss_from_logits"))
@pytest.mark.parametrize("agg", AGGS)
def test_ppo_loss_from_logits(backend, agg):
    N, V = sum(LENGTHS), 37
    logits = torch.randn(N, V, dtype=torch.float64, device=DEVICE) * 2
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[4] = -100
    old = -torch.rand(N, dtype=torch.float64, device=DEVICE) * 4
    _compare(lambda *a, **kw: rf.ppo_loss_from_logits(*a[:5], ref_logp=a[5], **kw), backend,
             [logits, labels, old, _tokens(), _mask(), old + 0.2 * _tokens()], pad_fill={1: -100}, agg=agg,
             kl_coef=0.1, entropy_coef=0.02)


@pytest.mark.parametrize("backend", backends("linear_ppo_loss"))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_ppo_loss(backend, agg, dtype):
    N, H, V = sum(LENGTHS), 8, 53
    hidden = torch.randn(N, H, dtype=dtype, device=DEVICE)
    weight = torch.randn(V, H, dtype=dtype, device=DEVICE) * 0.5
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[2] = -100
    old = -torch.rand(N, dtype=torch.float64, device=DEVICE) * 4
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    kw = dict(agg=agg, kl_coef=0.1, entropy_coef=0.02, dual_clip=2.5)
    if backend != "reference":
        kw["chunk_size"] = 5  # chunks that cut sequences
    _compare(lambda h, w, *a, **k: rf.linear_ppo_loss(h, w, *a[:4], ref_logp=a[4], **k), backend,
             [hidden, weight, labels, old.to(dtype), _tokens().to(dtype), _mask(), (old + 0.2 * _tokens()).to(dtype)],
             n_seq_args=(1,), pad_fill={2: -100}, tol=tol, **kw)


def test_packed_matches_float64_reference_of_the_padded_call():
    # one packed backend run against the float64 reference of the padded, materialised computation
    cu, seq, pos, S, T = _layout()
    N, H, V = sum(LENGTHS), 8, 53
    hidden, weight = torch.randn(N, H, device=DEVICE), torch.randn(V, H, device=DEVICE) * 0.5
    labels, old, adv, mask = torch.randint(0, V, (N,), device=DEVICE), -torch.rand(N, device=DEVICE) * 4, \
        torch.randn(N, device=DEVICE), _mask()
    for backend in backends("linear_ppo_loss"):
        loss, _ = rf.linear_ppo_loss(hidden, weight, labels, old, adv, mask, agg="seq-mean-token-mean", cu_seqlens=cu,
                                     backend=backend)
        pad = lambda x, f=0: _pad(x, seq, pos, S, T, f)  # noqa: E731
        loss64, _ = rf.ppo_loss_from_logits(pad(hidden.double()) @ weight.double().T, pad(labels, -100),
                                            pad(old.double()), pad(adv.double()), pad(mask),
                                            agg="seq-mean-token-mean", backend="reference")
        assert_rel(loss, loss64, 2e-5, f"{backend} packed linear_ppo_loss")


def test_bad_cu_seqlens():
    x, m = _tokens(6), _mask(6)
    for cu, what in [(torch.tensor([0, 2, 5]), "number of tokens"), (torch.tensor([0, 4, 2, 6]), "non-decreasing"),
                     (torch.tensor([1, 6]), "from 0"), (torch.tensor([0.0, 6.0]), "integer")]:
        with pytest.raises(ValueError, match="cu_seqlens"):
            rf.gae(x, x, m, cu_seqlens=cu.to(DEVICE))
    with pytest.raises(ValueError, match="max_seqlen"):
        rf.gae(x, x, m, cu_seqlens=torch.tensor([0, 4, 6], device=DEVICE), max_seqlen=3)
    with pytest.raises(ValueError, match=r"\[N\]"):
        rf.gae(x.view(2, 3), x.view(2, 3), m.view(2, 3), cu_seqlens=torch.tensor([0, 6], device=DEVICE))


def test_max_seqlen_avoids_the_sync():
    cu, *_ = _layout()
    x, m = _tokens(), _mask()
    a, _ = rf.gae(x, x, m, cu_seqlens=cu, max_seqlen=max(LENGTHS) + 3)  # a larger T pads more, same result
    b, _ = rf.gae(x, x, m, cu_seqlens=cu)
    assert torch.equal(a, b)
