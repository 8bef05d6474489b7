"""k3 KL with extreme log-ratios under a clamp (issue 20, item 6): exp(ref - logp) overflows before the
clamp for logp - ref_logp below about -88 (fp32) / -709 (fp64), and the clamp's zero gradient times the
infinite derivative gave NaN. With ``clamp=`` every finite input gives a finite value and gradient, on
every backend, and verl's own ``kl_penalty("low_var_kl")`` agrees with the adapter there (OpenRLHF's
``compute_approx_kl``: tests/test_integrations_openrlhf.py)."""
import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref
from utils import DEVICE, backends

# d = logp - ref_logp: in range, where the clamp bites, where exp overflows fp32, fp64, the dtypes' ends
D = [0.3, -1.0, -2.7, 5.0, 30.0, -30.0, -89.0, -100.0, -720.0, -1e6, -3e38, 3e38]


def _run(backend, estimator, clamp, dtype):
    d = torch.tensor(D, dtype=torch.float64)
    d = d[d.to(dtype).isfinite()]
    if estimator.endswith("+"):  # k2 + (value - k2) (the straight-through value) needs a finite k2 = d²/2
        d = d[d.abs() < 1e18]
    ref_logp = torch.full_like(d, -2.0).to(dtype)
    logp = (ref_logp.double() + d).to(dtype)  # finite in dtype
    lp = logp.clone().to(DEVICE).requires_grad_()
    rl = ref_logp.clone().to(DEVICE).requires_grad_()
    out = rf.kl(lp, rl, estimator=estimator, clamp=clamp, backend=backend)
    out.sum().backward()
    return logp, ref_logp, out.detach().cpu(), lp.grad.cpu(), rl.grad.cpu()


@pytest.mark.parametrize("backend", backends("kl"))
@pytest.mark.parametrize("estimator", ["k3", "k3+", "k1", "k2", "abs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_clamped_kl_is_finite_for_finite_inputs(backend, estimator, dtype):
    logp, ref_logp, out, g_lp, g_ref = _run(backend, estimator, 10.0, dtype)
    assert out.isfinite().all(), f"{backend} {estimator}: value {out.tolist()}"
    assert g_lp.isfinite().all() and g_ref.isfinite().all(), f"{backend} {estimator}: grad {g_lp.tolist()}"
    # the exact math (float64, where it does not overflow): the clamped value, and no gradient where it bites
    d = logp.double() - ref_logp.double()
    if estimator.startswith("k3"):  # float64 math at a d where nothing overflows and k3 > 10 still
        d = d.clamp(min=-700.0)
    want = ref.kl(d, torch.zeros_like(d), estimator, 10.0)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-6), (out, want)
    if estimator.startswith("k3"):
        bites = d < -3  # k3 > 10 there
        assert (g_lp[bites] == 0).all() and (g_ref[bites] == 0).all(), g_lp


@pytest.mark.parametrize("backend", backends("kl"))
def test_unclamped_k3_still_overflows_honestly(backend):
    # no clamp: the value is exp(-d) - 1 + d, +inf where it overflows fp32 (nothing is made up there)
    _, _, out, g, _ = _run(backend, "k3", None, torch.float32)
    d = torch.tensor([x for x in D if abs(x) < 3.4e38])
    assert torch.equal(out.isinf(), d < -88.8), out


def _peer(module):
    return pytest.importorskip(module)


def test_verl_low_var_kl_adapter_matches_verl_at_extremes():
    core = _peer("verl.trainer.ppo.core_algos")
    from rlhf_fast.integrations import verl as rf_verl

    d = torch.tensor([x for x in D if abs(x) < 3e38])
    ref_logp = torch.full_like(d, -2.0)
    outs = []
    for fn in (core.kl_penalty, rf_verl.kl_penalty):
        lp = (ref_logp + d).requires_grad_()
        v = fn(lp, ref_logp, "low_var_kl")
        v.sum().backward()
        outs.append((v.detach(), lp.grad))
    (v0, g0), (v1, g1) = outs
    assert g0.isfinite().all() and g1.isfinite().all(), (g0, g1)
    assert torch.allclose(v1, v0, rtol=1e-5, atol=1e-6) and torch.allclose(g1, g0, rtol=1e-5, atol=1e-6), \
        (v0, v1, g0, g1)

