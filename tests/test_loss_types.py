"""loss_type ("ppo" | "gspo" | "cispo"), weights and the normalisers on the three policy-loss ops
(ppo_policy_loss, ppo_loss_from_logits, linear_ppo_loss) and rf.aggregate(cu_seqlens=): every backend
against the float64 reference, forward and backward, for [B, T] and packed inputs; the reference itself
against verl 0.9.1's compute_policy_loss_vanilla / _gspo / _cispo and agg_loss (global_batch_info)."""
import warnings

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref

from utils import DEVICE, GRAD_TOL, OUT_TOL, assert_rel, backends

LOSS_TYPES = ["ppo", "gspo", "cispo"]
AGGS = list(rf.AGG_MODES)
STATS = ("clipfrac", "approx_kl", "dual_clipfrac")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _f32(*ts):
    """Values representable in fp32: the fp32 runs and the fp64 reference see the same inputs."""
    return tuple(t.float().double() if t.is_floating_point() else t for t in ts)


def _norms(agg):
    """Global normalisers that differ from the local counts (data parallelism)."""
    return {"num_tokens": 23.0} if agg == "token-mean" else {"num_seqs": 7} if agg.startswith("seq") else {}


def _mask(B, T, g):
    m = torch.rand(B, T, generator=g) > 0.3
    m[0] = False            # an all-masked row
    m[1] = False
    m[1, 2] = True          # a length-1 sequence
    return m


def _policy_inputs(B=4, T=9, seed=0):
    g = _gen(seed)
    lp = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1.5
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) + 0.7  # a loss far from 0 (no cancellation)
    w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return _f32(lp, old, adv, _mask(B, T, g), w)


def _leaves(ts, dtype):
    return [t.detach().to(DEVICE, dtype).requires_grad_() for t in ts]


def _grad(t):
    """A leaf's gradient; None (gspo and cispo detach the ratio from old_logp in the reference) reads 0."""
    return torch.zeros_like(t) if t.grad is None else t.grad


def _compare(out, expect, leaves, leaves64, dtype, what):
    (loss, st), (loss64, st64) = out, expect
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
    assert_rel(loss, loss64, OUT_TOL[dtype], f"{what} loss")
    for k in st64:
        assert_rel(st[k], st64[k], OUT_TOL[dtype], f"{what} stat {k}")
    for i, (a, b) in enumerate(zip(leaves, leaves64)):
        assert a.grad is None or a.grad.dtype == a.dtype, f"{what} grad {i} dtype"
        assert_rel(_grad(a), _grad(b), GRAD_TOL[dtype], f"{what} grad {i}")


# ----------------------------------------------------------------------------- ppo_policy_loss
@pytest.mark.parametrize("backend", backends("ppo_policy_loss"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("weighted", [False, True])
def test_policy_loss(backend, loss_type, agg, weighted):
    lp, old, adv, m, w = _policy_inputs(seed=1)
    kw = dict(agg=agg, loss_type=loss_type, clip_high=0.28, **_norms(agg))
    x = _leaves((lp, old, adv), torch.float32)
    x64 = _leaves((lp, old, adv), torch.float64)
    out = rf.ppo_policy_loss(*x, m.to(DEVICE), weights=w.float().to(DEVICE) if weighted else None, backend=backend,
                             **kw)
    out[0].backward()
    expect = ref.ppo_policy_loss(*x64, m.to(DEVICE), 0.2, 0.28, None, agg, w.to(DEVICE) if weighted else None,
                                 kw.get("num_tokens"), kw.get("num_seqs"), loss_type)
    expect[0].backward()
    _compare(out, expect, x, x64, torch.float32, f"{backend} {loss_type} {agg}")


@pytest.mark.parametrize("backend", backends("ppo_policy_loss"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_policy_loss_dtypes(backend, loss_type, dtype):
    lp, old, adv, m, w = _policy_inputs(seed=2)
    lp, old, adv = (t.to(dtype).double() for t in (lp, old, adv))  # representable in dtype
    x, x64 = _leaves((lp, old, adv), dtype), _leaves((lp, old, adv), torch.float64)
    out = rf.ppo_policy_loss(*x, m, weights=w.to(dtype), agg="seq-mean-token-mean", loss_type=loss_type,
                             backend=backend)
    out[0].backward()
    expect = ref.ppo_policy_loss(*x64, m, agg="seq-mean-token-mean", weights=w.to(dtype).double(),
                                 loss_type=loss_type)
    expect[0].backward()
    _compare(out, expect, x, x64, dtype, f"{backend} {loss_type} {dtype}")


def test_gspo_sequence_ratio_by_hand():
    """GSPO-token: every token of a sequence sees the ratio exp(mean log-ratio), clamped at 10, and its own
    gradient d ℓ_t / d logp_t = -A_t·s_i (unclipped branch) or 0, no gradient across tokens."""
    lp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-1.5, -1.9, -0.4, 5.0], [-13.0, -13.0, -12.0, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, -1.0, 2.0, 1.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    s = torch.stack([((lp - old) * m)[i].sum() / m[i].sum() for i in range(2)])  # 0.1, 11.666... (> 10: clamped)
    r = torch.exp(s.clamp(max=10.0))[:, None].expand(2, 4)
    pg = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    expect = (pg * m).sum() / m.sum()
    for b in backends("ppo_policy_loss"):
        leaf = lp.clone().requires_grad_()
        loss, st = rf.ppo_policy_loss(leaf, old, adv, m, loss_type="gspo", backend=b)
        loss.backward()
        assert_rel(loss, expect, 1e-12, f"{b} gspo value")
        unclipped = (-adv * r >= -adv * r.clamp(0.8, 1.2)) & (s[:, None] <= 10)
        assert_rel(leaf.grad, torch.where(unclipped & m, -adv * r / m.sum(), 0.0), 1e-12, f"{b} gspo grad")
        assert_rel(st["approx_kl"], ((old - lp) * m).sum() / m.sum(), 1e-12, f"{b} gspo approx_kl (unclamped)")
        assert st["dual_clipfrac"] == 0


def test_cispo_by_hand():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    old = torch.tensor([-1.5, -1.0, -0.5, -3.1], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    m = torch.ones(4, dtype=torch.bool)
    r = torch.exp(lp - old)
    rc = r.clamp(0.8, 1.28)
    for b in backends("ppo_policy_loss"):
        leaves = [t.clone().requires_grad_() for t in (lp, old, adv)]
        loss, st = rf.ppo_policy_loss(*leaves, m, loss_type="cispo", clip_high=0.28, agg="token-sum", backend=b)
        loss.backward()
        assert_rel(loss, (-rc * adv * lp).sum(), 1e-12, f"{b} cispo value")
        assert_rel(leaves[0].grad, -rc * adv, 1e-12, f"{b} cispo d logp")
        assert_rel(leaves[2].grad, -rc * lp, 1e-12, f"{b} cispo d adv")
        assert_rel(_grad(leaves[1]), torch.zeros(4, dtype=torch.float64), 0, f"{b} cispo d old_logp")
        assert st["clipfrac"].item() == 0.5  # tokens 0 and 1 are outside [0.8, 1.28]


def test_bad_loss_type_arguments():
    lp, old, adv, m, _ = _policy_inputs()
    with pytest.raises(ValueError, match="loss_type"):
        rf.ppo_policy_loss(lp, old, adv, m, loss_type="grpo")
    with pytest.raises(ValueError, match="dual_clip"):
        rf.ppo_policy_loss(lp, old, adv, m, loss_type="gspo", dual_clip=3.0)
    with pytest.raises(ValueError, match="gspo"):
        rf.ppo_policy_loss(lp.reshape(-1), old.reshape(-1), adv.reshape(-1), m.reshape(-1), loss_type="gspo")
    V = 5
    logits = torch.randn(*lp.shape, V)
    labels = torch.zeros(lp.shape, dtype=torch.long)
    with pytest.raises(ValueError, match="loss_type"):
        rf.ppo_loss_from_logits(logits, labels, old, adv, m, loss_type="sapo")
    with pytest.raises(ValueError, match="weights"):
        rf.linear_ppo_loss(torch.randn(*lp.shape, 3), torch.randn(V, 3), labels, old, adv, m, weights=-torch.ones(lp.shape))
    with pytest.raises(ValueError, match="num_tokens"):
        rf.linear_ppo_loss(torch.randn(*lp.shape, 3), torch.randn(V, 3), labels, old, adv, m, agg="token-sum",
                           num_tokens=4)


# ----------------------------------------------------------------------------- verl as the oracle
verl_core = None


def _verl():
    global verl_core
    if verl_core is None:
        verl_core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    return verl_core


def _actor_config(info):
    from verl.workers.config import ActorConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                           clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, global_batch_info=info)


# verl's global_batch_info -> rf's normalisers: verl multiplies every mode by dp_size and divides by the
# global counts, rf divides by num_tokens / num_seqs (the global count per rank)
INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 70, "global_batch_size": 13}]


def _rf_norm(info, agg, T):
    dp = info.get("dp_size", 1)
    kw = {}
    if info and agg == "token-mean":
        kw["num_tokens"] = info["batch_num_tokens"] / dp
    if info and agg.startswith("seq"):
        kw["num_seqs"] = info["global_batch_size"] / dp
    factor = dp if agg == "token-sum" else 1.0  # verl's token-sum is the local sum times dp_size
    return kw, factor


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("info", range(len(INFOS)))
@pytest.mark.parametrize("weighted", [False, True])
def test_policy_loss_matches_verl(loss_type, agg, info, weighted):
    core = _verl()
    fn = {"ppo": core.compute_policy_loss_vanilla, "gspo": core.compute_policy_loss_gspo,
          "cispo": core.compute_policy_loss_cispo}[loss_type]
    lp, old, adv, m, w = _policy_inputs(B=5, T=8, seed=3)
    old[2, :3] = lp[2, :3] + 4.0  # ratios far outside the clip range (dual clip for ppo)
    m = m.double()
    info_d = INFOS[info]
    leaves_v = [t.clone().requires_grad_() for t in (old, lp, adv)]
    loss_v, metrics = fn(*leaves_v, m, loss_agg_mode=agg, config=_actor_config(info_d),
                         rollout_is_weights=w if weighted else None)
    loss_v.backward()
    kw, factor = _rf_norm(info_d, agg, m.shape[1])
    for b in backends("ppo_policy_loss"):
        x = [t.clone().requires_grad_() for t in (lp, old, adv)]
        loss, st = rf.ppo_policy_loss(*x, m, clip_low=0.2, clip_high=0.28, dual_clip=3.0 if loss_type == "ppo" else None,
                                      agg=agg, weights=w if weighted else None, loss_type=loss_type, backend=b, **kw)
        (loss * factor).backward()
        tol = 1e-7 if agg == "seq-mean-token-mean" else 1e-10  # verl divides by (count + 1e-8)
        assert_rel(loss * factor, loss_v, tol, f"{b} {loss_type} {agg} loss")
        for name, v in (("clipfrac", "actor/pg_clipfrac"), ("approx_kl", "actor/ppo_kl"),
                        ("dual_clipfrac", "actor/pg_clipfrac_lower")):
            assert abs(st[name].item() - metrics[v]) < 1e-6, (b, name, st[name].item(), metrics[v])
        for a, v, n in zip(x, (leaves_v[1], leaves_v[0], leaves_v[2]), ("logp", "old", "adv")):
            assert_rel(_grad(a), _grad(v), tol, f"{b} {loss_type} {agg} d {n}")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("info", range(len(INFOS)))
def test_aggregate_matches_verl_agg_loss(agg, info):
    core = _verl()
    lp, _, _, m, _ = _policy_inputs(B=5, T=8, seed=4)
    m = m.double()
    kw, factor = _rf_norm(INFOS[info], agg, m.shape[1])
    expect = core.agg_loss(lp, m, agg, **INFOS[info])
    tol = 1e-7 if agg == "seq-mean-token-mean" else 1e-12
    assert_rel(rf.aggregate(lp, m, agg, **kw) * factor, expect, tol, f"aggregate {agg}")


# ----------------------------------------------------------------------------- packed sequences
CU = torch.tensor([0, 3, 4, 4, 9, 11])  # lengths 3, 1, 0, 5, 2


def _packed_policy(seed):
    g = _gen(seed)
    N = int(CU[-1])
    lp = torch.randn(N, generator=g, dtype=torch.float64) * 0.5 - 1.5
    old = lp + torch.randn(N, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(N, generator=g, dtype=torch.float64) + 0.7  # a loss far from 0 (no cancellation)
    m = torch.rand(N, generator=g) > 0.2
    m[3] = True
    return _f32(lp, old, adv, m, torch.rand(N, generator=g, dtype=torch.float64))


def _pad(x, fill=0):
    return rf.functional.Packing(CU, x).pad(x, fill)


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_packed(agg):
    lp, _, _, m, w = _packed_policy(5)
    out = rf.aggregate(lp, m, agg, weights=w, cu_seqlens=CU, **_norms(agg))
    assert_rel(out, ref.aggregate(_pad(lp), _pad(m), agg, weights=_pad(w), **_norms(agg)), 1e-12, f"packed {agg}")
    with pytest.raises(ValueError, match="cu_seqlens"):
        rf.aggregate(lp, m, agg, cu_seqlens=CU[:-1])


@pytest.mark.parametrize("backend", backends("ppo_policy_loss"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_packed(backend, loss_type, agg):
    lp, old, adv, m, w = _packed_policy(6)
    x, x64 = _leaves((lp, old, adv), torch.float32), _leaves((lp, old, adv), torch.float64)
    out = rf.ppo_policy_loss(*x, m, weights=w.float(), agg=agg, loss_type=loss_type, cu_seqlens=CU, backend=backend)
    out[0].backward()
    p64 = [_pad(t) for t in x64]
    expect = ref.ppo_policy_loss(*p64, _pad(m), agg=agg, weights=_pad(w), loss_type=loss_type)
    expect[0].backward()
    _compare(out, expect, x, x64, torch.float32, f"{backend} packed {loss_type} {agg}")
    if loss_type == "gspo":  # the sequences are the packed ones, not the whole row
        one_row = ref.ppo_policy_loss(*(t.detach()[None] for t in x64), m[None], loss_type="gspo")[0]
        assert abs(one_row.item() - expect[0].item()) > 1e-6


# ----------------------------------------------------------------------------- ppo_loss_from_logits
def _logits_inputs(B=3, T=6, V=13, seed=0, dtype=torch.float64):
    g = _gen(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype).double()
    labels = torch.randint(0, V, (B, T), generator=g)
    m = _mask(B, T, g)
    labels[0, 1] = -100
    lp = ref.logprobs(logits, labels)
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) + 0.7  # a loss far from 0 (no cancellation)
    ref_logp = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    return _f32(logits, labels, old, adv, m, ref_logp, torch.rand(B, T, generator=g, dtype=torch.float64))


FL_KW = dict(kl_coef=0.1, entropy_coef=0.02, temperature=0.8, clip_high=0.28)


def _from_logits_check(backend, loss_type, agg, weighted, dtype, packed=False):
    logits, labels, old, adv, m, rl, w = _logits_inputs(dtype=dtype)
    norms = _norms(agg)
    x64 = _leaves((logits, old, adv, rl), torch.float64)
    expect = ref.ppo_loss_from_logits(x64[0], labels, *x64[1:3], m, x64[3], FL_KW["kl_coef"], "k3",
                                      FL_KW["entropy_coef"], FL_KW["temperature"], 0.2, 0.28, None, agg,
                                      w if weighted else None, norms.get("num_tokens"), norms.get("num_seqs"),
                                      loss_type)
    expect[0].backward()
    tok = torch.float64 if dtype == torch.float64 else torch.float32  # the per-token inputs
    x = _leaves((logits,), dtype) + _leaves((old, adv, rl), tok)
    if packed:  # the same rows as 3 packed sequences of 6 tokens
        cu = torch.arange(0, 19, 6)
        flat = [t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t.reshape(-1) for t in x]
        out = rf.ppo_loss_from_logits(flat[0], labels.reshape(-1), flat[1], flat[2], m.reshape(-1),
                                      ref_logp=flat[3], weights=w.reshape(-1).to(tok) if weighted else None,
                                      agg=agg, loss_type=loss_type, cu_seqlens=cu, backend=backend, **norms, **FL_KW)
    else:
        out = rf.ppo_loss_from_logits(x[0], labels, x[1], x[2], m, ref_logp=x[3], agg=agg, loss_type=loss_type,
                                      weights=w.to(tok) if weighted else None, backend=backend, **norms, **FL_KW)
    out[0].backward()
    _compare(out, expect, x, x64, dtype, f"{backend} from_logits {loss_type} {agg} weighted={weighted}")


@pytest.mark.parametrize("backend", backends("ppo_loss_from_logits"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("weighted", [False, True])
def test_from_logits(backend, loss_type, agg, weighted):
    _from_logits_check(backend, loss_type, agg, weighted, torch.float32)


@pytest.mark.parametrize("backend", backends("ppo_loss_from_logits"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_from_logits_dtypes(backend, loss_type, dtype):
    _from_logits_check(backend, loss_type, "seq-mean-token-mean", True, dtype)


@pytest.mark.parametrize("backend", backends("ppo_loss_from_logits"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean"])
def test_from_logits_packed(backend, loss_type, agg):
    _from_logits_check(backend, loss_type, agg, True, torch.float32, packed=True)


# ----------------------------------------------------------------------------- linear_ppo_loss
def _linear_inputs(B=3, T=6, H=8, V=11, seed=0, dtype=torch.float64):
    g = _gen(seed)
    hidden = (torch.randn(B, T, H, generator=g, dtype=torch.float64)).to(dtype).double()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).double()
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype).double()
    labels = torch.randint(0, V, (B, T), generator=g)
    m = _mask(B, T, g)
    labels[0, 1] = -100
    lp = ref.linear_logprobs(hidden, weight, labels, bias)
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) + 0.7  # a loss far from 0 (no cancellation)
    rl = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    return _f32(hidden, weight, bias, labels, old, adv, m, rl, torch.rand(B, T, generator=g, dtype=torch.float64))


def _linear_check(backend, loss_type, agg, weighted, dtype, packed=False, chunk_size=4):
    hidden, weight, bias, labels, old, adv, m, rl, w = _linear_inputs(dtype=dtype)
    norms = _norms(agg)
    x64 = _leaves((hidden, weight, bias, old, adv, rl), torch.float64)
    expect = ref.linear_ppo_loss(x64[0], x64[1], labels, x64[3], x64[4], m, x64[2], x64[5], FL_KW["kl_coef"], "k3",
                                 FL_KW["entropy_coef"], FL_KW["temperature"], 0.2, 0.28, None, agg, None,
                                 w if weighted else None, norms.get("num_tokens"), norms.get("num_seqs"), loss_type)
    expect[0].backward()
    tok = torch.float64 if dtype == torch.float64 else torch.float32  # the per-token inputs
    x = _leaves((hidden, weight, bias), dtype) + _leaves((old, adv, rl), tok)
    kw = dict(bias=x[2], ref_logp=x[5], agg=agg, loss_type=loss_type, backend=backend, **norms, **FL_KW)
    if backend != "reference":
        kw["chunk_size"] = chunk_size  # chunks that cut sequences: gspo's logp pass must see whole sequences
    if packed:
        B, T = labels.shape
        kw["ref_logp"] = x[5].reshape(-1)
        out = rf.linear_ppo_loss(x[0].reshape(B * T, -1), x[1], labels.reshape(-1), x[3].reshape(-1),
                                 x[4].reshape(-1), m.reshape(-1), cu_seqlens=torch.arange(0, B * T + 1, T),
                                 weights=w.reshape(-1).to(tok) if weighted else None, **kw)
    else:
        out = rf.linear_ppo_loss(x[0], x[1], labels, x[3], x[4], m, weights=w.to(tok) if weighted else None, **kw)
    out[0].backward()
    _compare(out, expect, x, x64, dtype, f"{backend} linear {loss_type} {agg} weighted={weighted}")


@pytest.mark.parametrize("backend", backends("linear_ppo_loss"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("weighted", [False, True])
def test_linear(backend, loss_type, agg, weighted):
    _linear_check(backend, loss_type, agg, weighted, torch.float32)


@pytest.mark.parametrize("backend", backends("linear_ppo_loss"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_linear_dtypes(backend, loss_type, dtype):
    _linear_check(backend, loss_type, "seq-mean-token-sum-norm", True, dtype)


@pytest.mark.parametrize("backend", backends("linear_ppo_loss"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_linear_packed(backend, loss_type, agg):
    _linear_check(backend, loss_type, agg, True, torch.float32, packed=True, chunk_size=5)
