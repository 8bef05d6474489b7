import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref
from utils import DEVICE, DTYPES, GRAD_TOL, OUT_TOL, assert_rel, backends


def _check(backend, logits, labels, temperature=1.0, ignore_index=-100, grad=True):
    """Forward and backward of one backend against the float64 reference on the same input values."""
    x = logits.detach().clone().requires_grad_(grad)
    x64 = logits.detach().double().requires_grad_(grad)
    lp, ent = rf.logprobs(x, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=True,
                          backend=backend)
    lp64, ent64 = ref.logprobs(x64, labels, temperature, ignore_index, True)
    want = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert lp.dtype == want and ent.dtype == want
    tol = OUT_TOL[logits.dtype]
    assert_rel(lp, lp64, tol, f"{backend} logp")
    assert_rel(ent, ent64, tol, f"{backend} entropy")
    if not grad:
        return
    g_lp, g_ent = torch.randn_like(lp64), torch.randn_like(ent64)
    finite = torch.isfinite(lp64)
    g_lp = torch.where(finite, g_lp, 0.0)
    (lp.double() * g_lp).sum().add((ent.double() * g_ent).sum()).backward()
    (lp64 * g_lp).sum().add((ent64 * g_ent).sum()).backward()
    assert x.grad.dtype == logits.dtype
    assert_rel(x.grad, x64.grad, GRAD_TOL[logits.dtype], f"{backend} grad logits")


@pytest.mark.parametrize("backend", backends("logprobs"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 423), (1, 1, 1), (7, 1000), (2, 4099)])
def test_matches_reference(backend, dtype, shape):
    logits = (torch.randn(*shape, device=DEVICE) * 4).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], device=DEVICE)
    _check(backend, logits, labels)


@pytest.mark.parametrize("backend", backends("logprobs"))
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature_and_ignore_index(backend, temperature):
    logits = torch.randn(6, 333, device=DEVICE) * 3
    labels = torch.randint(0, 333, (6,), device=DEVICE)
    labels[[1, 4]] = 7  # ignore_index may be a valid-looking id
    _check(backend, logits, labels, temperature=temperature, ignore_index=7)


@pytest.mark.parametrize("backend", backends("logprobs"))
def test_edge_values(backend):
    V = 515
    logits = torch.randn(6, V, device=DEVICE)
    labels = torch.randint(0, V, (6,), device=DEVICE)
    logits[0] *= 1e4  # huge logits
    logits[1] = -torch.rand(V) * 50 - 100  # all-negative row
    logits[2, ::3] = float("-inf")  # masked vocabulary
    labels[2] = 1
    logits[3] = float("-inf")  # all -inf except the label
    logits[3, labels[3]] = 0.5
    logits[4, labels[4]] = float("-inf")  # the label itself masked out: logp = -inf
    labels[5] = -100
    _check(backend, logits, labels)


@pytest.mark.parametrize("backend", backends("logprobs"))
def test_ignored_positions_give_zero_and_zero_grad(backend):
    logits = torch.randn(2, 3, 50, device=DEVICE, requires_grad=True)
    labels = torch.full((2, 3), -100, device=DEVICE)
    labels[1, 2] = 4
    lp, ent = rf.logprobs(logits, labels, return_entropy=True, backend=backend)
    assert (lp[labels == -100] == 0).all() and (ent[labels == -100] == 0).all()
    (lp + ent).sum().backward()
    assert (logits.grad[labels == -100] == 0).all()
    assert logits.grad[1, 2].abs().sum() > 0


@pytest.mark.parametrize("backend", backends("logprobs"))
def test_non_contiguous_inputs(backend):
    wide = torch.randn(5, 2 * 301, device=DEVICE)
    _check(backend, wide[:, ::2], torch.randint(0, 301, (5,), device=DEVICE))  # strided columns
    tall = torch.randn(301, 5, device=DEVICE)
    _check(backend, tall.T, torch.randint(0, 301, (5,), device=DEVICE))  # transposed
    padded = torch.randn(4, 3, 400, device=DEVICE)[:, :, :397]  # row stride != V
    _check(backend, padded, torch.randint(0, 397, (4, 3), device=DEVICE))


@pytest.mark.parametrize("backend", backends("logprobs"))
def test_empty(backend):
    logits = torch.randn(0, 17, device=DEVICE, requires_grad=True)
    lp, ent = rf.logprobs(logits, torch.zeros(0, dtype=torch.long, device=DEVICE), return_entropy=True,
                          backend=backend)
    assert lp.shape == (0,) and ent.shape == (0,)
    lp.sum().backward()
    assert logits.grad.shape == (0, 17)


def test_without_entropy_returns_one_tensor():
    logits = torch.randn(4, 9, device=DEVICE)
    lp = rf.logprobs(logits, torch.randint(0, 9, (4,), device=DEVICE))
    assert isinstance(lp, torch.Tensor) and lp.shape == (4,)


def test_reference_gradcheck():
    logits = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 10])
    torch.autograd.gradcheck(lambda x: ref.logprobs(x, labels, 0.8, -100, True), (logits,))
    hidden = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda h, w: ref.linear_logprobs(h, w, labels, None, 1.3, -100, True), (hidden, weight))


def test_reference_against_definition():
    # the reference itself, against log(softmax) written out in float64
    logits = torch.randn(4, 30, dtype=torch.float64)
    labels = torch.randint(0, 30, (4,))
    p = torch.exp(logits / 0.9) / torch.exp(logits / 0.9).sum(-1, keepdim=True)
    lp, ent = ref.logprobs(logits, labels, 0.9, -100, True)
    assert torch.allclose(lp, p.gather(-1, labels[:, None]).squeeze(-1).log())
    assert torch.allclose(ent, -(p * p.log()).sum(-1))


@pytest.mark.parametrize("backend", backends("logprobs"))
def test_bad_input_raises(backend):
    logits = torch.randn(4, 10, device=DEVICE)
    labels = torch.randint(0, 10, (4,), device=DEVICE)
    with pytest.raises(ValueError, match="labels must have shape"):
        rf.logprobs(logits, labels[:3], backend=backend)
    with pytest.raises(ValueError, match="labels must be in"):
        rf.logprobs(logits, torch.tensor([0, 1, 10, 2], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="labels must be in"):
        rf.logprobs(logits, torch.tensor([0, -1, 3, 2], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="logits must be a floating"):
        rf.logprobs(logits.long(), labels, backend=backend)
    with pytest.raises(ValueError, match="labels must be an integer"):
        rf.logprobs(logits, labels.float(), backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        rf.logprobs(logits, labels, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="V >= 1"):
        rf.logprobs(torch.randn(4, 0, device=DEVICE), labels, backend=backend)
