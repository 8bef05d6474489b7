"""The Triton RL-math kernels (rlhf_fast/ops/{gae,kl,ppo_loss,advantages,ppo_loss_from_logits}.py) on
fuzzed shapes and edge cases, forward and backward against the float64 reference, plus an
ahead-of-time compile of every kernel for sm_90 (catches what the interpreter cannot)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref
from utils import DEVICE, GRAD_TOL, OUT_TOL, assert_rel, backends

pytestmark = pytest.mark.skipif("triton" not in backends("gae"), reason="Triton backend unavailable here")
KINDS = ["right", "left", "holes", "empty_rows"]


def _mask(B, T, kind):
    lengths = torch.randint(1, T + 1, (B,))
    pos = torch.arange(T)
    if kind == "right":
        m = pos[None] < lengths[:, None]
    elif kind == "left":
        m = pos[None] >= (T - lengths)[:, None]
    elif kind == "holes":
        m = torch.rand(B, T) > 0.4
    else:  # every other row all-masked
        m = torch.rand(B, T) > 0.5
        m[::2] = False
    return m.to(DEVICE)


def _check(fn, args64, dtype, out_fn=lambda o: o if isinstance(o, (tuple, list)) else [o], tol=None, gtol=None):
    """fn(backend, *args) on triton (inputs cast to dtype) vs reference in float64: outputs and grads."""
    def leaves(cast):
        return [a.detach().to(DEVICE, cast).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in args64]
    xs = leaves(dtype)
    xs64 = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in xs]
    outs, outs64 = out_fn(fn("triton", *xs)), out_fn(fn("reference", *xs64))
    tol = tol or OUT_TOL[dtype]
    loss = loss64 = 0
    for o, o64 in zip(outs, outs64):
        assert_rel(o, o64, tol, "output")
        if o64.requires_grad:
            w = torch.randn_like(o64)
            loss, loss64 = loss + (o.double() * w).sum(), loss64 + (o64 * w).sum()
    if not torch.is_tensor(loss64):
        return
    loss.backward()
    loss64.backward()
    for a, a64 in zip(xs, xs64):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            if a64.grad is None:
                assert a.grad is None or not a.grad.any(), "gradient for an unused input"
            else:
                assert a.grad is not None and a.grad.dtype == a.dtype
                assert_rel(a.grad, a64.grad, gtol or max(tol, GRAD_TOL[dtype]), "grad")


# ----------------------------------------------------------------------------- GAE
# the interpreter's scans are slow: long rows get few rows and a subset of mask kinds
_GAE_CASES = [(B, T, k) for B, T in [(3, 1), (3, 2), (4, 7), (3, 100)] for k in KINDS] + \
    [(2, 1000, "right"), (2, 1000, "left"), (1, 8192, "holes")]


@pytest.mark.parametrize("B,T,kind", _GAE_CASES)
def test_gae_fuzz(B, T, kind):
    r, v = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    m = _mask(B, T, kind)
    _check(lambda b, r, v: rf.gae(r, v, m, gamma=0.99, lam=0.95, backend=b), [r, v], torch.float32,
           tol=1e-5, gtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gae_dtypes_long_holed(dtype):
    r, v = torch.randn(1, 1100, dtype=torch.float64), torch.randn(1, 1100, dtype=torch.float64)
    m = _mask(1, 1100, "holes")
    tol = {torch.float64: 1e-10, torch.bfloat16: 1e-2}[dtype]
    _check(lambda b, r, v: rf.gae(r, v, m, gamma=0.97, lam=0.9, backend=b), [r, v], dtype, tol=tol, gtol=tol)


def test_gae_noncontiguous_mixed_dtypes_and_one_output():
    r = torch.randn(50, 6, device=DEVICE).t()  # [6, 50], not contiguous
    v = torch.randn(6, 50, device=DEVICE, dtype=torch.float64).requires_grad_()
    m = _mask(6, 50, "holes").float()
    adv, ret = rf.gae(r, v, m, gamma=0.9, lam=0.8, backend="triton")
    adv64, ret64 = ref.gae(r.double(), v.detach(), m, 0.9, 0.8)
    assert adv.dtype == torch.float64
    assert_rel(adv, adv64, 1e-10, "adv")
    ret.sum().backward()  # only the returns take a gradient
    v64 = v.detach().clone().requires_grad_()
    ref.gae(r.double(), v64, m, 0.9, 0.8)[1].sum().backward()
    assert_rel(v.grad, v64.grad, 1e-10, "grad values")


def test_gae_empty():
    for shape in [(0, 5), (3, 0)]:
        adv, ret = rf.gae(torch.zeros(shape), torch.zeros(shape), torch.ones(shape), backend="triton")
        assert adv.shape == shape and ret.shape == shape


@pytest.mark.parametrize("B,T,kind", [(3, 1, k) for k in KINDS] + [(3, 37, k) for k in KINDS] + [(1, 1100, "left")])
def test_reinforce_pp_fuzz(B, T, kind):
    r = torch.randn(B, T, dtype=torch.float64)
    m = _mask(B, T, kind)
    _check(lambda b, r: rf.reinforce_pp_returns(r, m, gamma=0.99, backend=b), [r], torch.float32, tol=1e-5)


# ----------------------------------------------------------------------------- KL
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+"])
@pytest.mark.parametrize("clamp", [None, 0.05, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_all_estimators(estimator, clamp, dtype):
    logp = -torch.rand(5, 300, dtype=torch.float64) * 4
    # small differences (the k3 series branch), moderate and large ones
    scale = torch.tensor([1e-4, 1e-2, 0.3, 1.0, 4.0], dtype=torch.float64)[:, None]
    ref_logp = logp + torch.randn(5, 300, dtype=torch.float64) * scale
    _check(lambda b, x, y: rf.kl(x, y, estimator=estimator, clamp=clamp, backend=b), [logp, ref_logp], dtype)


def test_kl_k3_small_differences_relative_accuracy():
    # per-element accuracy where exp(-d) - 1 + d would cancel catastrophically in fp32
    d = torch.tensor([1e-6, -3e-5, 1e-3, -0.2, 0.49, -0.51, 2.0], dtype=torch.float64)
    out = rf.kl(d.float(), torch.zeros(7), estimator="k3", backend="triton").double()
    want = torch.expm1(-d) + d
    assert ((out - want).abs() / want).max() < 1e-5


# ----------------------------------------------------------------------------- PPO losses
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_high,dual_clip", [(None, None), (0.28, None), (0.28, 3.0), (0.1, 1.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_fuzz(agg, clip_high, dual_clip, dtype):
    B, T = 4, 700  # several programs per row, rows straddling blocks
    logp = -torch.rand(B, T, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, dtype=torch.float64) * 0.5
    old[0, :5] = logp[0, :5] + 30.0  # log-ratio beyond the ±20 clamp
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = _mask(B, T, "empty_rows")
    mask[1, ::3] = True
    _check(lambda b, *a: rf.ppo_policy_loss(*a, mask, clip_low=0.2, clip_high=clip_high, dual_clip=dual_clip,
                                            agg=agg, backend=b),
           [logp, old, adv], dtype,
           out_fn=lambda o: [o[0], o[1]["clipfrac"], o[1]["approx_kl"], o[1]["dual_clipfrac"]])


def test_policy_loss_any_shape_float_mask_and_empty():
    x = -torch.rand(3, 4, 5, dtype=torch.float64)
    old, adv = x + 0.3 * torch.randn_like(x), torch.randn_like(x)
    m = (torch.rand(3, 4, 5) > 0.3).double() * 0.5  # masks are weights in the reference
    _check(lambda b, *a: rf.ppo_policy_loss(*a, m, backend=b), [x, old, adv], torch.float32,
           out_fn=lambda o: [o[0], o[1]["clipfrac"], o[1]["approx_kl"]])
    z = torch.zeros(0, 4)
    loss, stats = rf.ppo_policy_loss(z, z, z, z, agg="seq-mean-token-mean", backend="triton")
    assert loss.item() == 0 and stats["clipfrac"].item() == 0
    e = torch.zeros(2, 3)
    loss, _ = rf.ppo_policy_loss(e, e + 1, e + 1, e, backend="triton")  # all masked
    assert loss.item() == 0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_loss_fuzz(agg, clip, dtype):
    B, T = 3, 1100
    v, old, ret = (torch.randn(B, T, dtype=torch.float64) for _ in range(3))
    mask = _mask(B, T, "empty_rows")
    # vf_clipfrac counts tokens whose clip is active and binding: well defined in every dtype
    _check(lambda b, *a: rf.ppo_value_loss(*a, mask, clip=clip, agg=agg, backend=b), [v, old, ret], dtype,
           out_fn=lambda o: [o[0], o[1]["vf_clipfrac"]])


# ----------------------------------------------------------------------------- group advantages, shaped rewards
@pytest.mark.parametrize("group_size,G", [(1, 5), (2, 7), (5, 3), (16, 9), (100, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_group_advantages_fuzz(group_size, G, dtype):
    s = torch.randn(G * group_size, dtype=torch.float64)
    tol = OUT_TOL[torch.float32] if dtype != torch.float64 else 1e-10
    _check(lambda b, x: rf.grpo_advantages(x, group_size, normalize_std=False, backend=b), [s], dtype, tol=tol)
    if group_size > 1:
        # for pairs the normalised output is ±1/√2 up to eps: its gradient is O(eps) and cancels
        # catastrophically (relative error ~ machine eps / 1e-6: the reference run in fp32 is off by ~30%),
        # so pairs get their gradient checked in fp64 only, to 1e-6
        gtol = (1e-6 if dtype == torch.float64 else 1e30) if group_size == 2 else None
        _check(lambda b, x: rf.grpo_advantages(x, group_size, backend=b), [s], dtype, tol=tol, gtol=gtol)
        _check(lambda b, x: rf.rloo_advantages(x, group_size, backend=b), [s], dtype, tol=tol)


def test_grpo_constant_group_is_finite():
    s = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0], requires_grad=True)
    out = rf.grpo_advantages(s, 3, backend="triton")
    assert torch.equal(out[:3].detach(), torch.zeros(3))
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k3+"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 45, 1500])
def test_kl_penalized_rewards_fuzz(estimator, kind, T):
    B = 3
    score = torch.randn(B, dtype=torch.float64)
    logp = -torch.rand(B, T, dtype=torch.float64) * 2
    ref_logp = logp + 0.3 * torch.randn(B, T, dtype=torch.float64)
    mask = _mask(B, T, kind)
    _check(lambda b, *a: rf.kl_penalized_rewards(*a, mask, beta=0.05, estimator=estimator, backend=b),
           [score, logp, ref_logp], torch.float32)


# ----------------------------------------------------------------------------- PPO loss from logits
@pytest.fixture
def small_block_v(monkeypatch):
    from rlhf_fast.ops import ppo_loss_from_logits as mod
    monkeypatch.setattr(mod, "MAX_BLOCK_V", 64)  # several chunks per row, ragged tail


_OPTS = [
    dict(),
    dict(ref=True, kl_coef=0.1, entropy_coef=0.01, temperature=0.7),
    dict(ref=True, kl_coef=0.0, kl_estimator="k2+", clip_high=0.28, dual_clip=3.0),
    dict(ref=True, kl_coef=0.3, kl_estimator="abs", entropy_coef=0.2, dual_clip=2.0, temperature=1.3),
]
_LOGITS_CASES = [(a, torch.float32, o) for a in AGGS for o in _OPTS] + \
    [(a, d, _OPTS[3]) for a in ("token-mean", "seq-mean-token-mean") for d in (torch.bfloat16, torch.float64)]


@pytest.fixture
def split_rows(monkeypatch):
    """One 64-column chunk per program: each 301-column row is split over 5 (bf16) to 10 (fp64) programs whose
    partial triples the last one merges."""
    from rlhf_fast.ops import logprobs as tlp
    from rlhf_fast.ops import ppo_loss_from_logits as mod
    monkeypatch.setattr(mod, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(tlp, "_CHUNKS_PER_PROGRAM", 1)


@pytest.mark.parametrize("agg,dtype,opts", [("token-mean", d, _OPTS[3]) for d in (torch.float32, torch.bfloat16,
                                                                                  torch.float64)])
def test_ppo_loss_from_logits_split_rows(split_rows, agg, dtype, opts):
    test_ppo_loss_from_logits_fuzz(None, agg, dtype, opts)


@pytest.mark.parametrize("agg,dtype,opts", _LOGITS_CASES)
def test_ppo_loss_from_logits_fuzz(small_block_v, agg, dtype, opts):
    B, T, V = 3, 5, 301
    opts = dict(opts)
    use_ref = opts.pop("ref", False)
    logits = torch.randn(B, T, V, dtype=torch.float64) * 3
    logits[0] += 1e4  # huge logits: the online max must keep the sums finite
    labels = torch.randint(0, V, (B, T))
    logits[1, :, :7] = float("-inf")  # -inf logits (never a label)
    labels[1] = torch.randint(7, V, (T,))
    mask = _mask(B, T, "holes")
    mask[2] = False  # an all-masked row
    labels[0, 0], mask[0, 0] = -100, False  # ignored label on a masked position
    logp_now = torch.log_softmax(logits / opts.get("temperature", 1.0), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = logp_now + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    ref_logp = logp_now + 0.3 * torch.randn(B, T, dtype=torch.float64)
    args = [logits, old, adv] + ([ref_logp] if use_ref else [])
    keys = ["pg_loss", "entropy", "clipfrac", "approx_kl"] + (["kl"] if use_ref else [])

    def run(b, x, o, a, *r):
        return rf.ppo_loss_from_logits(x, labels.to(DEVICE), o, a, mask, ref_logp=r[0] if r else None, agg=agg,
                                       backend=b, **opts)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    _check(run, args, dtype, out_fn=lambda o: [o[0]] + [o[1][k] for k in keys], tol=tol)


# ----------------------------------------------------------------------------- ahead-of-time compile
_AOT = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from rlhf_fast.ops import gae, kl, ppo_loss, advantages, ppo_loss_from_logits as pl
    f32, i32, f64 = "*fp32", "i32", "fp64"
    def build(fn, sig, const):
        sig = dict(sig, **{k: "constexpr" for k in const})
        triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32))
        print("ok", fn.__name__)
    build(gae._gae_fwd_kernel, dict(r_ptr="*bf16", v_ptr=f32, m_ptr="*i1", adv_ptr=f32, ret_ptr=f32, T=i32,
          gamma=f64, lam=f64), dict(HAS_VALUES=True, ACC=tl.float32, BLOCK_T=1024))
    build(gae._gae_bwd_kernel, dict(ga_ptr=f32, gr_ptr=f32, m_ptr="*i1", dr_ptr="*bf16", dv_ptr=f32, T=i32,
          gamma=f64, lam=f64), dict(HAS_GA=True, HAS_GR=True, HAS_VALUES=True, ACC=tl.float32, BLOCK_T=1024))
    build(kl._kl_fwd_kernel, dict(lp_ptr="*bf16", ref_ptr=f32, out_ptr=f32, grad_ptr=f32, N=i32, clamp=f64),
          dict(EST=2, PLUS=False, HAS_CLAMP=True, WRITE_GRAD=True, K3_FLOOR=88.0, ACC=tl.float32, NTERMS=10,
               BLOCK=1024))
    for loss in ppo_loss.LOSS_CODES.values():  # ppo, gspo (per-token sequence log-ratio in seq_ptr), cispo
        build(ppo_loss._policy_fwd_kernel, dict(lp_ptr=f32, old_ptr=f32, adv_ptr=f32, m_ptr="*u8", scale_ptr=f32,
              dlp_ptr=f32, dadv_ptr=f32, part_ptr=f32, seq_ptr=f32, N=i32, T=i32, lo=f64, hi=f64, dual_c=f64),
              dict(HAS_DUAL=loss == 0, WRITE_DLP=True, WRITE_DADV=True, ACC=tl.float32, BLOCK=1024, LOSS=loss))
    build(ppo_loss._value_fwd_kernel, dict(v_ptr=f32, old_ptr=f32, ret_ptr=f32, m_ptr="*u8", scale_ptr=f32,
          dv_ptr=f32, dold_ptr=f32, part_ptr=f32, N=i32, T=i32, clip=f64),
          dict(HAS_CLIP=True, WRITE_GRAD=True, ACC=tl.float32, BLOCK=1024))
    for mode in (1, 2, 3):
        build(advantages._group_kernel, dict(x_ptr=f32, g_ptr=f32, out_ptr=f32, G=i32, n=i32, eps=f64),
              dict(MODE=mode, ACC=tl.float32, BLOCK_G=64, BLOCK_S=16))
    build(advantages._kl_rewards_kernel, dict(score_ptr=f32, lp_ptr=f32, ref_ptr=f32, m_ptr="*u8", out_ptr=f32,
          grad_ptr=f32, last_ptr="*i64", T=i32, beta=f64),
          dict(EST=2, PLUS=True, WRITE_GRAD=True, ACC=tl.float32, NTERMS=10, BLOCK_T=1024))
    row = dict(VEC=8, BLOCK_V=2048, SPAN=32768, SPLIT=5, FAST=True)
    build(pl._fwd_kernel, dict(x_ptr="*bf16", XT=i32, xs0=i32, xs1=i32, phase0=i32, lab_ptr="*i64", old_ptr=f32,
          adv_ptr=f32, ref_ptr=f32, m_ptr="*u8", scale_ptr=f32, stats_ptr=f32, grads_ptr=f32, part_ptr=f32,
          count_ptr="*i32", V=i32, T=i32, inv_t=f64, c2=f64, lo=f64, hi=f64, dual_c=f64, kl_coef=f64, ent_coef=f64),
          dict(HAS_DUAL=True, HAS_REF=True, EST=2, PLUS=False, ROW_ACC=tl.float32, ACC=tl.float32, NTERMS=10,
               SPLIT_P2=8, ALIGNED=False, **row))
    build(pl._bwd_kernel, dict(x_ptr="*bf16", XT=i32, xs0=i32, xs1=i32, phase0=i32, lab_ptr="*i64", grads_ptr=f32,
          G_ptr=f32, dx_ptr="*bf16", ds0=i32, ds1=i32, V=i32, inv_t=f64), dict(ROW_ACC=tl.float32, SAME=True, **row))
""")


def test_kernels_compile_ahead_of_time_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no ASTSource / GPUTarget AOT API: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _AOT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("ok") == 13, p.stdout
