import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref
from utils import DEVICE, GRAD_TOL, OUT_TOL, assert_rel, backends


def make_mask(B, T, kind):
    """right / left padding, holes (multi-turn), all-masked rows, or fully valid."""
    lengths = torch.randint(1, T + 1, (B,))
    pos = torch.arange(T)
    if kind == "right":
        m = pos[None] < lengths[:, None]
    elif kind == "left":
        m = pos[None] >= (T - lengths)[:, None]
    elif kind == "holes":
        m = torch.rand(B, T) > 0.3
    elif kind == "empty_rows":
        m = torch.rand(B, T) > 0.5
        m[::2] = False
    else:
        m = torch.ones(B, T, dtype=torch.bool)
    return m.to(DEVICE)


def gae_by_definition(r, v, m, gamma, lam):
    """Textbook GAE on each row's valid positions only (pure Python floats): the semantics' definition."""
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if m[b, t]]
        running, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = float(r[b, t]) + gamma * next_v - float(v[b, t])
            running = delta + gamma * lam * running
            next_v = float(v[b, t])
            adv[b, t] = running
    ret = torch.where(m.cpu(), adv + v.double().cpu(), 0.0)
    return adv, ret


@pytest.mark.parametrize("kind", ["right", "left", "holes", "empty_rows", "full"])
def test_reference_is_the_definition(kind):
    r, v = torch.randn(5, 13, dtype=torch.float64), torch.randn(5, 13, dtype=torch.float64)
    m = make_mask(5, 13, kind).cpu()
    adv, ret = ref.gae(r, v, m, 0.97, 0.9)
    adv_d, ret_d = gae_by_definition(r, v, m, 0.97, 0.9)
    assert torch.allclose(adv, adv_d) and torch.allclose(ret, ret_d)


def test_right_padding_is_textbook_gae_with_zero_value_past_the_end():
    r, v = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    m = torch.ones(3, 9, dtype=torch.bool)
    m[:, 6:] = False
    adv, _ = ref.gae(r, v, m, 1.0, 0.95)
    adv_loop, _ = ref.gae_python_loop(r[:, :6], v[:, :6], 1.0, 0.95)
    assert torch.allclose(adv[:, :6], adv_loop)


@pytest.mark.parametrize("backend", backends("gae"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["right", "left", "holes", "empty_rows", "full"])
@pytest.mark.parametrize("shape", [(4, 1), (7, 37), (3, 300)])
def test_matches_reference(backend, dtype, kind, shape):
    B, T = shape
    r = torch.randn(B, T, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(B, T, device=DEVICE).to(dtype).requires_grad_()
    m = make_mask(B, T, kind)
    gamma, lam = 0.99, 0.95
    adv, ret = rf.gae(r, v, m, gamma=gamma, lam=lam, backend=backend)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the one dtype rule (functional.py)
    assert adv.dtype == out_dtype and ret.dtype == out_dtype
    r64, v64 = r.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    adv64, ret64 = ref.gae(r64, v64, m, gamma, lam)
    tol = OUT_TOL[dtype]  # fp32 outputs: no rounding to the half input dtype
    assert_rel(adv, adv64, tol, f"{backend} advantages")
    assert_rel(ret, ret64, tol, f"{backend} returns")
    # upstream grads exact in the input dtype, so the only rounding is that of the result
    ga, gr = (torch.randn_like(adv64).to(dtype).double() for _ in range(2))
    ((adv.double() * ga).sum() + (ret.double() * gr).sum()).backward()
    ((adv64 * ga).sum() + (ret64 * gr).sum()).backward()
    gtol = max(GRAD_TOL[dtype], tol)
    assert_rel(r.grad, r64.grad, gtol, f"{backend} grad rewards")
    assert_rel(v.grad, v64.grad, gtol, f"{backend} grad values")


@pytest.mark.parametrize("backend", backends("gae"))
def test_long_rows_and_int_mask(backend):
    r, v = torch.randn(2, 3000, device=DEVICE), torch.randn(2, 3000, device=DEVICE)
    m = (torch.rand(2, 3000, device=DEVICE) > 0.1).int()
    adv, ret = rf.gae(r, v, m, gamma=1.0, lam=1.0, backend=backend)
    adv64, ret64 = ref.gae(r.double(), v.double(), m, 1.0, 1.0)
    assert_rel(adv, adv64, 1e-5, "advantages")
    assert_rel(ret, ret64, 1e-5, "returns")


def test_reference_gradcheck():
    r = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0] * 6], dtype=torch.bool)
    torch.autograd.gradcheck(lambda r, v: ref.gae(r, v, m, 0.9, 0.8), (r, v))


@pytest.mark.parametrize("backend", backends("gae"))
def test_bad_input_raises(backend):
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match="values must have the shape"):
        rf.gae(r, v[:, :4], m, backend=backend)
    with pytest.raises(ValueError, match="2 dimensions"):
        rf.gae(r[0], v[0], m[0], backend=backend)
    with pytest.raises(ValueError, match="rewards must be a floating"):
        rf.gae(r.long(), v, m, backend=backend)
