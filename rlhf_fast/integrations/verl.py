"""verl (0.9.1) on rlhf_fast: advantage estimators and a policy loss selected by config, and the value/KL losses.

    from rlhf_fast.integrations import verl as rf_verl
    rf_verl.register()     # in the driver and in every worker process (e.g. in a ray runtime_env hook)
    # then: algorithm.adv_estimator=rf_gae|rf_grpo|rf_rloo|rf_reinforce_plus_plus
    #       actor_rollout_ref.actor.policy_loss.loss_mode=rf_vanilla|rf_gspo|rf_cispo

What register() does:
  - registers the advantage estimators ``rf_gae``, ``rf_grpo``, ``rf_rloo``, ``rf_reinforce_plus_plus`` and
    the policy losses ``rf_vanilla`` (PPO with verl's dual clip, ``clip_ratio_c`` default 3), ``rf_gspo`` and
    ``rf_cispo`` with verl's own signatures, config keys, ``rollout_is_weights`` and ``actor/*`` float
    metrics; the losses follow ``config.global_batch_info``
    (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) exactly as verl's agg_loss does;
  - wraps ``ray_trainer.compute_advantage`` so that ``rf_gae`` receives ``values``, ``gamma`` and ``lam``
    (verl passes them only to its own ``gae``), and ``need_critic`` so ``rf_gae`` starts a critic as ``gae`` does;
  - replaces ``compute_value_loss`` and ``kl_penalty`` in every loaded verl module holding them
    (core_algos and verl/workers/utils/losses.py).
unregister() restores all of it (the registry entries are removed).
Differences from verl: positions with response_mask = 0 are 0 in the rf_* advantages and returns (verl leaves
carried values there; no loss reads them); the advantages are fp32.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import functional as F
from . import Patcher, require

_patcher = Patcher("verl")
calls = _patcher.calls
ESTIMATORS = ("rf_gae", "rf_grpo", "rf_rloo", "rf_reinforce_plus_plus")
POLICY_LOSSES = ("rf_vanilla", "rf_gspo", "rf_cispo")


def _core():
    return require("verl.trainer.ppo.core_algos", "verl==0.9.1 --no-deps (plus ray omegaconf tensordict codetiming)")


def _cfg(config, key, default):
    if config is None:
        return default
    v = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if v is None else v


def _group_ids(index, device):
    """verl's ``index`` (numpy array of uids, or a tensor) -> int64 labels."""
    if isinstance(index, torch.Tensor):
        return index.to(device)
    _, inv = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inv, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------- advantage estimators
def compute_rf_gae(token_level_rewards, response_mask, config=None, index=None, values=None, gamma=None, lam=None,
                   **kwargs):
    """verl's ``gae`` on rf.gae: whitened advantages over the response mask, returns = A + V."""
    if values is None:
        raise ValueError("rf_gae needs values: call rlhf_fast.integrations.verl.register(), which makes "
                         "ray_trainer.compute_advantage pass them (and gamma, lam) as it does for 'gae'")
    calls["rf_gae"] += 1
    gamma = _cfg(config, "gamma", 1.0) if gamma is None else gamma
    lam = _cfg(config, "lam", 1.0) if lam is None else lam
    with torch.no_grad():
        adv, ret = F.gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam))
        adv = F.masked_whiten(adv, response_mask) * response_mask
    return adv, ret


def compute_rf_grpo(token_level_rewards, response_mask, index=None, epsilon=1e-6, norm_adv_by_std_in_grpo=None,
                    config=None, **kwargs):
    """verl's ``grpo``: (score - group mean) / (group std + epsilon), groups by uid (any sizes)."""
    calls["rf_grpo"] += 1
    norm = _cfg(config, "norm_adv_by_std_in_grpo", True) if norm_adv_by_std_in_grpo is None else norm_adv_by_std_in_grpo
    with torch.no_grad():
        scores = token_level_rewards.sum(-1)
        adv = F.grpo_advantages(scores, group_index=_group_ids(index, scores.device), normalize_std=bool(norm),
                                eps=float(epsilon))
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_rf_rloo(token_level_rewards, response_mask, index=None, epsilon=1e-6, config=None, **kwargs):
    """verl's ``rloo``: score minus the mean of the other scores of its uid group."""
    calls["rf_rloo"] += 1
    with torch.no_grad():
        scores = token_level_rewards.sum(-1)
        adv = F.rloo_advantages(scores, group_index=_group_ids(index, scores.device)).unsqueeze(-1) * response_mask
    return adv, adv


def compute_rf_reinforce_plus_plus(token_level_rewards, response_mask, config=None, **kwargs):
    """verl's ``reinforce_plus_plus``: discounted returns (masked tokens carried over), whitened."""
    calls["rf_reinforce_plus_plus"] += 1
    with torch.no_grad():
        returns = F.reinforce_pp_returns(token_level_rewards, response_mask, gamma=float(_cfg(config, "gamma", 1.0)))
        adv = F.masked_whiten(returns, response_mask) * response_mask
    return adv, returns


# ----------------------------------------------------------------------------- losses
def _agg_args(loss_agg_mode, T, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's agg_loss arguments -> (rf agg, rf normalisers, extra scalar factor)."""
    dp = float(dp_size or 1)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return "token-mean", {}, 1.0
        return "token-mean", {"num_tokens": batch_num_tokens / dp}, 1.0
    if loss_agg_mode == "token-sum":
        return "token-sum", {}, dp
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        kw = {}
        if global_batch_size is None:
            if dp > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
        else:
            kw["num_seqs"] = global_batch_size / dp
        f = 1.0
        if loss_agg_mode == "seq-mean-token-sum-norm" and loss_scale_factor is not None:
            f = T / float(loss_scale_factor)  # rf divides by T, verl by loss_scale_factor
        return loss_agg_mode, kw, f
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def _batch_info(config):
    info = _cfg(config, "global_batch_info", None)
    return dict(info) if info else {}


def _rf_policy_loss(name, loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights):
    """verl's policy-loss signature on rf.ppo_policy_loss(loss_type=...): clip_ratio(_low/_high), the
    global_batch_info normalisers of verl's agg_loss, rollout_is_weights as rf's weights, verl's metric names."""
    if config is None:
        raise ValueError(f"{name} needs the actor config (clip_ratio, clip_ratio_low/high, global_batch_info)")
    calls[name] += 1
    clip = config.clip_ratio
    lo = _cfg(config, "clip_ratio_low", clip)
    hi = _cfg(config, "clip_ratio_high", clip)
    c = None
    if loss_type == "ppo":  # verl's vanilla is dual-clip PPO
        c = _cfg(config, "clip_ratio_c", 3.0)
        if not c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {c}")
    agg, kw, f = _agg_args(loss_agg_mode, log_prob.shape[-1], **_batch_info(config))
    loss, st = F.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=lo, clip_high=hi,
                                 dual_clip=c, agg=agg, weights=rollout_is_weights, loss_type=loss_type, **kw)
    # gspo / cispo: dual_clipfrac is 0, verl's pg_clipfrac_lower for them
    metrics = {"actor/pg_clipfrac": st["clipfrac"].item(), "actor/ppo_kl": st["approx_kl"].item(),
               "actor/pg_clipfrac_lower": st["dual_clipfrac"].item()}
    return (loss if f == 1.0 else loss * f), metrics


def compute_policy_loss_rf_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                   config=None, rollout_is_weights=None):
    """verl's ``vanilla`` PPO policy loss (dual clip with ``clip_ratio_c``) on rf.ppo_policy_loss."""
    return _rf_policy_loss("rf_vanilla", "ppo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                           config, rollout_is_weights)


def compute_policy_loss_rf_gspo(old_log_prob, log_prob, advantages, response_mask,
                                loss_agg_mode="seq-mean-token-mean", config=None, rollout_is_weights=None):
    """verl's ``gspo`` (GSPO-token: sequence ratio, log-ratio clamped at 10) on rf.ppo_policy_loss(loss_type="gspo")."""
    return _rf_policy_loss("rf_gspo", "gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                           config, rollout_is_weights)


def compute_policy_loss_rf_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl's ``cispo`` (-sg(clip(r))·A·logp) on rf.ppo_policy_loss(loss_type="cispo")."""
    return _rf_policy_loss("rf_cispo", "cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                           config, rollout_is_weights)


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                       dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's ``compute_value_loss`` (argument order vpreds, returns, values) on rf.ppo_value_loss."""
    calls["compute_value_loss"] += 1
    agg, kw, f = _agg_args(loss_agg_mode, vpreds.shape[-1], dp_size, batch_num_tokens, global_batch_size,
                           loss_scale_factor)
    loss, st = F.ppo_value_loss(vpreds, values, returns, response_mask, clip=cliprange_value, agg=agg, **kw)
    return (loss if f == 1.0 else loss * f), st["vf_clipfrac"]


_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's ``kl_penalty``: k1 / abs / k2 / k3 (k3 bounded to ±10 as verl's low_var_kl), "+" = k2's gradient."""
    calls["kl_penalty"] += 1
    plus = kl_penalty.endswith("+")
    name = kl_penalty[:-1] if plus else kl_penalty
    if name == "full":
        raise NotImplementedError("kl_penalty='full' needs the full distributions (verl raises too)")
    if name not in _KL_NAMES:
        raise NotImplementedError(f"unknown kl_penalty {kl_penalty!r}")
    est = _KL_NAMES[name]
    clamp = 10.0 if est == "k3" else None
    if not plus or est == "k2":
        return F.kl(logprob, ref_logprob, estimator=est, clamp=clamp)
    # straight-through with verl's order: the bound applies to the value only, the gradient is k2's everywhere
    value = F.kl(logprob.detach(), ref_logprob.detach(), estimator=est, clamp=clamp)
    k2 = F.kl(logprob, ref_logprob, estimator="k2")
    return k2 - k2.detach() + value


# ----------------------------------------------------------------------------- registration
_ESTIMATOR_FNS = {"rf_gae": compute_rf_gae, "rf_grpo": compute_rf_grpo, "rf_rloo": compute_rf_rloo,
                  "rf_reinforce_plus_plus": compute_rf_reinforce_plus_plus}
_POLICY_FNS = {"rf_vanilla": compute_policy_loss_rf_vanilla, "rf_gspo": compute_policy_loss_rf_gspo,
               "rf_cispo": compute_policy_loss_rf_cispo}
_registered: list[tuple[dict, str]] = []


def _wrap_compute_advantage(original):
    def compute_advantage(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1, norm_adv_by_std_in_grpo=True,
                          config=None):
        if adv_estimator != "rf_gae":
            return original(data, adv_estimator, gamma=gamma, lam=lam, num_repeat=num_repeat,
                            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)
        if "response_mask" not in data.batch.keys():
            from verl.trainer.ppo.ray_trainer import compute_response_mask
            data.batch["response_mask"] = compute_response_mask(data)
        adv, ret = compute_rf_gae(data.batch["token_level_rewards"], data.batch["response_mask"], config=config,
                                  values=data.batch["values"], gamma=gamma, lam=lam)
        data.batch["advantages"] = adv
        data.batch["returns"] = ret
        if config is not None and config.get("use_pf_ppo", False):
            core = _core()
            data = core.compute_pf_ppo_reweight_data(data, config.pf_ppo.get("reweight_method"),
                                                     config.pf_ppo.get("weight_pow"))
        return data

    compute_advantage.__wrapped__ = original
    return compute_advantage


def _wrap_need_critic(original):
    def need_critic(config):
        if config.critic.enable is None and config.algorithm.adv_estimator == "rf_gae":
            return True
        return original(config)

    need_critic.__wrapped__ = original
    return need_critic


def register() -> None:
    """Register the rf estimators and policy loss and patch verl's dispatch / value and KL losses (idempotent)."""
    core = _core()
    if _patcher.active or _registered:
        unregister()
    for name, fn in _ESTIMATOR_FNS.items():
        core.register_adv_est(name)(fn)
        _registered.append((core.ADV_ESTIMATOR_REGISTRY, name))
    for name, fn in _POLICY_FNS.items():
        core.register_policy_loss(name)(fn)
        _registered.append((core.POLICY_LOSS_REGISTRY, name))
    for optional in ("verl.workers.utils.losses", "verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.utils"):
        try:  # load the modules that hold references, so the swap below reaches them
            __import__(optional)
        except Exception:  # noqa: BLE001  (a worker without ray / the trainer stack still gets core_algos)
            pass
    swaps = {id(core.compute_value_loss): (core.compute_value_loss, compute_value_loss),
             id(core.kl_penalty): (core.kl_penalty, kl_penalty)}
    import sys
    rt = sys.modules.get("verl.trainer.ppo.ray_trainer")
    if rt is not None:
        swaps[id(rt.compute_advantage)] = (rt.compute_advantage, _wrap_compute_advantage(rt.compute_advantage))
    ut = sys.modules.get("verl.trainer.ppo.utils")
    if ut is not None and hasattr(ut, "need_critic"):
        swaps[id(ut.need_critic)] = (ut.need_critic, _wrap_need_critic(ut.need_critic))
    _patcher.swap(swaps)


def unregister() -> None:
    """Undo register(): registry entries removed, every swapped function restored."""
    for registry, name in _registered:
        registry.pop(name, None)
    _registered.clear()
    _patcher.restore()


def is_registered() -> bool:
    return bool(_registered)
