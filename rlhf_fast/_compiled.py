"""Glue for the compiled ops (csrc/): load ``rlhf_fast._C``, register fake implementations and
autograd with ``torch.library`` (so the ops work under ``torch.compile`` and pass
``torch.library.opcheck``), and register the "cpu" and "cuda" backends.

The schemas live in csrc/ops.cpp. If the extension is missing, the package still imports and the
backends are marked unavailable with the reason.
"""
from __future__ import annotations

import torch

from . import _backend

try:
    from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)

    LOADED, LOAD_ERROR = True, None
except ImportError as e:  # not built, or built against another torch
    LOADED, LOAD_ERROR = False, f"{type(e).__name__}: {e}"


def has_kernel(op: str, key: str) -> bool:
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"rlhf_fast::{op}", key)


if not LOADED:
    _msg = (f"the compiled extension rlhf_fast._C did not load ({LOAD_ERROR}); rebuild with "
            "`pip install --no-build-isolation -e .`")
    _backend.mark_unavailable("cpu", _msg)
    _backend.mark_unavailable("cuda", _msg)
elif not has_kernel("gae_fwd", "CUDA"):
    _backend.mark_unavailable("cuda", "rlhf_fast._C was built without CUDA sources "
                                      "(torch without CUDA, no CUDA_HOME, or RLHF_FAST_CUDA=0)")

if LOADED:
    ops = torch.ops.rlhf_fast

    # ------------------------------------------------------------------ logprobs
    @torch.library.register_fake("rlhf_fast::logprobs_fwd")
    def _(logits, labels, inv_temperature, ignore_index):
        torch._check(logits.dim() == 2, lambda: "logits must be [N, V]")
        dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n = logits.shape[0]
        return logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt)

    @torch.library.register_fake("rlhf_fast::logprobs_bwd")
    def _(grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def _logprobs_setup(ctx, inputs, output):
        logits, labels, inv_t, ignore_index = inputs
        _, entropy, lse = output
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.inv_t, ctx.ignore_index = inv_t, ignore_index

    def _logprobs_backward(ctx, g_logp, g_entropy, _g_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_logits = ops.logprobs_bwd(g_logp.contiguous(), g_entropy, logits, labels, lse, entropy,
                                    ctx.inv_t, ctx.ignore_index)
        return g_logits, None, None, None

    torch.library.register_autograd("rlhf_fast::logprobs_fwd", _logprobs_backward,
                                    setup_context=_logprobs_setup)

    def logprobs(logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False):
        logp, entropy, _ = ops.logprobs_fwd(logits, labels, 1.0 / temperature, ignore_index)
        return (logp, entropy) if return_entropy else logp

    # ------------------------------------------------------------------ gae
    @torch.library.register_fake("rlhf_fast::gae_fwd")
    def _(rewards, values, mask, gamma, lam):
        torch._check(rewards.shape == values.shape and rewards.shape == mask.shape)
        return torch.empty_like(rewards), torch.empty_like(rewards)

    @torch.library.register_fake("rlhf_fast::gae_bwd")
    def _(grad_advantages, grad_returns, mask, gamma, lam):
        return torch.empty_like(grad_advantages), torch.empty_like(grad_advantages)

    def _gae_setup(ctx, inputs, output):
        _, _, mask, gamma, lam = inputs
        ctx.save_for_backward(mask)
        ctx.gamma, ctx.lam = gamma, lam

    def _gae_backward(ctx, g_adv, g_ret):
        (mask,) = ctx.saved_tensors
        g_adv = torch.zeros_like(mask, dtype=(g_ret if g_adv is None else g_adv).dtype) if g_adv is None else g_adv
        g_ret = torch.zeros_like(g_adv) if g_ret is None else g_ret
        d_rew, d_val = ops.gae_bwd(g_adv.contiguous(), g_ret.contiguous(), mask, ctx.gamma, ctx.lam)
        return d_rew, d_val, None, None, None

    torch.library.register_autograd("rlhf_fast::gae_fwd", _gae_backward, setup_context=_gae_setup)

    def gae(rewards, values, mask, gamma=1.0, lam=0.95):
        out_dtype = values.dtype
        math = torch.float64 if out_dtype == torch.float64 else torch.float32
        adv, ret = ops.gae_fwd(rewards.to(math), values.to(math), mask.bool(), float(gamma), float(lam))
        return adv.to(out_dtype), ret.to(out_dtype)

    for _name, _fn in (("logprobs", logprobs), ("gae", gae)):
        _backend.register(_name, "cpu")(_fn)
        _backend.register(_name, "cuda")(_fn)
