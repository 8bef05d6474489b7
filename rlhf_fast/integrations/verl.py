"""verl (0.9.1) on rlhf_fast: advantage estimators and a policy loss selected by config, and the value/KL losses.

    from rlhf_fast.integrations import verl as rf_verl
    rf_verl.register()     # in the driver and in every worker process (e.g. in a ray runtime_env hook)
    # then: algorithm.adv_estimator=rf_gae|rf_grpo|rf_rloo|rf_reinforce_plus_plus
    #       actor_rollout_ref.actor.policy_loss.loss_mode=rf_vanilla

What register() does:
  - registers the advantage estimators ``rf_gae``, ``rf_grpo``, ``rf_rloo``, ``rf_reinforce_plus_plus`` and
    the policy loss ``rf_vanilla`` (PPO with verl's dual clip, ``clip_ratio_c`` default 3) with verl's own
    signatures, config keys and ``actor/*`` float metrics; the loss follows ``config.global_batch_info``
    (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) exactly as verl's agg_loss does;
  - wraps ``ray_trainer.compute_advantage`` so that ``rf_gae`` receives ``values``, ``gamma`` and ``lam``
    (verl passes them only to its own ``gae``), and ``need_critic`` so ``rf_gae`` starts a critic as ``gae`` does;
  - replaces ``compute_value_loss`` and ``kl_penalty`` in every loaded verl module holding them
    (core_algos and verl/workers/utils/losses.py).
  - the hot path, with no config change (docs/verl.md has the table and measurements): in every loaded verl
    module holding them, ``logprobs_from_logits``, ``entropy_from_logits(_with_chunking)``, the torch backend of
    ``FusedLinearForPPO``, ``linear_cross_entropy`` (with ``dist_process_group``) and Megatron's
    ``vocab_parallel_entropy(_with_chunking)`` / ``vocab_parallel_log_probs_from_logits`` (TP group from
    ``parallel_state``) run on rf's row kernels, with verl's signatures, output dtypes and shapes; and the FSDP /
    Megatron engine methods that ask for entropy and then log-probs of the same logits get both from one rf
    pass (Megatron: without its clone of the logits). A module register() cannot import stays verl's, with a
    RuntimeWarning naming it.
unregister() restores all of it (the registry entries are removed), also in verl modules imported after
register().
Differences from verl: positions with response_mask = 0 are 0 in the rf_* advantages and returns (verl leaves
carried values there; no loss reads them); the advantages are fp32.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from contextlib import contextmanager

import numpy as np
import torch

from .. import functional as F
from . import Patcher, require

_patcher = Patcher("verl")
calls = _patcher.calls
ESTIMATORS = ("rf_gae", "rf_grpo", "rf_rloo", "rf_reinforce_plus_plus")
POLICY_LOSSES = ("rf_vanilla",)


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


def compute_policy_loss_rf_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                   config=None, rollout_is_weights=None):
    """verl's ``vanilla`` PPO policy loss (dual clip with ``clip_ratio_c``) on rf.ppo_policy_loss."""
    if config is None:
        raise ValueError("rf_vanilla needs the actor config (clip_ratio, clip_ratio_c, global_batch_info)")
    calls["rf_vanilla"] += 1
    clip = config.clip_ratio
    lo = _cfg(config, "clip_ratio_low", clip)
    hi = _cfg(config, "clip_ratio_high", clip)
    c = _cfg(config, "clip_ratio_c", 3.0)
    if not c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {c}")
    agg, kw, f = _agg_args(loss_agg_mode, log_prob.shape[-1], **_batch_info(config))
    loss, st = F.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=lo, clip_high=hi,
                                 dual_clip=c, agg=agg, weights=rollout_is_weights, **kw)
    metrics = {"actor/pg_clipfrac": st["clipfrac"].item(), "actor/ppo_kl": st["approx_kl"].item(),
               "actor/pg_clipfrac_lower": st["dual_clipfrac"].item()}
    return (loss if f == 1.0 else loss * f), metrics


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


# ----------------------------------------------------------------------------- hot path: the [N, V] passes
# verl's log-prob / entropy functions on rf's fused row kernels. Each keeps verl's signature, output dtype and
# output shape; none writes into its input (verl's Megatron log-prob function did; nothing read it after).
def _rows(logits, labels, return_entropy, process_group=None):
    """rf.logprobs over logits [..., V(l)]; the TP group is passed only when there is one."""
    tp = {} if process_group is None else {"process_group": process_group}
    return F.logprobs(logits, labels, return_entropy=return_entropy, **tp)


def _zero_labels(logits):
    """entropy only: any valid label (0) for rf.logprobs; an ignored label would zero the entropy too."""
    return torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)


class _Fused:
    """One engine step that asks for entropy and log-probs of the same logits (see _fusing)."""

    def __init__(self, labels, entropy_from_logprobs=False):
        self.labels = labels                    # what the engine will ask log-probs of
        self.entropy_from_logprobs = entropy_from_logprobs  # Megatron: the log-prob call also yields entropy
        self.logits = self.version = self.logp = self.entropy = None


_local = threading.local()


@contextmanager
def _fusing(labels, entropy_from_logprobs=False):
    """While an engine method runs: the first rf pass over its logits computes log-probs and entropy together
    (one forward, one backward), the second call takes its result instead of reading [N, V] again."""
    prev = getattr(_local, "fused", None)
    _local.fused = f = _Fused(labels, entropy_from_logprobs)
    try:
        yield f
    finally:
        _local.fused = prev


def _entropy_fused(logits, process_group=None):
    """Entropy of logits; inside an FSDP step also the log-probs of the step's labels, kept for the next call."""
    f = getattr(_local, "fused", None)
    if (f is None or f.entropy_from_logprobs or f.logp is not None or f.labels.shape != logits.shape[:-1]
            or f.labels.device != logits.device):
        return _rows(logits, _zero_labels(logits), True, process_group)[1]
    calls["fused_entropy_logprobs"] += 1
    f.logp, ent = _rows(logits, f.labels, True, process_group)
    f.logits, f.version = logits, logits._version
    return ent


def _logprobs_fused(logits, labels, process_group=None):
    """Log-probs of labels; the ones _entropy_fused kept if they are of these very logits (unchanged since)."""
    f = getattr(_local, "fused", None)
    if f is not None and f.logp is not None and logits is f.logits and labels is f.labels \
            and logits._version == f.version:
        logp, f.logp, f.logits = f.logp, None, None
        return logp
    if f is not None and f.entropy_from_logprobs and labels is f.labels and f.entropy is None:
        logp, f.entropy = _rows(logits, labels, True, process_group)
        return logp
    return _rows(logits, labels, False, process_group)


def _flash_ce_in_use():
    """Whether verl's own logprobs_from_logits would take flash-attn's cross entropy (fp32 output)."""
    tf = sys.modules.get("verl.utils.torch_functional")
    return bool(getattr(tf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)) and \
        os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"


@torch.compiler.disable  # verl may torch.compile these; the fused step keeps state between two calls
def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits`` on rf.logprobs: logits [..., V], labels [...] -> [...].

    Output dtype as verl's: fp32 where verl would use flash-attn's cross entropy, else the logits' dtype.
    ``inplace_backward`` is accepted and has no effect: rf never writes into the logits.
    """
    calls["logprobs_from_logits"] += 1
    logp = _logprobs_fused(logits, labels)
    return logp.to(torch.float32 if _flash_ce_in_use() else logits.dtype)


@torch.compiler.disable
def entropy_from_logits(logits):
    """verl's ``entropy_from_logits`` on rf's row kernel (no [N, V] softmax): logits [..., V] -> [...],
    in the logits' dtype."""
    calls["entropy_from_logits"] += 1
    return _entropy_fused(logits).to(logits.dtype)


@torch.compiler.disable
def entropy_from_logits_with_chunking(logits, chunk_size=2048):
    """verl's ``entropy_from_logits_with_chunking``: [N, V] -> [N] in the default dtype (fp32), as verl's.
    rf never holds a [chunk, V] softmax, so ``chunk_size`` has no effect."""
    calls["entropy_from_logits_with_chunking"] += 1
    return _entropy_fused(logits).to(torch.get_default_dtype())


# --- the fused linear paths: hidden states and the lm_head, logits never materialised
def _ExperimentalFusedLinear():
    return require("verl.utils.experimental.torch_functional", "verl==0.9.1 --no-deps").FusedLinearForPPO


def _make_fused_linear_for_ppo(base):
    class FusedLinearForPPO(base):
        """verl's ``FusedLinearForPPO`` whose "torch" backend runs rf.linear_logprobs (the "liger" backend stays
        verl's): hidden [B, T, H] or [N, H], vocab_weights [V, H], input_ids [B, T] or [N] -> log_probs fp32,
        entropy in the logits' dtype, as verl's. ``chunk_size`` has no effect (rf picks its own chunks)."""

        def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
            if self.impl_backend != "torch" and sys.modules[base.__module__]._LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY \
                    is not None:
                calls["FusedLinearForPPO(verl liger)"] += 1
                return super().forward(hidden_states, vocab_weights, input_ids, temperature)
            calls["FusedLinearForPPO"] += 1
            if hidden_states.ndim not in (2, 3):
                raise ValueError(f"hidden_states must be [N, H] or [B, T, H], got {tuple(hidden_states.shape)}")
            shape = input_ids.shape
            h = hidden_states.reshape(-1, hidden_states.shape[-1])
            logp, ent = F.linear_logprobs(h, vocab_weights, input_ids.reshape(-1).long(), temperature=temperature,
                                          return_entropy=True)
            out_dtype = torch.result_type(hidden_states, vocab_weights)
            return logp.float().reshape(shape), ent.to(out_dtype).reshape(shape)

    FusedLinearForPPO.__qualname__ = base.__qualname__
    FusedLinearForPPO.__module__ = __name__
    FusedLinearForPPO.__wrapped__ = base
    return FusedLinearForPPO


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl's ``linear_cross_entropy`` (verl.utils.kernel) on rf.linear_logprobs; any device, any H.

    hidden [..., H], weight [V(l), H], labels [...] global ids -> (log_probs, entropy), both fp32 [N] flat as
    verl's (``reduction`` "sum" / "mean" reduce the log-probs to a scalar). Under ``dist_process_group`` rank r
    holds weight rows [r·Vl, (r+1)·Vl), the outputs are the full-vocabulary values, and the gradient of
    ``hidden`` is this rank's partial, as verl's kernel returns it (rf's ``reduce_hidden_grad=False``).
    """
    calls["linear_cross_entropy"] += 1
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    tp = {}
    if dist_process_group is not None and torch.distributed.get_world_size(dist_process_group) > 1:
        tp = {"process_group": dist_process_group, "reduce_hidden_grad": False}
    logp, ent = F.linear_logprobs(h, weight, labels.reshape(-1).long(), temperature=float(temperature),
                                  return_entropy=True, **tp)
    logp, ent = logp.float(), ent.float()
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, ent


# --- Megatron: vocabulary-sharded logits, the TP group from megatron's parallel_state
def _tp_group():
    """Megatron's tensor-parallel group, or None when there is no TP (size 1)."""
    from megatron.core import parallel_state as mpu
    if mpu.get_tensor_model_parallel_world_size() == 1:
        return None
    return mpu.get_tensor_model_parallel_group()


@torch.compiler.disable
def vocab_parallel_entropy(vocab_parallel_logits):
    """verl's ``vocab_parallel_entropy``: logits [..., V/tp] (this rank's vocabulary shard) -> entropy [...] of
    the full distribution, in the logits' dtype; the input is left untouched (also in the backward)."""
    calls["vocab_parallel_entropy"] += 1
    return _entropy_fused(vocab_parallel_logits, _tp_group()).to(vocab_parallel_logits.dtype)


@torch.compiler.disable
def vocab_parallel_entropy_with_chunking(vocab_parallel_logits, chunk_size=2048):
    """verl's ``vocab_parallel_entropy_with_chunking``: [..., V/tp] -> [...] in the default dtype (fp32).
    ``chunk_size`` has no effect (rf holds no [chunk, V] tensor)."""
    calls["vocab_parallel_entropy_with_chunking"] += 1
    return _entropy_fused(vocab_parallel_logits, _tp_group()).to(torch.get_default_dtype())


@torch.compiler.disable
def vocab_parallel_log_probs_from_logits(logits, labels):
    """verl's ``vocab_parallel_log_probs_from_logits``: logits [..., V/tp], labels [...] global ids -> fp32
    [...] log-probs of the full distribution. Unlike Megatron's cross entropy it leaves the logits untouched."""
    calls["vocab_parallel_log_probs_from_logits"] += 1
    return _logprobs_fused(logits, labels, _tp_group()).float()


# --- the engines: one pass where verl asks for entropy and then log-probs of the same logits
def _wrap_fsdp_prepare_model_outputs(original, rf_entropy_fns):
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        """FSDP engine: the labels of the step are known before the entropy call, so the entropy call computes
        the log-probs too (one forward and one backward over [N, V] instead of two each)."""
        labels = output_args.get("input_ids_rmpad_rolled") if hasattr(output_args, "get") else None
        if labels is None or getattr(self.engine_config, "entropy_checkpointing", False):
            return original(self, output, output_args, micro_batch, logits_processor_func)
        fn = getattr(self, "compute_entropy_from_logits", None)
        fn = getattr(fn, "_torchdynamo_orig_callable", fn)
        if fn in rf_entropy_fns:  # an engine built before register() holds verl's own: give it rf's
            _patcher.set(self, "compute_entropy_from_logits", rf_entropy_fns[fn])
        with _fusing(labels):
            return original(self, output, output_args, micro_batch, logits_processor_func)

    prepare_model_outputs.__wrapped__ = original
    return prepare_model_outputs


def _wrap_megatron_lm_head_logits_processor(original):
    def _lm_head_logits_processor(self, logits, label, temperature, **kw):
        """Megatron engine: with entropy asked for (and no distillation), run verl's method without it, which
        skips its clone of the logits, and take the entropy from the one rf pass that computes the log-probs."""
        if not kw.get("calculate_entropy") or kw.get("distillation_use_topk") or kw.get("distillation_only"):
            return original(self, logits, label, temperature, **kw)
        calls["megatron_fused_entropy_logprobs"] += 1
        with _fusing(label, entropy_from_logprobs=True) as f:
            ret = original(self, logits, label, temperature, **{**kw, "calculate_entropy": False})
        if f.entropy is None:
            raise RuntimeError("rlhf_fast: Megatron's log-prob call did not run rf's vocab_parallel_log_probs_from_"
                               "logits; call rlhf_fast.integrations.verl.register() after importing the engine")
        chunked = getattr(self.engine_config, "entropy_from_logits_with_chunking", False)
        entropy = f.entropy.to(torch.get_default_dtype() if chunked else logits.dtype)
        out = {k: ret.pop(k) for k in ("sum_pi_squared",) if k in ret}
        out["entropy"] = entropy
        out.update(ret)
        return out

    _lm_head_logits_processor.__wrapped__ = original
    return _lm_head_logits_processor


_HOT_SOURCES = {  # module -> the names register() replaces there (and wherever else verl holds them)
    "verl.utils.torch_functional": ("logprobs_from_logits", "entropy_from_logits",
                                    "entropy_from_logits_with_chunking"),
    "verl.utils.experimental.torch_functional": ("FusedLinearForPPO",),
    "verl.utils.kernel.linear_cross_entropy": ("linear_cross_entropy",),
    "verl.utils.megatron.tensor_parallel": ("vocab_parallel_entropy", "vocab_parallel_entropy_with_chunking",
                                            "vocab_parallel_log_probs_from_logits"),
}
_ENGINES = {  # module -> (class, method, wrapper factory)
    "verl.workers.engine.fsdp.transformer_impl": ("FSDPEngineWithLMHead", "prepare_model_outputs"),
    "verl.workers.engine.megatron.transformer_impl": ("MegatronEngineWithLMHead", "_lm_head_logits_processor"),
}
skipped: dict[str, str] = {}  # module -> why register() could not patch it (import error)


def _hot_swaps():
    """id(verl's object) -> (verl's, rf's) for every hot-path module that imports here; engine method patches."""
    swaps, engine_patches = {}, []
    for mod_name, names in _HOT_SOURCES.items():
        try:
            mod = __import__(mod_name, fromlist=["_"])
        except Exception as e:  # noqa: BLE001  (megatron or a GPU-only dependency missing on this worker)
            skipped[mod_name] = f"{type(e).__name__}: {e}"
            continue
        for name in names:
            orig = getattr(mod, name)
            rf = _make_fused_linear_for_ppo(orig) if name == "FusedLinearForPPO" else globals()[name]
            swaps[id(orig)] = (orig, rf)
    rf_entropy = {o: r for o, r in swaps.values() if r in (entropy_from_logits, entropy_from_logits_with_chunking)}
    for mod_name, (cls_name, meth) in _ENGINES.items():
        try:
            cls = getattr(__import__(mod_name, fromlist=["_"]), cls_name)
        except Exception as e:  # noqa: BLE001
            skipped[mod_name] = f"{type(e).__name__}: {e}"
            continue
        orig = cls.__dict__[meth]
        wrapped = (_wrap_fsdp_prepare_model_outputs(orig, rf_entropy) if meth == "prepare_model_outputs"
                   else _wrap_megatron_lm_head_logits_processor(orig))
        engine_patches.append((cls, meth, wrapped))
    return swaps, engine_patches


# ----------------------------------------------------------------------------- registration
_ESTIMATOR_FNS = {"rf_gae": compute_rf_gae, "rf_grpo": compute_rf_grpo, "rf_rloo": compute_rf_rloo,
                  "rf_reinforce_plus_plus": compute_rf_reinforce_plus_plus}
_POLICY_FNS = {"rf_vanilla": compute_policy_loss_rf_vanilla}
_registered: list[tuple[dict, str]] = []
_replaced: dict[int, tuple[object, object]] = {}  # id(rf's object) -> (rf's, verl's), for unregister()


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
    """Register the rf estimators and policy loss; patch verl's dispatch, value and KL losses, and its hot path
    (log-probs, entropy, the fused linear kernels, Megatron's vocab_parallel_*, the engines' double pass).
    Idempotent. Warns when a hot-path module cannot be imported here (its functions stay verl's)."""
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
    rt = sys.modules.get("verl.trainer.ppo.ray_trainer")
    if rt is not None:
        swaps[id(rt.compute_advantage)] = (rt.compute_advantage, _wrap_compute_advantage(rt.compute_advantage))
    ut = sys.modules.get("verl.trainer.ppo.utils")
    if ut is not None and hasattr(ut, "need_critic"):
        swaps[id(ut.need_critic)] = (ut.need_critic, _wrap_need_critic(ut.need_critic))
    skipped.clear()
    hot, engine_patches = _hot_swaps()
    swaps.update(hot)
    _replaced.update({id(new): (new, orig) for orig, new in swaps.values()})
    _patcher.swap(swaps)
    for cls, meth, wrapped in engine_patches:
        _patcher.set(cls, meth, wrapped)
    if skipped:
        warnings.warn("rlhf_fast.integrations.verl.register(): these verl modules could not be imported, so their "
                      "functions stay verl's (also in modules imported later); import them and call register() "
                      "again: " + "; ".join(f"{m} ({why})" for m, why in skipped.items()), RuntimeWarning,
                      stacklevel=2)


def unregister() -> None:
    """Undo register(): registry entries removed, every swapped function restored, also in verl modules imported
    after register() (they picked up rf's functions from the patched modules)."""
    for registry, name in _registered:
        registry.pop(name, None)
    _registered.clear()
    _patcher.restore()
    late = Patcher("verl")
    late.swap(dict(_replaced))  # rf object -> verl's, wherever a module still holds rf's
    _replaced.clear()


def is_registered() -> bool:
    return bool(_registered)
