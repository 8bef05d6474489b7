"""The public ops: shapes and dtypes documented here once, inputs checked here, backend chosen by
``rlhf_fast._backend.select`` (``backend=`` picks one explicitly: "reference", "cpu", "cuda", "triton").

Every op is differentiable in its floating inputs; every backend is checked against
``rlhf_fast.reference``.

Output dtype, one rule for every op and backend: math runs in fp32, or fp64 when a floating input is
fp64, and every floating output (values, losses, statistics) is in that math dtype (fp32 for fp16/bf16
inputs). Gradients come back in the dtype of the input they belong to.

Aggregations (``agg=``) of the loss ops, with m the mask and w the optional per-token ``weights``:
  token-mean               Σ w·ℓ·m / N, N = ``num_tokens`` (default Σ m, the local count)
  token-sum                Σ w·ℓ·m
  seq-mean-token-sum       Σ_rows Σ_t w·ℓ·m / S, S = ``num_seqs`` (default: rows with a token)
  seq-mean-token-sum-norm  seq-mean-token-sum / T (T = the padded length, Dr. GRPO)
  seq-mean-token-mean      Σ_rows (Σ_t w·ℓ·m / Σ_t m) / S
Under data parallelism pass the global counts as ``num_tokens`` / ``num_seqs`` (divided by the number
of ranks if the gradients are averaged over ranks). The statistics (clip fractions, approx_kl) stay
local token means over the mask, unweighted.
"""
from __future__ import annotations

import torch

from . import _checks as check
from . import _vocab_parallel as _vp
from . import reference as ref
from ._backend import _registry, current_override, register, select
from ._layout import logits_rows

KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
# the backends reduce with these three modes and the local counts; the others are a scalar factor away
_TOKEN_AGG = ("token-mean", "token-sum")  # the modes that do not see sequences (packed input needs no padding)
_BACKEND_AGG = {"token-mean": "token-mean", "token-sum": "token-mean", "seq-mean-token-sum": "seq-mean-token-sum",
                "seq-mean-token-sum-norm": "seq-mean-token-sum", "seq-mean-token-mean": "seq-mean-token-mean"}

# The reference implements every op; other backends register themselves on import.
for _name in ("logprobs", "linear_logprobs", "kl", "gae", "reinforce_pp_returns", "grpo_advantages",
              "rloo_advantages", "kl_penalized_rewards", "ppo_policy_loss", "ppo_value_loss",
              "ppo_loss_from_logits"):
    register(_name, "reference")(getattr(ref, _name))


def _flat_logits(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> a [B, T, V] view of the same memory: every logits backend takes any leading strides
    (``logits[:, :-1]`` is not copied); copies only a strided vocabulary (see rlhf_fast._layout)."""
    return logits_rows(logits)


def _check_logits_labels(logits, labels, temperature):
    check.floating("logits", logits)
    check.integer("labels", labels)
    check.same_device("logits", logits, labels=labels)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    check.positive("temperature", temperature)


def _tp_shard(process_group, vocab_start, V_local, labels, ignore_index, device):
    """None without tensor parallelism, else this rank's _vocab_parallel.Shard (checked; see that module)."""
    if process_group is None:
        if vocab_start is not None:
            raise ValueError(f"vocab_start={vocab_start!r} needs a process_group (the tensor-parallel group)")
        return None
    return _vp.shard(process_group, vocab_start, V_local, labels, ignore_index, device)


def _backend_name(op, impl):
    return next(b for b, f in _registry[op].items() if f is impl)


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, process_group=None,
             vocab_start=None, backend=None):
    """Log-probability of each label under softmax(logits / T), and optionally the entropy.

    logits [..., V] fp16/bf16/fp32/fp64, labels [...] integer in [0, V) or ``ignore_index``.
    Returns logp [...] fp32 (fp64 for fp64 logits), and entropy [...] if ``return_entropy``.
    Ignored positions give 0 and pass 0 gradient. Never materialises log_softmax on the fused
    backends: they keep one logsumexp per row for the backward.

    Tensor parallel (docs/tensor_parallel.md): with ``process_group``, logits [..., V_r] are this rank's
    columns [vocab_start, vocab_start + V_r) of the vocabulary (default vocab_start = rank·V_r), labels are
    global ids, the same on every rank; logp and entropy are the full-vocabulary values, the same bits on
    every rank; the gradient is this rank's slice of the unsharded one (no communication in the backward).
    """
    _check_logits_labels(logits, labels, temperature)
    V = logits.shape[-1]
    impl = select("logprobs", logits.device, backend)
    x = _flat_logits(logits)
    sh = _tp_shard(process_group, vocab_start, V, labels, ignore_index, logits.device)
    if sh is not None:
        out = _vp.logprobs(x, labels.reshape(-1).long(), sh, _backend_name("logprobs", impl), temperature,
                           ignore_index)
        logp, ent = out[0].reshape(labels.shape), out[1].reshape(labels.shape)
        return (logp, ent) if return_entropy else logp
    check.labels_in_range(labels, V, ignore_index)
    out = impl(x, labels.reshape(x.shape[:-1]).long(), temperature, ignore_index, return_entropy)
    if return_entropy:
        return out[0].reshape(labels.shape), out[1].reshape(labels.shape)
    return out.reshape(labels.shape)


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, process_group=None, vocab_start=None, reduce_hidden_grad=True,
                    backend=None):
    """logprobs(hidden @ weight.T + bias, labels) from the last hidden states and the lm_head.

    hidden [N, H], weight [V, H], bias [V] or None, labels [N]; returns logp [N] fp32 (and entropy).

    Tensor parallel: with ``process_group``, weight [V_r, H] (and bias [V_r]) are this rank's rows
    [vocab_start, vocab_start + V_r) of the lm_head, hidden the full [N, H] on every rank (as logprobs).
    ``reduce_hidden_grad=True``: grad hidden is the full gradient, all-reduced over the group in the
    backward (the input gradient of a column-parallel layer). ``False``: this rank's partial (its shard's
    logits only), for callers whose own backward sums the partials: Megatron's sequence-parallel gather
    (reduce-scatter), verl's fused ``linear_cross_entropy`` (its backward does no all-reduce), Apple CCE's
    ``reduce_e_grad=False``.
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        check.floating(name, t)
        check.ndim(name, t, 2)
    check.integer("labels", labels)
    check.same_device("hidden", hidden, weight=weight, labels=labels, bias=bias)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[1] = {hidden.shape[1]}, got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] with N = hidden.shape[0] = {hidden.shape[0]}, got {tuple(labels.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check.positive("temperature", temperature)
    _check_reduce_flag(reduce_hidden_grad)
    impl = select("linear_logprobs", hidden.device, backend)
    sh = _tp_shard(process_group, vocab_start, weight.shape[0], labels, ignore_index, hidden.device)
    if sh is not None:
        logp, ent = _vp.linear_logprobs(hidden, weight, labels.long(), bias, sh,
                                        _backend_name("linear_logprobs", impl), impl, temperature, ignore_index,
                                        reduce_hidden_grad)
        return (logp, ent) if return_entropy else logp
    check.labels_in_range(labels, weight.shape[0], ignore_index)
    return impl(hidden, weight, labels.long(), bias, temperature, ignore_index, return_entropy)


def _check_reduce_flag(reduce_hidden_grad):
    if not isinstance(reduce_hidden_grad, bool):
        raise ValueError(f"reduce_hidden_grad must be True or False, got {reduce_hidden_grad!r}")


def kl(logp, ref_logp, *, estimator="k3", clamp=None, old_logp=None, backend=None):
    """Per-token KL(π‖π_ref) estimate from the sampled tokens' log-probs; logp, ref_logp [...].

    "k1" logp - ref, "k2" ½(logp - ref)², "k3" exp(ref - logp) - (ref - logp) - 1, "abs" |logp - ref|;
    a "+" suffix ("k3+") keeps that value with k2's gradient (straight-through, unbiased gradient of KL).
    ``clamp=c`` bounds the output to [-c, c] (at exactly ±c the gradient passes; NaN stays NaN).
    ``old_logp`` [...] (the sampling policy's log-probs): multiply by the importance ratio exp(logp - old_logp), gradient through it, as TRL's GRPO does by
    default (``use_bias_correction_kl``) so that samples from π_old give the unbiased KL gradient.
    """
    check.floating("logp", logp)
    check.floating("ref_logp", ref_logp)
    check.same_shape("logp", logp, ref_logp=ref_logp, old_logp=old_logp)
    check.same_device("logp", logp, ref_logp=ref_logp, old_logp=old_logp)
    if old_logp is not None:
        check.floating("old_logp", old_logp)
    check.choice("estimator", estimator, KL_ESTIMATORS)
    if clamp is not None:
        check.positive("clamp", clamp)
    out = select("kl", logp.device, backend)(logp, ref_logp, estimator, clamp)
    return out if old_logp is None else out * ref.importance_ratio(logp, old_logp)


def _check_bt(ref_name, ref_t, **others):
    """Checks for [B, T] op inputs: same shape and device; masks may be any dtype."""
    check.same_shape(ref_name, ref_t, **others)
    check.same_device(ref_name, ref_t, **others)
    for name, t in others.items():
        if t is not None:
            (check.mask if name.endswith("mask") else check.floating)(name, t)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, cu_seqlens=None, max_seqlen=None, backend=None):
    """Generalised advantage estimation with masked positions skipped.

    rewards, values [B, T] float, mask [B, T] (nonzero = valid) -> advantages, returns [B, T].
    Over the valid positions of a row, δ_t = r_t + γ·V_next - V_t (V past the last = 0) and
    A_t = δ_t + γλ·A_next; masked positions get 0 and are stepped over (value and running advantage
    carry across them), so right padding, left padding and holes all work. Math in fp32 (fp64 for
    fp64 inputs), outputs in the math dtype (the module's dtype rule). Packed: rewards, values, mask
    [N] with cu_seqlens [S + 1] (see ``Packing``); no recursion crosses a sequence boundary.
    """
    if cu_seqlens is not None:
        p = Packing(cu_seqlens, rewards, max_seqlen)
        adv, ret = gae(p.pad(rewards), p.pad(values), p.pad(mask), gamma=gamma, lam=lam, backend=backend)
        return p.pack(adv), p.pack(ret)
    check.floating("rewards", rewards)
    check.ndim("rewards", rewards, 2)
    _check_bt("rewards", rewards, values=values, mask=mask)
    return select("gae", rewards.device, backend)(rewards, values, mask, gamma, lam)


def reinforce_pp_returns(rewards, mask, *, gamma=1.0, cu_seqlens=None, max_seqlen=None, backend=None):
    """Discounted returns G_t = r_t + γ·G_next over valid positions; rewards, mask [B, T] -> [B, T]
    (or [N] packed with cu_seqlens)."""
    if cu_seqlens is not None:
        p = Packing(cu_seqlens, rewards, max_seqlen)
        return p.pack(reinforce_pp_returns(p.pad(rewards), p.pad(mask), gamma=gamma, backend=backend))
    check.floating("rewards", rewards)
    check.ndim("rewards", rewards, 2)
    _check_bt("rewards", rewards, mask=mask)
    return select("reinforce_pp_returns", rewards.device, backend)(rewards, mask, gamma)


def _check_groups(scores, group_size, minimum):
    check.floating("scores", scores)
    check.ndim("scores", scores, 1)
    if not isinstance(group_size, int) or group_size < minimum or scores.shape[0] % group_size:
        raise ValueError(f"group_size must be an int >= {minimum} dividing len(scores) = {scores.shape[0]}, "
                         f"got {group_size!r}")


def _check_group_index(scores, group_size, group_index, backend, op):
    check.floating("scores", scores)
    check.ndim("scores", scores, 1)
    check.tensor("group_index", group_index)
    if group_index.shape != scores.shape:
        raise ValueError(f"group_index must be [B] = [{scores.shape[0]}], got {tuple(group_index.shape)}")
    if group_size is not None:
        raise ValueError("pass group_size or group_index, not both")
    chosen = backend or current_override()
    if chosen not in (None, "reference"):
        raise NotImplementedError(f"{op}(group_index=...) has no {chosen!r} kernel: the uneven groups run as torch "
                                  f"index ops (backend='reference' or backend=None)")


def grpo_advantages(scores, group_size=None, *, normalize_std=True, eps=1e-6, group_index=None, backend=None):
    """GRPO advantages (s - group mean) / (group std + eps), std unbiased; scores [B] -> [B].

    Groups: consecutive blocks of ``group_size``, or ``group_index`` [B] (any integer labels, groups of
    any size, in any order; a group of one has no baseline: mean 0, std 1, as verl does). Uneven groups
    run as torch index ops (B scalars) on every device; ``backend`` other than "reference" raises then.
    TRL uses eps=1e-4, verl and OpenRLHF 1e-6 (as here) and 1e-9 in OpenRLHF's group_norm.
    """
    if group_index is not None:
        _check_group_index(scores, group_size, group_index, backend, "grpo_advantages")
        return ref.grpo_advantages(scores, None, normalize_std, float(eps), group_index)
    _check_groups(scores, group_size, 2 if normalize_std else 1)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return select("grpo_advantages", scores.device, backend)(scores, group_size, normalize_std, float(eps))


def rloo_advantages(scores, group_size=None, *, group_index=None, backend=None):
    """RLOO advantages s_i - mean of the other scores of its group; scores [B] -> [B].

    Groups as in ``grpo_advantages`` (a group of one keeps its score)."""
    if group_index is not None:
        _check_group_index(scores, group_size, group_index, backend, "rloo_advantages")
        return ref.rloo_advantages(scores, None, group_index)
    _check_groups(scores, group_size, 2)
    return select("rloo_advantages", scores.device, backend)(scores, group_size)


def kl_penalized_rewards(score, logp, ref_logp, mask, *, beta, estimator="k1", cu_seqlens=None, max_seqlen=None,
                         backend=None):
    """Per-token rewards: -β·kl(logp, ref_logp) on response tokens and ``score`` added on the last one.

    score [B], logp / ref_logp / mask [B, T] -> rewards [B, T]. "Last" is the last position with
    mask = 1 (as OpenRLHF and verl do; TRL puts it one past EOS). Rows without a valid token get 0.
    Packed: score [S], logp / ref_logp / mask [N] with cu_seqlens [S + 1] -> rewards [N].
    """
    if cu_seqlens is not None:
        p = Packing(cu_seqlens, logp, max_seqlen)
        return p.pack(kl_penalized_rewards(score, p.pad(logp), p.pad(ref_logp), p.pad(mask), beta=beta,
                                           estimator=estimator, backend=backend))
    check.floating("logp", logp)
    check.ndim("logp", logp, 2)
    _check_bt("logp", logp, ref_logp=ref_logp, mask=mask)
    check.floating("score", score)
    if score.shape != logp.shape[:1]:
        raise ValueError(f"score must be [B] = [{logp.shape[0]}], got {tuple(score.shape)}")
    check.choice("estimator", estimator, KL_ESTIMATORS)
    return select("kl_penalized_rewards", logp.device, backend)(score, logp, ref_logp, mask, beta, estimator)


def masked_mean(x, mask, dim=None):
    """Σ x·mask / Σ mask over ``dim`` (all dims if None); 0 where the mask is empty. x, mask same shape."""
    check.floating("x", x)
    check.mask("mask", mask)
    check.same_shape("x", x, mask=mask)
    return ref.masked_mean(x, mask, dim)


def masked_whiten(x, mask, shift_mean=True):
    """(x - μ)·rsqrt(var + 1e-8) with μ and the unbiased var over the masked elements of x.

    x, mask of one shape; ``shift_mean=False`` adds μ back. Needs at least two unmasked elements.
    """
    check.floating("x", x)
    check.mask("mask", mask)
    check.same_shape("x", x, mask=mask)
    check.at_least_two("mask", mask)
    return ref.masked_whiten(x, mask, shift_mean)


def _check_agg(agg, t, num_tokens=None, num_seqs=None):
    check.choice("agg", agg, AGG_MODES)
    if agg not in _TOKEN_AGG and t.dim() != 2:
        raise ValueError(f"agg={agg!r} needs [B, T] inputs, got shape {tuple(t.shape)}")
    if num_tokens is not None and agg != "token-mean":
        raise ValueError(f"num_tokens normalises agg='token-mean' only, got agg={agg!r}")
    if num_seqs is not None and not agg.startswith("seq-mean"):
        raise ValueError(f"num_seqs normalises the seq-mean aggregations only, got agg={agg!r}")
    for name, v in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if isinstance(v, (int, float)) and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")
        if v is not None and not isinstance(v, (int, float, torch.Tensor)):
            raise ValueError(f"{name} must be a number or a 0-d tensor, got {type(v).__name__}")


def aggregate(x, mask, agg="token-mean", *, num_tokens=None, num_seqs=None, weights=None):
    """Reduce a per-token value x [B, T] (any shape for the token modes) to a scalar, as the loss ops do.

    mask of x's shape (nonzero = valid; a float mask is a weight), weights of x's shape or None;
    ``agg`` and the global normalisers ``num_tokens`` / ``num_seqs`` as in the module docstring.
    Returns a 0-d tensor in the math dtype.
    """
    check.floating("x", x)
    check.mask("mask", mask)
    check.same_shape("x", x, mask=mask, weights=weights)
    check.same_device("x", x, mask=mask, weights=weights)
    _check_agg(agg, x, num_tokens, num_seqs)
    return ref.aggregate(ref._acc(x), mask, agg, num_tokens, num_seqs, weights)


def _count(v, like):
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return torch.where(t != 0, t, torch.ones_like(t))


def _agg_factor(mask, agg, num_tokens, num_seqs, dtype):
    """The scalar f with agg(ℓ) = f · backend_agg(ℓ), backend_agg = _BACKEND_AGG[agg] with local counts
    (None when f = 1). No host sync."""
    if agg in ("token-mean", "token-sum"):
        if agg == "token-mean" and num_tokens is None:
            return None
        local = mask.to(dtype).sum()
        local = torch.where(local != 0, local, torch.ones_like(local))
        return local if agg == "token-sum" else local / _count(num_tokens, local)
    f = None
    if num_seqs is not None:
        rows = (mask.to(dtype).sum(-1) != 0).to(dtype).sum()
        rows = torch.where(rows != 0, rows, torch.ones_like(rows))
        f = rows / _count(num_seqs, rows)
    if agg == "seq-mean-token-sum-norm":
        f = (1.0 if f is None else f) / mask.shape[-1]
    return f


def _token_coefficients(mask, agg, num_tokens, num_seqs, weights, dtype):
    """c with agg(ℓ; weights) = Σ c·ℓ: the weighted loss as Σ c·ℓ / Σ c (a token-mean with mask c) · Σ c."""
    m = mask.to(dtype)
    c = m * weights.to(dtype)
    if agg == "token-mean":
        return c / _count(m.sum() if num_tokens is None else num_tokens, m)
    if agg == "token-sum":
        return c
    n_tok = m.sum(-1, keepdim=True)
    rows = (n_tok != 0).to(dtype)
    c = c * rows / _count(rows.sum() if num_seqs is None else num_seqs, m)
    if agg == "seq-mean-token-mean":
        c = c / torch.where(n_tok != 0, n_tok, torch.ones_like(n_tok))
    return c / mask.shape[-1] if agg == "seq-mean-token-sum-norm" else c


def _check_weights(weights, like):
    check.floating("weights", weights)
    check.same_shape("logp", like, weights=weights)
    check.nonnegative("weights", weights)


def _row_advantages(advantages, logp):
    """Advantages [B, 1] (one per sequence) broadcast over the T tokens of logp [B, T]."""
    if logp.dim() == 2 and advantages.dim() == 2 and advantages.shape == (logp.shape[0], 1) and logp.shape[1] != 1:
        return advantages.expand_as(logp)
    return advantages


def _check_clip(name, v, allow_none=False):
    if v is None and allow_none:
        return
    if not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"{name} must be a number >= 0, got {v!r}")


def _weighted_loss(impl, first, args, mask, agg, num_tokens, num_seqs, weights):
    """Run a loss backend under ``agg`` with normalisers and weights, through the backends' three modes.

    Without weights: the backend's loss times a no-grad scalar. With weights: the loss from a token-mean
    run with mask c (the per-token coefficients), times Σ c, and the statistics from a second, no-grad
    run with the real mask (two passes of an elementwise kernel)."""
    dt = torch.float64 if any(t.dtype == torch.float64 for t in (first, *args[:2]) if t is not None) else torch.float32
    if weights is None:
        loss, stats = impl(first, *args[:2], mask, *args[2:], _BACKEND_AGG[agg])
        f = _agg_factor(mask, agg, num_tokens, num_seqs, loss.dtype)
        return (loss if f is None else loss * f), stats
    c = _token_coefficients(mask, agg, num_tokens, num_seqs, weights, dt)
    loss, _ = impl(first, *args[:2], c, *args[2:], "token-mean")
    with torch.no_grad():
        _, stats = impl(first.detach(), *(a.detach() for a in args[:2]), mask, *args[2:], "token-mean")
    return loss * c.sum(), stats


def ppo_policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", weights=None, num_tokens=None, num_seqs=None, cu_seqlens=None,
                    max_seqlen=None, backend=None):
    """PPO clipped policy loss. logp, old_logp, mask [B, T] (or any one shape for the token modes);
    advantages [B, T] or [B, 1] (one per sequence, broadcast over T); weights [B, T] >= 0 or None.

    Per token ℓ = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high)) with r = exp(clamp(logp - old_logp, ±20));
    clip_high defaults to clip_low (set it higher for "clip-higher"); dual_clip=c (> 1) caps tokens
    with A < 0 at -A·c. At the kinks (see rlhf_fast.reference): the clips pass their exact ends, a tie
    of the max / min keeps the unclipped branch; NaN in any input gives a NaN loss. ``weights``
    multiply ℓ (importance-sampling corrections, e.g. verl's rollout_is_weights). ``agg``,
    ``num_tokens``, ``num_seqs``: see the module docstring. Packed: [N] inputs with cu_seqlens [S + 1];
    agg per sequence, as the padded [S, T] call.
    Returns (loss scalar, stats: clipfrac, approx_kl, dual_clipfrac).
    """
    if cu_seqlens is not None:
        p = Packing(cu_seqlens, logp, max_seqlen)
        if agg not in _TOKEN_AGG:  # the token modes do not see the sequences
            return ppo_policy_loss(p.pad(logp), p.pad(old_logp), p.pad(advantages), p.pad(mask), clip_low=clip_low,
                                   clip_high=clip_high, dual_clip=dual_clip, agg=agg, weights=p.pad(weights),
                                   num_tokens=num_tokens, num_seqs=num_seqs, backend=backend)
    check.floating("logp", logp)
    advantages = _row_advantages(advantages, logp)
    _check_bt("logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
    _check_agg(agg, logp, num_tokens, num_seqs)
    _check_clip("clip_low", clip_low)
    _check_clip("clip_high", clip_high, allow_none=True)
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1):
        raise ValueError(f"dual_clip must be a number > 1, got {dual_clip!r}")
    if weights is not None:
        _check_weights(weights, logp)
    impl = select("ppo_policy_loss", logp.device, backend)
    return _weighted_loss(impl, logp, (old_logp, advantages, clip_low, clip_high, dual_clip), mask, agg,
                          num_tokens, num_seqs, weights)


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", weights=None, num_tokens=None,
                   num_seqs=None, cu_seqlens=None, max_seqlen=None, backend=None):
    """Clipped value loss ½·max((v - R)², (old_v + clip(v - old_v, ±clip) - R)²), aggregated.

    At |v - old_v| == clip exactly the clipped value is v (a tie): the unclipped loss takes the gradient.
    values, old_values, returns, mask [B, T] (or [N] packed with cu_seqlens [S + 1], agg per sequence);
    clip=None: plain ½(v - R)². ``weights``, ``agg``, ``num_tokens``, ``num_seqs`` as in
    ppo_policy_loss. Returns (loss, stats: vf_clipfrac).
    """
    if cu_seqlens is not None:
        p = Packing(cu_seqlens, values, max_seqlen)
        if agg not in _TOKEN_AGG:
            return ppo_value_loss(p.pad(values), p.pad(old_values), p.pad(returns), p.pad(mask), clip=clip, agg=agg,
                                  weights=p.pad(weights), num_tokens=num_tokens, num_seqs=num_seqs, backend=backend)
    check.floating("values", values)
    _check_bt("values", values, old_values=old_values, returns=returns, mask=mask)
    _check_agg(agg, values, num_tokens, num_seqs)
    _check_clip("clip", clip, allow_none=True)
    if weights is not None:
        _check_weights(weights, values)
    impl = select("ppo_value_loss", values.device, backend)
    return _weighted_loss(impl, values, (old_values, returns, clip), mask, agg, num_tokens, num_seqs, weights)


def pairwise_reward_loss(chosen_scores, rejected_scores, margin=None):
    """Bradley-Terry reward-model loss mean(-log σ(s_w - s_l - margin)); scores [B], margin float or [B]."""
    check.floating("chosen_scores", chosen_scores)
    check.floating("rejected_scores", rejected_scores)
    check.same_shape("chosen_scores", chosen_scores, rejected_scores=rejected_scores)
    check.same_device("chosen_scores", chosen_scores, rejected_scores=rejected_scores, margin=margin)
    if chosen_scores.numel() == 0:
        raise ValueError("pairwise_reward_loss needs at least one pair")
    return ref.pairwise_reward_loss(chosen_scores, rejected_scores, margin)


def ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, *, ref_logp=None, kl_coef=0.0,
                         kl_estimator="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=None,
                         dual_clip=None, agg="token-mean", weights=None, num_tokens=None, num_seqs=None,
                         cu_seqlens=None, max_seqlen=None, process_group=None, vocab_start=None, backend=None):
    """The PPO policy loss straight from the logits, with KL and entropy terms.

    logits [B, T, V], labels [B, T] (masked positions may hold anything in [0, V) or -100),
    old_logp, mask, ref_logp [B, T], advantages [B, T] or [B, 1].
    loss = pg_loss + kl_coef·agg(kl) - entropy_coef·agg(H); ``num_tokens`` / ``num_seqs`` normalise all
    three terms, ``weights`` multiply the policy term only (reference backend only for now: the fused
    kernels raise NotImplementedError).
    Returns (loss, stats: pg_loss, clipfrac, approx_kl, dual_clipfrac, entropy, kl if ref_logp given).
    Packed: logits [N, V] and [N] per-token inputs with cu_seqlens [S + 1]; a seq-mean agg scatters
    the logits to [S, T_max, V] (a copy: rf.linear_ppo_loss packs without one).
    Tensor parallel: ``process_group`` / ``vocab_start`` as in ``logprobs`` (logits [B, T, V_r] this rank's
    columns); the rows' logp and entropy are merged over the group, then the per-token terms run on [B, T]
    (any backend; ``weights`` work too), the same bits on every rank.
    """
    if cu_seqlens is not None:
        p = Packing(cu_seqlens, labels, max_seqlen)
        if agg not in _TOKEN_AGG:
            return ppo_loss_from_logits(
                p.pad(logits), p.pad(labels, -100), p.pad(old_logp), p.pad(advantages), p.pad(mask),
                ref_logp=p.pad(ref_logp), kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                temperature=temperature, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
                weights=p.pad(weights), num_tokens=num_tokens, num_seqs=num_seqs, process_group=process_group,
                vocab_start=vocab_start, backend=backend)
    _check_logits_labels(logits, labels, temperature)
    check.floating("old_logp", old_logp)
    advantages = _row_advantages(advantages, old_logp)
    _check_bt("old_logp", old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    if old_logp.shape != labels.shape:
        raise ValueError(f"old_logp must have the shape of labels {tuple(labels.shape)}, got {tuple(old_logp.shape)}")
    _check_agg(agg, old_logp, num_tokens, num_seqs)
    check.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if process_group is not None or vocab_start is not None:
        if weights is not None:
            _check_weights(weights, old_logp)
        logp, ent = logprobs(logits, labels, temperature=temperature, return_entropy=True,
                             process_group=process_group, vocab_start=vocab_start, backend=backend)
        return ref.ppo_loss_from_logprobs(logp, ent, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator,
                                          entropy_coef, clip_low, clip_high, dual_clip, agg, weights, num_tokens,
                                          num_seqs)
    check.labels_in_range(labels, logits.shape[-1], -100)
    impl = select("ppo_loss_from_logits", logits.device, backend)
    args = (logits, labels, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator, entropy_coef,
            temperature, clip_low, clip_high, dual_clip)
    if weights is not None:
        _check_weights(weights, old_logp)
        if impl is not ref.ppo_loss_from_logits:
            raise NotImplementedError("ppo_loss_from_logits(weights=...) runs on the 'reference' backend only; the "
                                      "fused kernels weight all three terms alike. Use rf.logprobs + "
                                      "rf.ppo_policy_loss(weights=...) or backend='reference'")
        return impl(*args, agg, weights, num_tokens, num_seqs)
    loss, stats = impl(*args, _BACKEND_AGG[agg])
    f = _agg_factor(mask, agg, num_tokens, num_seqs, loss.dtype)
    if f is None:
        return loss, stats
    for k in ("pg_loss", "entropy", "kl"):
        if k in stats:
            stats[k] = stats[k] * f
    return loss * f, stats


class Packing:
    """Packed sequences: a flat [N] token axis with sequence i at rows cu_seqlens[i]:cu_seqlens[i+1]
    (flash-attn varlen, verl remove-padding), mapped to padded [S, T] rows by index ops (differentiable).
    T = max_seqlen if given (no host sync), else the longest sequence (one sync)."""

    def __init__(self, cu_seqlens, like, max_seqlen=None):
        check.tensor("like", like)
        if like.dim() != 1:
            raise ValueError(f"packed per-token inputs (with cu_seqlens) must be [N], got shape {tuple(like.shape)}")
        n = like.shape[0]
        _check_cu_seqlens(cu_seqlens, n, like.device)
        self.seq, lens = ref.seq_ids(cu_seqlens, n)
        self.S = lens.shape[0]
        if max_seqlen is None:
            self.T = int(lens.max()) if self.S else 0
        elif not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be an int >= 0 or None, got {max_seqlen!r}")
        else:
            self.T = max_seqlen
            if self.S and not check._skip_data_checks(lens) and int(lens.max()) > max_seqlen:
                raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence ({int(lens.max())})")
        self.pos = torch.arange(n, device=like.device) - cu_seqlens[:-1].long()[self.seq]

    def pad(self, x, fill=0):
        """[N, ...] -> [S, T, ...], ``fill`` past each sequence's end (None stays None)."""
        if x is None:
            return None
        return x.new_full((self.S, self.T, *x.shape[1:]), fill).index_put((self.seq, self.pos), x)

    def pack(self, x):
        """[S, T, ...] -> [N, ...]."""
        return x[self.seq, self.pos]


def _check_cu_seqlens(cu_seqlens, n, device):
    """cu_seqlens [S + 1] integer, non-decreasing from 0 to n (the flat token count)."""
    check.integer("cu_seqlens", cu_seqlens)
    check.ndim("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must be [S + 1] offsets starting at 0, got an empty tensor")
    if check._skip_data_checks(cu_seqlens):
        return
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to the number of tokens {n}, got "
                         f"{cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else '...'}")


def _linear_ppo_loss_reference(hidden, weight, labels, old_logp, advantages, mask, *args, cu_seqlens=None,
                               chunk_size=None):
    """The reference materialises the logits (no chunks); packed input is its padded call."""
    if cu_seqlens is not None:
        p = Packing(cu_seqlens, labels)
        hidden, labels, old_logp, advantages, mask = (p.pad(hidden), p.pad(labels, -100), p.pad(old_logp),
                                                      p.pad(advantages), p.pad(mask))
        args = (*args[:1], p.pad(args[1]), *args[2:])  # ref_logp
    return ref.linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, *args)


register("linear_ppo_loss", "reference")(_linear_ppo_loss_reference)


def linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, *, bias=None, ref_logp=None, kl_coef=0.0,
                    kl_estimator="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=None,
                    dual_clip=None, agg="token-mean", cu_seqlens=None, head_dtype=None, chunk_size=None,
                    process_group=None, vocab_start=None, reduce_hidden_grad=True, backend=None):
    """ppo_loss_from_logits(hidden @ weight.T + bias, ...) without the [N, V] logits.

    hidden [B, T, H] (or [N, H] packed: sequences at rows cu_seqlens[i]:cu_seqlens[i+1]), weight [V, H],
    bias [V] or None; labels, old_logp, advantages, mask, ref_logp [B, T] (or [N]); cu_seqlens [S + 1]
    int (agg per sequence, as the padded [S, T] call). head_dtype: the dtype the head's GEMMs run in
    (e.g. torch.float32 for bf16 models); chunk_size: rows of logits per chunk (default adapts to N
    and V, at most N/8 rows). Same value, gradients (hidden, weight, bias) and stats as
    ppo_loss_from_logits; the chunked backends compute the gradients in the forward, so the loss can
    be backpropagated once.
    Tensor parallel: ``process_group``, ``vocab_start``, ``reduce_hidden_grad`` as in ``linear_logprobs``
    (weight [V_r, H] this rank's lm_head rows). The rows' logp and entropy come from the chunked
    linear_logprobs (merged over the group), the per-token terms run on [B, T]: the backward recomputes
    each chunk's logits (4 GEMMs per chunk, one more than without a group).
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        check.floating(name, t)
    check.ndim("weight", weight, 2)
    check.integer("labels", labels)
    check.same_device("hidden", hidden, weight=weight, labels=labels, bias=bias, cu_seqlens=cu_seqlens)
    if hidden.dim() < 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden must be [..., H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if head_dtype is not None and head_dtype not in check.FLOAT_DTYPES:
        raise ValueError(f"head_dtype must be a floating dtype or None, got {head_dtype!r}")
    check.positive("temperature", temperature)
    check.floating("old_logp", old_logp)
    _check_bt("old_logp", old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    if old_logp.shape != labels.shape:
        raise ValueError(f"old_logp must have the shape of labels {tuple(labels.shape)}, got {tuple(old_logp.shape)}")
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(f"with cu_seqlens, hidden must be packed [N, H], got {tuple(hidden.shape)}")
        _check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    else:
        _check_agg(agg, old_logp)
    # the chunked backends weight tokens by the three backend modes (no normalisers / weights yet)
    check.choice("agg", agg, tuple(dict.fromkeys(_BACKEND_AGG.values())))
    check.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_clip("clip_low", clip_low)
    _check_clip("clip_high", clip_high, allow_none=True)
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1):
        raise ValueError(f"dual_clip must be a number > 1, got {dual_clip!r}")
    _check_reduce_flag(reduce_hidden_grad)
    sh = _tp_shard(process_group, vocab_start, weight.shape[0], labels, -100, hidden.device)
    if sh is not None:
        return _linear_ppo_loss_tp(hidden, weight, labels, old_logp, advantages, mask, bias, ref_logp, kl_coef,
                                   kl_estimator, entropy_coef, temperature, clip_low, clip_high, dual_clip, agg,
                                   cu_seqlens, head_dtype, chunk_size, sh, reduce_hidden_grad, backend)
    check.labels_in_range(labels, weight.shape[0], -100)
    impl = select("linear_ppo_loss", hidden.device, backend)
    return impl(hidden, weight, labels, old_logp, advantages, mask, bias, ref_logp, kl_coef, kl_estimator,
                entropy_coef, temperature, clip_low, clip_high, dual_clip, agg, head_dtype,
                cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def _linear_ppo_loss_tp(hidden, weight, labels, old_logp, advantages, mask, bias, ref_logp, kl_coef, kl_estimator,
                        entropy_coef, temperature, clip_low, clip_high, dual_clip, agg, cu_seqlens, head_dtype,
                        chunk_size, sh, reduce_hidden_grad, backend):
    """linear_ppo_loss over a vocab-sharded lm_head: the group's rows from linear_logprobs, then the per-token
    terms (reference.ppo_loss_from_logprobs) on [B, T], or on the padded [S, T] of a packed batch."""
    impl = select("linear_logprobs", hidden.device, backend)
    h, w = hidden.reshape(-1, hidden.shape[-1]), weight
    if head_dtype is not None:
        h, w = h.to(head_dtype), w.to(head_dtype)
    logp, ent = _vp.linear_logprobs(h, w, labels.reshape(-1).long(), bias, sh,
                                    _backend_name("linear_logprobs", impl), impl, temperature, -100,
                                    reduce_hidden_grad, chunk_size)
    logp, ent = logp.reshape(labels.shape), ent.reshape(labels.shape)
    if cu_seqlens is not None:
        p = Packing(cu_seqlens, labels)
        logp, ent, old_logp, advantages, mask, ref_logp = (p.pad(t) for t in (logp, ent, old_logp, advantages, mask,
                                                                               ref_logp))
    return ref.ppo_loss_from_logprobs(logp, ent, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator,
                                      entropy_coef, clip_low, clip_high, dual_clip, agg)
