"""rlhf_fast.integrations.openrlhf against the installed OpenRLHF (pip install openrlhf --no-deps).

The package's ``openrlhf/models/__init__.py`` imports its actor, which needs flash_attn (a CUDA build) and
deepspeed, neither installable on this CPU machine. The functions under test live in
``openrlhf/models/utils.py`` and ``openrlhf/models/loss.py``, whose only heavy import is ``deepspeed`` (used
by ``set_z3_leaf_modules``, not tested here). So, when the package cannot be imported normally, the fixture
registers ``openrlhf.models`` as a bare package and a placeholder ``deepspeed`` module, and imports the two
real, installed source files. The experience maker (GAE, cumulative returns) needs ray actors and vLLM
helpers; when it cannot be imported, its two methods are checked against their documented recursions.
"""
import importlib
import importlib.util
import sys
import types

import pytest
import torch

from rlhf_fast.integrations import openrlhf as rf_orl

from utils import assert_rel

SPEC = importlib.util.find_spec("openrlhf")
if SPEC is None:
    pytest.skip("OpenRLHF is not installed (pip install openrlhf==0.11.2 --no-deps)", allow_module_level=True)


def _import_models():
    try:
        return importlib.import_module("openrlhf.models.utils"), importlib.import_module("openrlhf.models.loss"), True
    except ImportError:
        for name in [n for n in sys.modules if n.startswith("openrlhf.models")]:
            del sys.modules[name]
    pkg = types.ModuleType("openrlhf.models")
    pkg.__path__ = [f"{SPEC.submodule_search_locations[0]}/models"]
    sys.modules["openrlhf.models"] = pkg
    placeholder = importlib.util.find_spec("deepspeed") is None
    if placeholder:  # only while utils.py runs its imports: other libraries probe sys.modules for deepspeed
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        return importlib.import_module("openrlhf.models.utils"), importlib.import_module("openrlhf.models.loss"), False
    finally:
        if placeholder:
            del sys.modules["deepspeed"]


U, L, NATIVE = _import_models()
ORIG = {n: getattr(U, n) for n in ("log_probs_from_logits", "compute_entropy", "compute_approx_kl")}
ORIG_POLICY, ORIG_VALUE = L.PolicyLoss, L.ValueLoss


@pytest.fixture
def patched():
    with rf_orl.patched():
        yield
    assert U.compute_approx_kl is ORIG["compute_approx_kl"] and L.PolicyLoss is ORIG_POLICY


def test_patch_and_restore():
    with rf_orl.patched():
        assert U.log_probs_from_logits is rf_orl.log_probs_from_logits
        assert issubclass(L.PolicyLoss, ORIG_POLICY) and L.PolicyLoss is not ORIG_POLICY
        assert L.ValueLoss is not ORIG_VALUE
    assert all(getattr(U, n) is f for n, f in ORIG.items())
    assert L.ValueLoss is ORIG_VALUE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_and_entropy(patched, dtype, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 8, 91, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 91, (3, 8), generator=g)
    a, r = logits.clone(), logits.double()  # OpenRLHF's own function in float64 is the reference
    out = U.log_probs_from_logits(a, labels, temperature)
    expect = ORIG["log_probs_from_logits"](r, labels, temperature)
    assert out.dtype == dtype
    assert_rel(out, expect, 1e-12 if dtype == torch.float64 else 2e-6 if dtype == torch.float32 else 1e-2, "logp")
    assert_rel(a, r, 1e-12 if dtype == torch.float64 else 1e-2, "logits divided in place, as OpenRLHF")
    # backward, and entropy (OpenRLHF's compute_entropy is torch.compile'd: compare with its eager formula)
    x = (torch.randn(2, 5, 33, generator=g) * 2).double().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    lab = torch.randint(0, 33, (2, 5), generator=g)
    U.log_probs_from_logits(x, lab).sum().backward()
    ORIG["log_probs_from_logits"](xr, lab).sum().backward()
    assert_rel(x.grad, xr.grad, 1e-12, "d logits")
    ent = U.compute_entropy(logits.double())
    p = torch.softmax(logits.double(), -1)
    assert_rel(ent, torch.logsumexp(logits.double(), -1) - (p * logits.double()).sum(-1), 1e-12, "entropy")


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
def test_compute_approx_kl(patched, est, unbiased, with_old):
    g = torch.Generator().manual_seed(1)
    lp, base, old = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    lp[0, 0], base[0, 0] = -14.0, 0.0  # beyond the ±10 bound
    res = []
    for fn in (U.compute_approx_kl, ORIG["compute_approx_kl"]):
        a = lp.clone().requires_grad_()
        out = fn(a, base, old if with_old else None, kl_estimator=est, unbiased_gradient=unbiased)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        res.append((out, a.grad))
    assert res[0][0].dtype == res[1][0].dtype == torch.float32
    assert_rel(res[0][0], res[1][0], 1e-6, f"{est} value")
    assert_rel(res[0][1], res[1][1], 1e-6, f"{est} grad")


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("global_counts", [False, True])
def test_policy_and_value_loss(patched, token_level, dual_clip, global_counts):
    g = torch.Generator().manual_seed(2)
    B, T = 6, 10
    lp = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    kw = dict(dp_size=2, batch_num_tokens=90.0, global_batch_size=11.0) if global_counts else {}
    res = []
    for cls in (L.PolicyLoss, ORIG_POLICY):
        leaves = [t.clone().requires_grad_() for t in (lp, old, adv)]
        out = cls(0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level)(*leaves, mask, **kw)
        out[0].backward()
        res.append((out, [t.grad for t in leaves]))
    (o1, g1), (o2, g2) = res
    tol = 1e-10 if token_level else 1e-7  # OpenRLHF adds 1e-8 to the per-row token count
    assert_rel(o1[0], o2[0], tol, "policy loss")
    assert_rel(o1[1], o2[1], 1e-12, "clip_ratio")
    assert_rel(o1[2], o2[2], 1e-12, "ppo_kl")
    assert o1[3] is None and o1[4] is None
    for a, b in zip(g1, g2):
        assert_rel(a, b, tol, "policy grad")
    v, ov, ret = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    res = []
    for cls in (L.ValueLoss, ORIG_VALUE):
        leaves = [t.clone().requires_grad_() for t in (v, ov, ret)]
        out = cls(clip_eps=0.2, token_level_loss=token_level)(*leaves, mask, **kw)
        out.backward()
        res.append((out, [t.grad for t in leaves]))
    assert_rel(res[0][0], res[1][0], tol, "value loss")
    for a, b in zip(res[0][1], res[1][1]):
        assert_rel(a, b, tol, "value grad")
    assert rf_orl.calls["PolicyLoss"] > 0 and rf_orl.calls["ValueLoss"] > 0


def _gspo_run(cls, lp, old, adv, mask, roll, dual_clip=None, is_level="off", **kw):
    leaves = [t.clone().requires_grad_() for t in (lp, old, adv)]
    out = cls(0.2, 0.28, dual_clip=dual_clip, policy_loss_type="gspo", is_correction_level=is_level)(
        *leaves, mask, rollout_log_probs=roll, **kw)
    out[0].backward()
    return out, [t.grad for t in leaves]


def _gspo_batch(per_sequence_advantages):
    g = torch.Generator().manual_seed(8)
    B, T = 6, 10
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    shift = torch.tensor([0.3, -0.3, 0.0, 0.1, -0.35, 0.05], dtype=torch.float64)[:, None]  # some sequences clip
    lp = old + shift + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    roll = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None] < torch.tensor([10, 7, 1, 9, 4, 10])[:, None]).double()
    mask[0, 3:5] = 0
    adv = torch.randn(B, 1 if per_sequence_advantages else T, generator=g, dtype=torch.float64).expand(B, T)
    return lp, old, adv.contiguous(), mask, roll


@pytest.mark.parametrize("is_level", ["off", "token"])
@pytest.mark.parametrize("global_counts", [False, True])
def test_gspo_runs_on_rf(patched, is_level, global_counts):
    """GRPO-style advantages (one per sequence): OpenRLHF's GSPO loss, stats and gradients; with IS correction on,
    the ratio is taken against the rollout log-probs, as OpenRLHF does."""
    lp, old, adv, mask, roll = _gspo_batch(per_sequence_advantages=True)
    kw = dict(dp_size=2, global_batch_size=11.0) if global_counts else {}
    before = dict(rf_orl.calls)
    (o1, g1), (o2, g2) = (_gspo_run(cls, lp, old, adv, mask, roll, is_level=is_level, **kw)
                          for cls in (L.PolicyLoss, ORIG_POLICY))
    assert rf_orl.calls["PolicyLoss"] == before.get("PolicyLoss", 0) + 1
    assert rf_orl.calls["PolicyLoss_to_openrlhf"] == before.get("PolicyLoss_to_openrlhf", 0)
    assert 0 < float(o2[1]) < 1  # the clip bites
    for i, what in enumerate(("loss", "clip_ratio", "ppo_kl")):
        assert_rel(o1[i], o2[i], 1e-7, what)  # OpenRLHF adds 1e-8 to the per-row token count
    assert o1[3] is None and o1[4] is None
    assert_rel(g1[0], g2[0], 1e-7, "d log_probs")
    assert_rel(g1[2], g2[2], 1e-7, "d advantages")
    # rf's sequence ratio is a stop-gradient (GSPO-token, as verl): old_log_probs, data in training, get none
    assert g1[1] is None or not g1[1].any()


def test_gspo_per_token_advantages_same_loss_same_sequence_gradient(patched):
    """Per-token advantages: rf's GSPO-token gradient (verl's form) redistributes each sequence's gradient over its
    tokens where OpenRLHF differentiates the sequence ratio; the loss and each sequence's summed gradient agree."""
    lp, old, adv, mask, roll = _gspo_batch(per_sequence_advantages=False)
    (o1, g1), (o2, g2) = (_gspo_run(cls, lp, old, adv, mask, roll) for cls in (L.PolicyLoss, ORIG_POLICY))
    assert_rel(o1[0], o2[0], 1e-7, "loss")
    assert_rel(g1[0].sum(-1), g2[0].sum(-1), 1e-7, "per-sequence sum of d log_probs")
    assert (g1[0] - g2[0]).abs().max() > 1e-3  # the documented difference is real
    assert_rel(g1[2], g2[2], 1e-7, "d advantages")


def test_gspo_with_dual_clip_goes_to_openrlhf(patched):
    lp, old, adv, mask, roll = _gspo_batch(per_sequence_advantages=True)
    before = rf_orl.calls["PolicyLoss_to_openrlhf"]
    (o1, _), (o2, _) = (_gspo_run(cls, lp, old, adv, mask, roll, dual_clip=3.0) for cls in (L.PolicyLoss, ORIG_POLICY))
    assert rf_orl.calls["PolicyLoss_to_openrlhf"] == before + 1 and torch.equal(o1[0], o2[0])
    with pytest.raises(ValueError, match="needs rollout_log_probs"):
        _gspo_run(L.PolicyLoss, lp, old, adv, mask, None, is_level="token")


# OpenRLHF's IS-correction settings (level, mode, gating, threshold) with bands that bite on _is_batch's data
IS_CONFIGS = [("token", "clip", "ratio", (0.8, 1.25)), ("token", "mask", "ratio", (0.8, 1.25)),
              ("seq", "mask", "ratio", (0.97, 1.05)), ("token", "mask", "binary_kl", (0.0, 0.006)),
              ("seq", "mask", "binary_kl", (0.0, 0.04)), ("token", "mask", "tv", (0.0, 0.04)),
              ("seq", "mask", "tv", (-1.0, 0.07))]


def _is_batch(seed=5, B=6, T=10):
    """Trainer and rollout log-probs of sampled tokens (probabilities 0.05..0.95), a mask with padding, a hole
    and an empty last row."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B + 1, T, generator=g, dtype=torch.float64) * 3 - 0.05
    roll = (old + 0.3 * torch.randn(B + 1, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    mask = (torch.arange(T)[None] < torch.tensor([10, 7, 1, 9, 4, 10, 0])[:, None]).double()
    mask[0, 3:5] = 0
    return old, roll, mask


def _openrlhf_is_coefficients(level, mode, gating, threshold, old, roll, mask):
    """OpenRLHF's own per-token IS coefficient, read off its PolicyLoss: with log_probs = old_log_probs (ratio 1)
    and a token-sum loss, loss = Σ coef·(-A)·mask, so d loss / d A = -coef·mask."""
    adv = torch.zeros_like(old).requires_grad_()
    pl = ORIG_POLICY(is_correction_level=level, is_correction_mode=mode, is_correction_gating=gating,
                     is_correction_threshold=threshold)
    out = pl(old, old, adv, mask, rollout_log_probs=roll, batch_num_tokens=1.0)
    out[0].backward()
    return -adv.grad, out


@pytest.mark.parametrize("cfg", IS_CONFIGS, ids=lambda c: "-".join(map(str, c[:3])))
def test_is_correction_weights_are_openrlhfs(cfg):
    """rf.rollout_correction (via the adapter's mapping) gives OpenRLHF's coefficients and filter ratio."""
    old, roll, mask = _is_batch()
    coef, out = _openrlhf_is_coefficients(*cfg, old, roll, mask)
    w, frac = rf_orl.is_correction_weights(old, roll, mask, *cfg)
    assert_rel(w, coef, 1e-14, "IS coefficients")
    assert 0 < float(frac) < 1  # the band bites, and not everywhere
    assert float(frac) == pytest.approx(float(out[4]), rel=1e-7)  # OpenRLHF's seq-level ratio is float32


@pytest.mark.parametrize("cfg", IS_CONFIGS, ids=lambda c: "-".join(map(str, c[:3])))
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_is_corrected_policy_loss_runs_on_rf(patched, cfg, token_level, dual_clip):
    old, roll, mask = _is_batch(seed=6)
    g = torch.Generator().manual_seed(7)
    lp = old + 0.2 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    adv = torch.randn(old.shape, generator=g, dtype=torch.float64)
    kw = dict(dp_size=2, batch_num_tokens=90.0, global_batch_size=11.0) if dual_clip else {}
    level, mode, gating, threshold = cfg
    res = []
    before = dict(rf_orl.calls)
    for cls in (L.PolicyLoss, ORIG_POLICY):
        leaves = [t.clone().requires_grad_() for t in (lp, old, adv)]
        pl = cls(0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level, is_correction_level=level,
                 is_correction_mode=mode, is_correction_gating=gating, is_correction_threshold=threshold)
        out = pl(*leaves, mask, rollout_log_probs=roll, **kw)
        out[0].backward()
        res.append((out, [t.grad for t in leaves]))
    assert rf_orl.calls["PolicyLoss"] == before.get("PolicyLoss", 0) + 1
    assert rf_orl.calls["PolicyLoss_to_openrlhf"] == before.get("PolicyLoss_to_openrlhf", 0)
    (o1, g1), (o2, g2) = res
    tol = 1e-12 if token_level else 1e-7  # OpenRLHF adds 1e-8 to the per-row token count
    for i, what in enumerate(("loss", "clip_ratio", "ppo_kl", "vllm_kl")):
        assert_rel(o1[i], o2[i], tol, what)
    assert_rel(o1[4], o2[4], 1e-7, "is_filter_ratio")  # OpenRLHF's seq-level ratio is float32
    for a, b, what in zip(g1, g2, ("d log_probs", "d old_log_probs", "d advantages")):
        assert_rel(a, b, tol, what)


def test_is_correction_without_rollout_log_probs_says_so(patched):
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs rollout_log_probs"):
        L.PolicyLoss(is_correction_level="token")(x, x, x, torch.ones(2, 4))


def _experience_maker():
    try:
        return importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker").RemoteExperienceMaker
    except Exception:  # noqa: BLE001
        return None


def _documented_gae(values, rewards, mask, gamma, lambd):
    """The recursion of RemoteExperienceMaker.get_advantages_and_returns's docstring (masked values and rewards
    zeroed; A_t = δ_t + γλ·A_{t+1}, δ_t = r_t + γ·V_{t+1} - V_t, returns A + V)."""
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        nv = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        last = rewards[:, t] + gamma * nv - values[:, t] + gamma * lambd * last
        adv[:, t] = last
    return adv, adv + values


def test_gae_and_cumulative_returns():
    g = torch.Generator().manual_seed(3)
    B, T = 5, 12
    values, rewards = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([12, 7, 1, 9, 4])[:, None]).float()
    mask[0, 3:5] = 0  # a hole: OpenRLHF zeroes it and does not skip it
    maker = _experience_maker()
    if maker is not None:
        exp_adv, exp_ret = maker.get_advantages_and_returns(None, values, rewards, mask, 0.97, 0.9)
        exp_cum = maker.get_cumulative_returns(None, rewards, mask, 0.97)
    else:
        exp_adv, exp_ret = _documented_gae(values.double(), rewards.double(), mask.double(), 0.97, 0.9)
        exp_cum, _ = _documented_gae(torch.zeros_like(values).double(), rewards.double(), mask.double(), 0.97, 1.0)
    adv, ret = rf_orl.get_advantages_and_returns(None, values, rewards, mask, 0.97, 0.9)
    assert adv.dtype == torch.float32
    assert_rel(adv, exp_adv, 2e-6, "advantages")
    assert_rel(ret, exp_ret, 2e-6, "returns")
    assert_rel(rf_orl.get_cumulative_returns(None, rewards, mask, 0.97), exp_cum, 2e-6, "cumulative returns")


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_compute_approx_kl_extreme_log_ratios(patched, est):
    # logp - base below -88: exp overflows fp32 before the ±10 bound (issue 20): finite, as OpenRLHF's own
    d = torch.tensor([0.3, -2.7, -30.0, -89.0, -100.0, -720.0, -1e6, 30.0, 1e6])
    base = torch.full_like(d, -2.0)
    res = []
    for fn in (U.compute_approx_kl, ORIG["compute_approx_kl"]):
        a = (base + d).requires_grad_()
        out = fn(a, base, kl_estimator=est)
        out.sum().backward()
        res.append((out, a.grad))
    assert res[1][1].isfinite().all() and res[0][1].isfinite().all(), (res[0][1], res[1][1])
    assert_rel(res[0][0], res[1][0], 1e-6, f"{est} value")
    assert_rel(res[0][1], res[1][1], 1e-6, f"{est} grad")
