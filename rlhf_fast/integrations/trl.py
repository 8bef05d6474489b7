"""TRL (1.16) on rlhf_fast: the fused LM-head log-probs and the logits-row helpers.

    from rlhf_fast.integrations import trl as rf_trl
    rf_trl.patch()                 # before building the trainer; or: with rf_trl.patched(): ...

Replaced, in every loaded ``trl.*`` module that holds them (any name, e.g. ``trl.kernels.ChunkedLogProbFunction``):
  ``trl.trainer.utils._ChunkedLogProbFunction`` (GRPO / RLOO / DPO / KTO / SFT call it through
  ``add_fused_lm_head``) -> ``rf.linear_logprobs`` (temperature and logit_scale folded into one
  temperature T / logit_scale). With ``final_logit_softcapping`` the logits are formed in torch
  (softcap·tanh(scale·z / softcap)) and ``rf.logprobs`` runs on them: exact, but not memory-fused.
  The extra outputs ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` (DPO / KTO metrics) are not rf
  ops: a call that asks for them is handed to TRL's own function (counted in ``calls``).
  ``selective_log_softmax`` -> ``rf.logprobs`` (top-K index [..., K]: one pass per k);
  ``entropy_from_logits`` -> ``rf.logprobs(..., return_entropy=True)``.
Outputs keep TRL's dtypes (the logits' dtype for the logits helpers; fp32 for the fused head, fp64 for fp64 inputs).
Modules imported after ``patch()`` (e.g. ``trl.experimental.*``) are not patched: call ``patch()`` after them.
"""
from __future__ import annotations

import contextlib

import torch

from .. import functional as F
from . import Patcher, require

_NAMES = ("_ChunkedLogProbFunction", "selective_log_softmax", "entropy_from_logits")
_RF_OUTPUTS = ("log_probs", "entropy")
_patcher = Patcher("trl")
calls = _patcher.calls
_originals: dict[str, object] = {}


def _utils():
    return require("trl.trainer.utils", "trl==1.16.0")


class ChunkedLogProbFunction:
    """Drop-in for TRL's ``_ChunkedLogProbFunction``: ``apply(hidden [N, H], weight [V, H], bias [V] | None,
    targets [N], temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...)``
    -> (log_probs [N] fp32, entropy [N] fp32 | None, None, None, None)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=None):
        original = _originals["_ChunkedLogProbFunction"]
        if outputs is None:
            outputs = require("trl.kernels.chunked_logprob", "trl==1.16.0").OPTIONAL_OUTPUTS
        if any(o not in _RF_OUTPUTS for o in outputs):
            calls["chunked_logprob_to_trl"] += 1
            return original.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                  logit_scale, outputs)
        calls["chunked_logprob"] += 1
        want_entropy = "entropy" in outputs
        # under autocast TRL runs the head in the autocast dtype: cast here (differentiably, so the gradients
        # reach the inputs in their own dtypes) and run rf with autocast off, so that the forward and the
        # backward both see exactly these tensors
        dev = hidden.device.type
        if torch.is_autocast_enabled(dev):
            cd = torch.get_autocast_dtype(dev)
            hidden, weight = hidden.to(cd), weight.to(cd)
            bias = None if bias is None else bias.to(cd)
        with torch.autocast(dev, enabled=False):
            if final_logit_softcapping is None and logit_scale > 0:
                out = F.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature / logit_scale,
                                        return_entropy=want_entropy)
            else:  # softcap (Gemma) or a non-positive scale: form the logits, then the rf row kernels
                z = (hidden.float() @ weight.float().T + (0 if bias is None else bias.float())) * logit_scale
                if final_logit_softcapping is not None:
                    z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
                out = F.logprobs(z, targets, temperature=temperature, return_entropy=want_entropy)
        logp, ent = out if want_entropy else (out, None)
        return logp, ent, None, None, None


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """TRL's ``selective_log_softmax`` on rf.logprobs: logits [..., V], index [...] or [..., K]."""
    calls["selective_log_softmax"] += 1
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    top_k = index.dim() == logits.dim()
    idx = index if top_k else index.unsqueeze(-1)
    if row_mask is not None:  # rows with a zero give 0 (and no gradient), as TRL's masked_fill
        keep = (row_mask != 0) if row_mask.shape == idx.shape else (row_mask != 0).unsqueeze(-1).expand_as(idx)
        idx = torch.where(keep, idx, -100)
    cols = [F.logprobs(logits, idx[..., k], temperature=temperature) for k in range(idx.shape[-1])]
    out = torch.stack(cols, -1).to(logits.dtype)
    return out if top_k else out.squeeze(-1)


def entropy_from_logits(logits, chunk_size=128):
    """TRL's ``entropy_from_logits`` on rf.logprobs: logits [..., V] -> entropy [...] in the logits' dtype."""
    calls["entropy_from_logits"] += 1
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return F.logprobs(logits, labels, return_entropy=True)[1].to(logits.dtype)


_REPLACEMENTS = {"_ChunkedLogProbFunction": ChunkedLogProbFunction, "selective_log_softmax": selective_log_softmax,
                 "entropy_from_logits": entropy_from_logits}


def patch() -> None:
    """Swap TRL's functions for the rf ones in every loaded trl module (idempotent)."""
    utils = _utils()
    if _patcher.active:
        unpatch()
    for name in _NAMES:
        _originals[name] = getattr(utils, name)
    _patcher.swap({id(_originals[n]): (_originals[n], _REPLACEMENTS[n]) for n in _NAMES})


def unpatch() -> None:
    """Put back exactly what patch() replaced."""
    _patcher.restore()


def is_patched() -> bool:
    return _patcher.active


@contextlib.contextmanager
def patched():
    patch()
    try:
        yield
    finally:
        unpatch()
