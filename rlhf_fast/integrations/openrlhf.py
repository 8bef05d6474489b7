"""OpenRLHF (0.11) on rlhf_fast: log-probs, entropy, KL, the PPO losses, GAE and cumulative returns.

    from rlhf_fast.integrations import openrlhf as rf_orl
    rf_orl.patch()          # before the actor / trainer objects are built

Replaced in every loaded ``openrlhf.*`` module that holds them:
  ``models.utils.log_probs_from_logits``  -> rf.logprobs (keeps OpenRLHF's in-place ``logits /= temperature``,
                                            which its actor relies on for the entropy)
  ``models.utils.compute_entropy``        -> rf.logprobs(..., return_entropy=True)
  ``models.utils.compute_approx_kl``      -> rf.kl (k1/k2/k3 bounded to ±10 as OpenRLHF; ``unbiased_gradient``
                                            keeps the value and takes w·k2's gradient, w = clamped ratio)
  ``models.loss.PolicyLoss`` / ``ValueLoss`` -> subclasses whose forward runs rf.ppo_policy_loss / ppo_value_loss
                                            with OpenRLHF's token_level_loss / global-batch normalisation; PPO's
                                            rollout IS corrections (is_correction_level/mode/gating/threshold) on
                                            rf.rollout_correction, GSPO on loss_type="gspo" (with dual_clip it
                                            is handed to OpenRLHF's forward)
  ``RemoteExperienceMaker.get_advantages_and_returns`` / ``get_cumulative_returns`` -> rf.gae /
                                            rf.reinforce_pp_returns with OpenRLHF's semantics (masked values and
                                            rewards are zeroed, not skipped)
Differences: seq-level losses divide by the token count exactly (OpenRLHF adds 1e-8); a row with no valid
token gives 0 where OpenRLHF's masked_mean gives NaN. GSPO: rf takes verl's GSPO-token gradient (each token's
gradient through its own log-prob, scaled by the sequence ratio; log-ratio clamped at 10) where OpenRLHF
differentiates the sequence ratio through all of the sequence's tokens: the same loss, and the same gradients
when the advantages are constant over each sequence (GRPO-style); with per-token advantages the gradient of
each sequence is redistributed over its tokens (same sum); old_log_probs get no gradient (OpenRLHF's do;
they are data in training). IS correction: a surviving token's ratio is exp(clip(l, ±20)) (OpenRLHF: unbounded).
See docs/rollout_correction.md.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from .. import functional as F
from . import Patcher, require

_patcher = Patcher("openrlhf")
calls = _patcher.calls
_PIP = "openrlhf==0.11.2 (its models package needs deepspeed and flash_attn)"
_originals: dict[str, object] = {}


def log_probs_from_logits(logits, labels, temperature=1.0):
    """OpenRLHF's log_probs_from_logits: logits [B, T, V] (divided by temperature in place), labels [B, T]."""
    calls["log_probs_from_logits"] += 1
    if temperature != 1.0:
        logits.div_(temperature)
    return F.logprobs(logits, labels).to(logits.dtype)


def compute_entropy(logits):
    """OpenRLHF's compute_entropy: entropy of softmax(logits) [..., V] -> [...] in the logits' dtype."""
    calls["compute_entropy"] += 1
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return F.logprobs(logits, labels, return_entropy=True)[1].to(logits.dtype)


def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False):
    """OpenRLHF's compute_approx_kl on rf.kl (fp32 out, every estimator bounded to [-10, 10])."""
    calls["compute_approx_kl"] += 1
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    lp, base = log_probs.float(), log_probs_base.float()
    if not unbiased_gradient:
        return F.kl(lp, base, estimator=kl_estimator, clamp=10.0)
    value = F.kl(lp.detach(), base.detach(), estimator=kl_estimator, clamp=10.0)
    if log_probs_old is None:
        w = 1.0
    else:
        clip = getattr(sys.modules.get("openrlhf.models.utils"), "KL_IS_WEIGHT_CLIP", 10.0)
        w = F.ref.importance_ratio(lp, log_probs_old.float()).clamp(max=clip).detach()
    surrogate = w * F.kl(lp, base, estimator="k2")
    return value + surrogate - surrogate.detach()


def _agg(token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size):
    if token_level_loss:
        kw = {} if batch_num_tokens is None else {"num_tokens": batch_num_tokens / dp_size}
        return "token-mean", kw
    kw = {} if global_batch_size is None else {"num_seqs": global_batch_size / dp_size}
    return "seq-mean-token-mean", kw


def _ones_if_none(mask, like):
    return torch.ones_like(like) if mask is None else mask


_IS_LEVELS = {"token": "token", "seq": "geometric"}  # OpenRLHF's seq gate reads the per-sequence mean


def is_correction_weights(old_log_probs, rollout_log_probs, mask, level, mode, gating, threshold):
    """OpenRLHF's PolicyLoss IS-correction coefficients on rf.rollout_correction -> (weights, is_filter_ratio).

    level token|seq, mode clip|mask, gating ratio|binary_kl|tv, threshold (low, high): survivors of a mask keep
    their own token's ratio; clip clamps the token ratio. is_filter_ratio as OpenRLHF reports it: over valid
    tokens at token level, over all rows at seq level (a row without a valid token counts as filtered)."""
    if rollout_log_probs is None:
        raise ValueError(f"is_correction_level={level!r} needs rollout_log_probs (the rollout engine's log-probs)")
    low, high = (float(t) for t in threshold)
    clip = mode == "clip"
    w, st = F.rollout_correction(old_log_probs, rollout_log_probs, mask, level=_IS_LEVELS[level],
                                 mode="truncate" if clip else "mask", low=low if low > 0 else None, high=high,
                                 gate=gating, keep="unit" if clip else "token")
    name = "truncated" if clip else "masked"
    if level == "token":
        return w, st[f"{name}_frac"]
    rows = (mask != 0).any(-1)
    n = rows.to(w.dtype).sum()
    return w, (st[f"{name}_seq_frac"] * n + (rows.numel() - n)) / max(rows.numel(), 1)


def _policy_loss_class(base):
    class PolicyLoss(base):
        """OpenRLHF's PolicyLoss on rf: PPO (with its IS corrections, rf.rollout_correction) and GSPO
        (rf.ppo_policy_loss loss_type="gspo"); GSPO with dual_clip goes to OpenRLHF's forward."""

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                    batch_num_tokens=None, global_batch_size=None):
            gspo = self.policy_loss_type == "gspo"
            if self.policy_loss_type not in ("ppo", "gspo") or (gspo and self.dual_clip is not None):
                calls["PolicyLoss_to_openrlhf"] += 1  # rf's gspo has no dual clip
                return super().forward(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size,
                                       batch_num_tokens, global_batch_size)
            calls["PolicyLoss"] += 1
            mask = _ones_if_none(action_mask, log_probs)
            agg, kw = _agg(self.token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size)
            # OpenRLHF's ppo_kl is over the unclamped log-ratio (rf's approx_kl clamps it at ±20 like the ratio)
            ppo_kl = F.masked_mean(-(log_probs - old_log_probs).detach(), mask)
            if gspo:
                # OpenRLHF's GSPO: the sequence ratio against the rollout log-probs when IS correction is on (no
                # gate), against old_log_probs otherwise; per-sequence loss (token_level_loss forced off)
                base = old_log_probs
                if self.is_correction_level != "off":
                    if rollout_log_probs is None:
                        raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
                    base = rollout_log_probs
                loss, st = F.ppo_policy_loss(log_probs, base, advantages, mask, clip_low=self.clip_eps_low,
                                             clip_high=self.clip_eps_high, agg=agg, loss_type="gspo", **kw)
                return loss, st["clipfrac"], ppo_kl, None, None
            weights = vllm_kl = is_filter_ratio = None
            if self.is_correction_level != "off":
                weights, is_filter_ratio = is_correction_weights(
                    old_log_probs, rollout_log_probs, mask, self.is_correction_level, self.is_correction_mode,
                    self.is_correction_gating, self.is_correction_threshold)
                vllm_kl = F.masked_mean((rollout_log_probs - old_log_probs).detach(), mask)
            loss, st = F.ppo_policy_loss(log_probs, old_log_probs, advantages, mask, clip_low=self.clip_eps_low,
                                         clip_high=self.clip_eps_high, dual_clip=self.dual_clip, agg=agg,
                                         weights=weights, **kw)
            return loss, st["clipfrac"], ppo_kl, vllm_kl, is_filter_ratio

    return PolicyLoss


def _value_loss_class(base):
    class ValueLoss(base):
        """OpenRLHF's ValueLoss on rf.ppo_value_loss."""

        def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                    global_batch_size=None):
            calls["ValueLoss"] += 1
            mask = _ones_if_none(action_mask, values)
            agg, kw = _agg(self.token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size)
            loss, _ = F.ppo_value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=agg, **kw)
            return loss

    return ValueLoss


@torch.no_grad()
def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
    """OpenRLHF's GAE: values and rewards zeroed where the mask is 0, then the plain recursion (rf.gae, all valid)."""
    calls["get_advantages_and_returns"] += 1
    if action_mask is not None:
        values, rewards = action_mask * values, action_mask * rewards
    adv, ret = F.gae(rewards, values, torch.ones_like(rewards, dtype=torch.bool), gamma=gamma, lam=lambd)
    return adv.to(rewards.dtype), ret.to(rewards.dtype)


@torch.no_grad()
def get_cumulative_returns(self, rewards, action_mask, gamma):
    """OpenRLHF's REINFORCE returns: rewards zeroed where the mask is 0, then the discounted sum (all positions)."""
    calls["get_cumulative_returns"] += 1
    if action_mask is not None:
        rewards = action_mask * rewards
    out = F.reinforce_pp_returns(rewards, torch.ones_like(rewards, dtype=torch.bool), gamma=gamma)
    return out.to(rewards.dtype)


_FUNCS = {"log_probs_from_logits": log_probs_from_logits, "compute_entropy": compute_entropy,
          "compute_approx_kl": compute_approx_kl}


def patch() -> None:
    """Swap OpenRLHF's functions and loss classes for the rf ones (idempotent). Needs openrlhf.models.utils and
    openrlhf.models.loss importable; the experience maker is patched when it is importable too."""
    if _patcher.active:
        unpatch()
    utils = require("openrlhf.models.utils", _PIP)
    loss = require("openrlhf.models.loss", _PIP)
    swaps = {}
    for name, fn in _FUNCS.items():
        orig = getattr(utils, name)
        swaps[id(orig)] = (orig, fn)
    for name, make in (("PolicyLoss", _policy_loss_class), ("ValueLoss", _value_loss_class)):
        orig = getattr(loss, name)
        swaps[id(orig)] = (orig, make(orig))
    _patcher.swap(swaps)
    em = sys.modules.get("openrlhf.trainer.ppo_utils.experience_maker")
    if em is None:
        with contextlib.suppress(Exception):  # needs ray and the rest of the trainer stack
            import openrlhf.trainer.ppo_utils.experience_maker as em
    maker = getattr(em, "RemoteExperienceMaker", None) if em is not None else None
    if maker is not None:
        _patcher.set(maker, "get_advantages_and_returns", get_advantages_and_returns)
        _patcher.set(maker, "get_cumulative_returns", get_cumulative_returns)


def unpatch() -> None:
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
