"""Shared test helpers: devices, backends, and a relative-error check that says where it failed."""
import os

import torch

import rlhf_fast as rf

DEVICE = "cuda" if os.environ.get("RLHF_FAST_TEST_GPU") and torch.cuda.is_available() else "cpu"

# ‖out − ref‖/‖ref‖ bounds against a float64 reference. Outputs of fp32 math; gradients written in
# the input dtype (one rounding of a value of magnitude ~|grad|).
OUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def backends(op, device=DEVICE):
    return rf.backends_for(op, device)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_rel(out, ref, tol, what=""):
    """Assert ‖out − ref‖/‖ref‖ <= tol over finite entries; NaN and infinities must sit exactly where
    the reference has them."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan), \
        f"{what}: NaN at {out.isnan().nonzero()[:5].tolist()}, the reference at {nan.nonzero()[:5].tolist()}"
    inf = ~torch.isfinite(ref) & ~nan
    assert torch.equal(out[inf], ref[inf]), f"{what}: non-finite entries differ at {inf.nonzero()[:5].tolist()}"
    inf = inf | nan
    assert torch.isfinite(out[~inf]).all(), f"{what}: non-finite output where the reference is finite"
    o, r = out[~inf], ref[~inf]
    if r.numel() == 0:
        return
    if r.norm() == 0:
        assert o.abs().max() <= tol, f"{what}: reference is 0, got max |out| {o.abs().max():.3e}"
        return
    err = rel_err(o, r)
    if err > tol:
        i = (o - r).abs().argmax().item()
        raise AssertionError(f"{what}: ‖out−ref‖/‖ref‖ = {err:.3e} > {tol:.1e}; worst: out {o[i]:.6g} vs ref {r[i]:.6g}")
