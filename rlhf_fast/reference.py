"""Every rlhf_fast op in short, readable PyTorch: the source of truth.

Tests check each backend against these functions run in float64; benchmarks time them as the
baseline. They take the shapes documented in ``rlhf_fast.functional`` and do no input checking
(the public functions do). Math runs in float32 (float64 for float64 inputs).

Conventions at the kinks, written out with torch.where so that they do not depend on the installed
torch (torch.clamp's gradient at its ends and torch.maximum's split on ties have changed between
releases); every backend implements exactly these:
  * ``_clip(x, lo, hi)``: at an exact end (x == lo or x == hi) the input passes, with gradient 1;
    strictly outside, the gradient is 0. Used for the policy ratio clip, the ±20 log-ratio clamp,
    the value clip and the KL clamp.
  * ``_max(a, b)`` / ``_min(a, b)`` (the PPO losses): b only where it is strictly larger / smaller,
    so on a tie the first argument, the unclipped branch, takes the whole gradient.
  * NaN: a NaN passes through every clip, max and min (NaN in, NaN out), so it reaches every output
    that depends on it; the comparison statistics (clipfrac, ...) count a NaN token as not clipped.
    Aggregations weight masked tokens by 0 (as x·mask does), so a NaN even at a masked token makes
    the loss NaN; the scans and shaped rewards step over masked positions, NaN or not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _clip(x, lo, hi):
    """clamp(x, lo, hi) with gradient 1 on the closed interval [lo, hi]; NaN passes."""
    return torch.where(x < lo, lo, torch.where(x > hi, hi, x))


def _max(a, b):
    """maximum(a, b); a tie gives a (and all of the gradient); NaN in either gives NaN."""
    return torch.where((b > a) | b.isnan(), b, a)


def _min(a, b):
    """minimum(a, b); a tie gives a (and all of the gradient); NaN in either gives NaN."""
    return torch.where((b < a) | b.isnan(), b, a)


# ----------------------------------------------------------------------------- log-probs
def logprobs(logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log_softmax(logits / T)[label] and the entropy of softmax(logits / T); 0 where ignored.

    Ignored rows are left out of the softmax, so they get 0 and a zero gradient whatever their logits
    hold (NaN included); a NaN logit in any other row makes that row's logp, entropy and gradient NaN.
    """
    valid = labels != ignore_index
    z = torch.where(valid.unsqueeze(-1), _acc(logits) / temperature, 0.0)
    logp_all = torch.log_softmax(z, dim=-1)
    safe = torch.where(valid, labels, 0).long()
    logp = torch.where(valid, logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # p·log p is 0 where p is 0 (also for -inf logits, where log p is -inf)
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return logp, torch.where(valid, entropy, 0.0)


def linear_logprobs(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False):
    """logprobs(hidden @ weight.T + bias, labels), materialising the logits."""
    logits = _acc(hidden) @ _acc(weight).T
    if bias is not None:
        logits = logits + _acc(bias)
    return logprobs(logits, labels, temperature, ignore_index, return_entropy)


# ----------------------------------------------------------------------------- KL
def kl(logp, ref_logp, estimator="k3", clamp=None):
    """Per-token KL(π‖π_ref) estimate from sampled-token log-probs (Schulman's k1/k2/k3)."""
    plus = estimator.endswith("+")
    name = estimator.rstrip("+")
    d = _acc(logp) - _acc(ref_logp)
    if name == "k1":
        out = d
    elif name == "k2":
        out = 0.5 * d * d
    elif name == "k3":
        out = torch.expm1(-d) + d  # exp(ref - logp) - (ref - logp) - 1, without cancellation
    elif name == "abs":
        out = d.abs()
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}")
    if plus:  # this estimator's value, k2's gradient (straight-through)
        k2 = 0.5 * d * d
        out = k2 + (out - k2).detach()
    if clamp is not None:
        out = _clip(out, -clamp, clamp)
    return out


# ----------------------------------------------------------------------------- packed sequences
def seq_ids(cu_seqlens, n):
    """Sequence index [n] of each token of a packed layout (sequence i at cu_seqlens[i]:cu_seqlens[i+1]),
    and the sequence lengths [S]."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lens.shape[0], device=cu.device), lens, output_size=n), lens


# ----------------------------------------------------------------------------- masked reductions
def masked_sum(x, mask, dim=None):
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x, mask, dim=None):
    """Σ x·m / Σ m; 0 where Σ m is 0."""
    m = mask.to(x.dtype)
    num = masked_sum(x, m, dim)
    den = m.sum() if dim is None else m.sum(dim)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def masked_whiten(x, mask, shift_mean=True):
    """(x - μ)·rsqrt(var + 1e-8) over the masked elements (unbiased var); μ added back if not shift_mean."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def aggregate(loss, mask, agg="token-mean", num_tokens=None, num_seqs=None, weights=None):
    """Reduce a per-token loss [B, T] to a scalar; ``weights`` [B, T] multiply the loss, not the counts.

    token-mean               Σ loss·m / N, N = num_tokens or Σ m (the global token count under data parallelism)
    token-sum                Σ loss·m
    seq-mean-token-sum       Σ_rows (Σ_t loss·m) / S, S = num_seqs or the number of rows with a token
    seq-mean-token-sum-norm  seq-mean-token-sum / T (T = loss.shape[-1], Dr. GRPO's constant horizon)
    seq-mean-token-mean      Σ_rows (Σ_t loss·m / Σ_t m) / S
    A zero count gives 0.
    """
    m = mask.to(loss.dtype)
    x = loss if weights is None else loss * _acc(weights).to(loss.dtype)
    if agg in ("token-mean", "token-sum"):
        num = (x * m).sum()
        if agg == "token-sum":
            return num
        den = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=loss.dtype, device=loss.device)
        return num / torch.where(den != 0, den, torch.ones_like(den))
    per_seq = (x * m).sum(-1)
    n_tok = m.sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / torch.where(n_tok > 0, n_tok, torch.ones_like(n_tok))
    elif agg not in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        raise ValueError(f"unknown agg {agg!r}")
    den = (n_tok > 0).to(loss.dtype).sum() if num_seqs is None else \
        torch.as_tensor(num_seqs, dtype=loss.dtype, device=loss.device)
    out = (per_seq * (n_tok > 0)).sum() / torch.where(den != 0, den, torch.ones_like(den))
    return out / loss.shape[-1] if agg == "seq-mean-token-sum-norm" else out


# ----------------------------------------------------------------------------- advantages
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation [B, T] -> (advantages, returns), masked positions skipped.

    Over the valid positions t_1 < ... < t_k of a row: δ_i = r_i + γ·V_{i+1} - V_i (V_{k+1} = 0),
    A_i = δ_i + γλ·A_{i+1}, R_i = A_i + V_i. Masked positions get A = R = 0 and do not break the
    recursion, so right padding, left padding and holes (multi-turn) are all handled.
    """
    math = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    rewards, values = rewards.to(math), values.to(math)
    B, T = rewards.shape
    valid = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    adv = [None] * T
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * running
        running = torch.where(valid[:, t], a, running)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        adv[t] = torch.where(valid[:, t], a, 0.0)
    advantages = torch.stack(adv, dim=1) if T else torch.zeros_like(values)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def gae_python_loop(rewards, values, gamma=1.0, lam=0.95):
    """GAE as TRL / verl / OpenRLHF write it (right padding only): the baseline for benchmarks."""
    T = rewards.shape[-1]
    lastgaelam = 0
    out = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        out.append(lastgaelam)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, advantages + values


def reinforce_pp_returns(rewards, mask, gamma=1.0):
    """Discounted returns G_t = r_t + γ·G_{t+1} over valid positions (REINFORCE++), 0 where masked."""
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return advantages


def _groups(scores, group_index):
    """(ids [B] in 0..G-1, counts [G]) of an arbitrary group labelling."""
    ids = torch.unique(group_index, return_inverse=True)[1].to(scores.device)
    counts = torch.bincount(ids).to(scores.dtype)
    return ids, counts


def _group_sum(x, ids, G):
    return torch.zeros(G, dtype=x.dtype, device=x.device).index_add(0, ids, x)


def grpo_advantages(scores, group_size, normalize_std=True, eps=1e-6, group_index=None):
    """GRPO: (s - mean_group) / (std_group + eps), std unbiased.

    Groups: consecutive blocks of ``group_size`` of scores [B], or, with ``group_index`` [B], the scores
    sharing a label (any sizes; a group of one has no baseline: mean 0, std 1, as verl does).
    """
    s = _acc(scores)
    if group_index is None:
        g = s.reshape(-1, group_size)
        adv = g - g.mean(-1, keepdim=True)
        if normalize_std:
            adv = adv / (g.std(-1, keepdim=True) + eps)
        return adv.reshape(scores.shape)
    ids, n = _groups(s, group_index)
    single = (n == 1)[ids]
    mean = (_group_sum(s, ids, n.numel()) / n)[ids]
    y = torch.where(single, s, s - mean)
    if not normalize_std:
        return y
    var = _group_sum(torch.where(single, 0.0, y * y), ids, n.numel()) / (n - 1).clamp(min=1)
    std = torch.where(var > 0, var, torch.ones_like(var)).sqrt() * (var > 0)  # torch.std's 0 gradient at σ = 0
    std = torch.where(n == 1, torch.ones_like(std), std)[ids]
    return y / (std + eps)


def rloo_advantages(scores, group_size, group_index=None):
    """RLOO: s_i minus the mean of the other scores of its group (groups as in grpo_advantages;
    a group of one keeps its score)."""
    s = _acc(scores)
    if group_index is None:
        g = s.reshape(-1, group_size)
        baseline = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
        return (g - baseline).reshape(scores.shape)
    ids, n = _groups(s, group_index)
    others = _group_sum(s, ids, n.numel())[ids] - s
    return s - others / (n[ids] - 1).clamp(min=1)


def kl_penalized_rewards(score, logp, ref_logp, mask, beta, estimator="k1"):
    """-β·kl on every response token and the sequence score added on the last one (mask = 1).

    score [B], logp / ref_logp / mask [B, T] -> rewards [B, T]. Rows with no valid token drop the score.
    """
    valid = mask.bool()
    # masked tokens are zeroed before the KL: a NaN there reaches neither the rewards nor the gradient
    logp, ref_logp = torch.where(valid, _acc(logp), 0.0), torch.where(valid, _acc(ref_logp), 0.0)
    rewards = torch.where(valid, -beta * kl(logp, ref_logp, estimator), 0.0)
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device)
    last = torch.where(valid, pos, -1).amax(-1)  # last valid position per row, -1 if none
    is_last = (pos == last.unsqueeze(-1)) & valid
    # where, not is_last·score: a NaN score reaches its row's last token only
    return torch.where(is_last, rewards + _acc(score).unsqueeze(-1), rewards)


# ----------------------------------------------------------------------------- losses
def ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", weights=None, num_tokens=None, num_seqs=None):
    """PPO clipped surrogate: per token max(-A·r, -A·clip(r, 1-clip_low, 1+clip_high)), aggregated.

    r = exp(clip(logp - old_logp, ±20)); dual_clip=c caps tokens with A < 0 at -A·c (min(pg, -A·c)).
    Ties of the max and the min go to the unclipped branch, and the clips pass their exact ends (see
    the module docstring). Returns (loss, stats) with stats clipfrac (tokens where the clipped branch
    is strictly larger), approx_kl (k1 of old to new), dual_clipfrac (tokens strictly capped).
    """
    clip_high = clip_low if clip_high is None else clip_high
    logp, old_logp, advantages = _acc(logp), _acc(old_logp), _acc(advantages)
    log_ratio = _clip(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * _clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = _max(pg1, pg2)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual = (advantages < 0) & (pg > cap)
        pg = torch.where(advantages < 0, _min(pg, cap), pg)
    loss = aggregate(pg, mask, agg, num_tokens, num_seqs, weights)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg2 > pg1).to(pg.dtype), mask),
            "approx_kl": masked_mean(-log_ratio, mask),
            "dual_clipfrac": masked_mean(dual.to(pg.dtype), mask),
        }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip=0.2, agg="token-mean", weights=None, num_tokens=None,
                   num_seqs=None):
    """½·max((v - R)², (old_v + clip(v - old_v, ±clip) - R)²), aggregated; clip=None: unclipped.

    At |v - old_v| == clip exactly the clipped value is v itself (a tie): the unclipped loss takes
    the whole gradient. vf_clipfrac counts tokens with |v - old_v| > clip whose clipped loss is
    strictly the larger.
    """
    values, old_values, returns = _acc(values), _acc(old_values), _acc(returns)
    l1 = (values - returns) ** 2
    if clip is None:
        vl = 0.5 * l1
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clipped = old_values + _clip(values - old_values, -clip, clip)
        l2 = (v_clipped - returns) ** 2
        vl = 0.5 * _max(l1, l2)
        with torch.no_grad():  # tokens where the clip is active and its loss is the larger one
            active = (values - old_values).abs() > clip
            clipfrac = masked_mean(((l2 > l1) & active).to(values.dtype), mask)
    return aggregate(vl, mask, agg, num_tokens, num_seqs, weights), {"vf_clipfrac": clipfrac}


def pairwise_reward_loss(chosen_scores, rejected_scores, margin=None):
    """Bradley-Terry loss mean(-log σ(s_w - s_l - margin)) over pairs [B]."""
    d = _acc(chosen_scores) - _acc(rejected_scores)
    if margin is not None:
        d = d - margin
    return -F.logsigmoid(d).mean()


def ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, ref_logp=None, kl_coef=0.0,
                         kl_estimator="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2,
                         clip_high=None, dual_clip=None, agg="token-mean", weights=None, num_tokens=None,
                         num_seqs=None):
    """pg_loss + kl_coef·agg(kl(logp, ref)) - entropy_coef·agg(entropy), from logits [B, T, V].

    ``weights`` multiply the policy term only; num_tokens / num_seqs normalise all three terms."""
    logp, entropy = logprobs(logits, labels, temperature, ignore_index=-100, return_entropy=True)
    return ppo_loss_from_logprobs(logp, entropy, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator,
                                  entropy_coef, clip_low, clip_high, dual_clip, agg, weights, num_tokens, num_seqs)


def ppo_loss_from_logprobs(logp, entropy, old_logp, advantages, mask, ref_logp=None, kl_coef=0.0, kl_estimator="k3",
                           entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean",
                           weights=None, num_tokens=None, num_seqs=None):
    """The per-token part of ppo_loss_from_logits, given the rows' logp and entropy [B, T]."""
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, weights,
                                  num_tokens, num_seqs)
    stats["pg_loss"] = loss.detach()
    ent = aggregate(entropy, mask, agg, num_tokens, num_seqs)
    stats["entropy"] = ent.detach()
    if entropy_coef:
        loss = loss - entropy_coef * ent
    if ref_logp is not None:
        k = aggregate(kl(logp, ref_logp, kl_estimator), mask, agg, num_tokens, num_seqs)
        stats["kl"] = k.detach()
        if kl_coef:
            loss = loss + kl_coef * k
    return loss, stats


def importance_ratio(logp, old_logp):
    """exp(logp - old_logp): the per-token importance ratio (TRL's KL bias correction multiplies by it)."""
    return torch.exp(_acc(logp) - _acc(old_logp))


def linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, bias=None, ref_logp=None, kl_coef=0.0,
                    kl_estimator="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=None,
                    dual_clip=None, agg="token-mean", head_dtype=None):
    """ppo_loss_from_logits(hidden @ weight.T + bias, ...), materialising the logits [..., V].

    The head runs in ``head_dtype`` if given (else in the math dtype of hidden and weight)."""
    hd = head_dtype or (torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32)
    logits = _acc(hidden.to(hd) @ weight.to(hd).T)
    if bias is not None:
        logits = logits + _acc(bias)
    return ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator,
                                entropy_coef, temperature, clip_low, clip_high, dual_clip, agg)
