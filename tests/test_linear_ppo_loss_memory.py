"""The memory of rf.linear_ppo_loss beyond what a plain autograd backward of the same loss needs (issue 20,
item 5): at most one chunk of logits plus O(N·H). Accounted for exactly: the bytes of every tensor the forward
saves for the backward (not counting the inputs it keeps) or returns, and the largest tensor any op makes in
the backward other than grad_weight itself (which a plain backward makes too)."""
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_fast as rf
from rlhf_fast import reference as ref
from rlhf_fast.ops.linear_ppo_loss import default_chunk_rows
from utils import DEVICE, assert_rel, backends

CHUNKED = [b for b in backends("linear_ppo_loss") if b != "reference"]


def _inputs(N, H, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(DEVICE, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels[3] = -100
    old = (-torch.rand(N, generator=g) * 8).to(DEVICE)
    adv = torch.randn(N, generator=g).to(DEVICE)
    mask = (torch.rand(N, generator=g) > 0.2).to(DEVICE)
    return hidden, weight, labels, old, adv, mask


class _Saved:
    """Bytes of the tensors saved for the backward whose storage is not one of `keep` (the inputs)."""

    def __init__(self, keep):
        self.keep = {t.untyped_storage().data_ptr() for t in keep}
        self.bytes, self.shapes = 0, []

    def pack(self, t):
        if t.untyped_storage().data_ptr() not in self.keep:
            self.bytes += t.numel() * t.element_size()
            self.shapes.append(tuple(t.shape))
        return t


class _Largest(TorchDispatchMode):
    """The largest tensor (bytes) any op makes while active, except those of shape `skip`."""

    def __init__(self, skip):
        super().__init__()
        self.skip, self.bytes, self.op = skip, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and tuple(t.shape) != self.skip:
                if t.numel() * t.element_size() > self.bytes:
                    self.bytes, self.op = t.numel() * t.element_size(), func
        return out


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_and_backward_memory_within_one_chunk_plus_n_h(backend, dtype):
    # V·H (grad_weight) is 4x the chunk of logits here: the fp32 grad_weight accumulator kept until the
    # backward (the old design) fails the bound, and so would grad_weight in the weight's dtype
    N, H, V = 16, 32, 1024
    hidden, weight, labels, old, adv, mask = _inputs(N, H, V, dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    saved = _Saved([h, w, labels, old, adv, mask])
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss, stats = rf.linear_ppo_loss(h, w, labels, old, adv, mask, ref_logp=old + 0.1, kl_coef=0.1,
                                         entropy_coef=0.01, backend=backend)
    returned = sum(t.numel() * t.element_size() for t in [loss, *stats.values()])
    chunk = default_chunk_rows(N, V) * V * 4  # one chunk of fp32 logits
    o_nh = N * H * 8 + N * 128 + 8 * V  # grad_hidden (at most fp64), per-row scalars, grad_bias
    assert saved.bytes + returned <= chunk + o_nh, \
        f"{backend}: the forward keeps {saved.bytes} bytes {saved.shapes} for the backward (bound {chunk + o_nh})"
    assert V * H * w.element_size() > chunk + o_nh  # (what the bound rules out)
    with _Largest(skip=(V, H)) as mode:
        loss.backward()
    assert mode.bytes <= chunk, f"{backend}: {mode.op} made {mode.bytes} bytes in the backward (one chunk: {chunk})"
    # and the gradients are still right
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss64, _ = ref.linear_ppo_loss(h64, w64, labels, old.double(), adv.double(), mask, None, old.double() + 0.1,
                                    kl_coef=0.1, entropy_coef=0.01)
    loss64.backward()
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert_rel(h.grad, h64.grad, tol, f"{backend} grad hidden")
    assert_rel(w.grad, w64.grad, tol, f"{backend} grad weight")


@pytest.mark.parametrize("backend", CHUNKED)
def test_frozen_weight_runs_no_backward_gemm(backend):
    # no grad_weight wanted (a frozen head, LoRA): nothing is recomputed in the backward
    hidden, weight, labels, old, adv, mask = _inputs(16, 8, 300)
    h = hidden.clone().requires_grad_()
    loss, _ = rf.linear_ppo_loss(h, weight, labels, old, adv, mask, chunk_size=4, backend=backend)
    calls = []

    class _MM(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_", "matmul"):
                calls.append(func)
            return func(*args, **(kwargs or {}))
    with _MM():
        loss.backward()
    assert calls == [] and h.grad is not None


@pytest.mark.parametrize("backend", CHUNKED)
def test_grad_weight_in_forward_setting_gives_the_same_gradients(backend, monkeypatch):
    # GRAD_WEIGHT_IN_BACKWARD = False: the 3-GEMM design (fp32 accumulator in the forward), same gradients
    from rlhf_fast.ops import linear_ppo_loss as lpl

    hidden, weight, labels, old, adv, mask = _inputs(24, 8, 301)
    bias = torch.randn(301, device=DEVICE)
    res = []
    for flag in (True, False):
        monkeypatch.setattr(lpl, "GRAD_WEIGHT_IN_BACKWARD", flag)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, _ = rf.linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2], ref_logp=old,
                                     kl_coef=0.1, entropy_coef=0.02, temperature=0.8, chunk_size=5, backend=backend)
        (3 * loss).backward()
        res.append([t.grad for t in leaves])
    for name, a, b in zip(("hidden", "weight", "bias"), *res):
        assert_rel(a, b, 1e-6, f"{backend} grad {name}")
