"""linear_ppo_loss: the PPO loss of ppo_loss_from_logits(hidden @ weight.T + bias, ...) without the
[N, V] logits, in row chunks, with 3 GEMMs per chunk and no recompute.

The loss is Σ_t w_t·(pg_t - entropy_coef·H_t + kl_coef·kl_t) with per-token aggregation weights
w_t = mask_t·scale_t known from the mask before any logit exists (``reference.agg_scale``), so each chunk's
contribution and its gradient are final when the chunk is done. Per chunk of rows:
  1. logits_c = hidden_c @ weight.T (+ bias)                    GEMM, [rows, V] in fp32 (fp64)
  2. the fused ppo_loss_from_logits pass on logits_c with the weights of the whole batch: one read
     for the row statistics and the per-token terms, then the in-place backward turns logits_c into
     d loss / d logits_c (one read + one write, no second [rows, V] buffer)
  3. grad_hidden_c = g_c @ weight, grad_weight += g_c.T @ hidden_c  GEMMs (grad_bias += Σ_rows g_c)
The loss is a scalar, so the backward only scales the saved gradients by the upstream gradient (in
place: a second backward through the same graph is an error). At most one chunk of logits is alive;
the forward keeps grad_hidden and grad_weight (an fp32 [V, H] accumulator while it runs, for half
weights) until the backward.

Fused passes: "triton" runs the kernels of ops/ppo_loss_from_logits.py (the per-token scale is the
kernel's row scale with rows of length 1); "cpu" runs torch.ops.rlhf_fast.ppo_from_logits_fwd, whose
token-mean over a run of tokens of one scale s gives Σ mask·term / Σ mask, times s·Σ mask, and the
in-place torch.ops.rlhf_fast.logprobs_bwd_.

GEMM dtypes as ops/linear_logprobs.py; ``head_dtype`` (e.g. torch.float32) overrides the dtype the
head runs in.

Aggregations: every agg mode with ``num_tokens`` / ``num_seqs`` is a per-token scale s (reference.agg_scale,
known from the mask), so the fused passes above run them all. ``weights`` (which scale the policy term
only) and loss_type "gspo" / "cispo" run the general pass instead: per chunk, the row pass of
ops/linear_logprobs.py (logp, entropy, lse), the per-token math of reference.policy_token_loss and
reference.kl on the chunk's [rows] under autograd (which gives the per-row coefficients g_lp, g_ent and
the per-token gradients of old_logp, advantages, ref_logp), then the row backward in place. gspo's
sequence ratio needs each sequence's logp before any of its gradients, so it first runs a logp-only pass
over all chunks (one more forward GEMM and row pass per chunk; benchmarks/bench_linear_ppo_loss.py
measures the cost) and then the general pass with the sequences' log-ratios known. Sequence-aligned
chunks would avoid the extra GEMM, but bound the chunk below by the longest sequence (rows x V logits).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton.language as tl

from .. import _backend, _compiled
from .. import reference
from . import logprobs as _tlp
from . import ppo_loss_from_logits as _fl
from .kl import acc_dtypes, estimator_code
from .linear_logprobs import _chunk_logits, _gemm_dtype, _mm
from .ppo_loss import _mask_arg

CHUNK_BYTES = 256 << 20  # bound on one chunk's fp32 logits
ROW_MULTIPLE = 128       # chunk rows are a multiple of this where N allows (GEMM tiles)
MIN_SPLIT = 8            # the default chunk holds at most 1/MIN_SPLIT of the [N, V] logits


def default_chunk_rows(n_rows: int, vocab: int, acc: torch.dtype = torch.float32) -> int:
    """Rows per chunk: at most ⌈N / MIN_SPLIT⌉ rows and CHUNK_BYTES of logits, rounded down to a
    multiple of ROW_MULTIPLE when that leaves at least ROW_MULTIPLE rows."""
    per_row = max(1, vocab) * torch.empty((), dtype=acc).element_size()
    rows = min(-(-n_rows // MIN_SPLIT), CHUNK_BYTES // per_row)
    if rows >= ROW_MULTIPLE:
        rows -= rows % ROW_MULTIPLE
    return max(1, rows)


class _Config(NamedTuple):
    inv_t: float
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float          # 0 unless a ref_logp is given
    kl_estimator: str
    entropy_coef: float
    has_ref: bool
    loss_type: str = "ppo"


# A fused pass: (logits [rows, V] acc, labels, old, adv, mask, scale, ref [rows], cfg)
#   -> sums [6] = [Σ w·pg, Σ w·H, Σ w·kl, Σ mask·clipped, Σ mask·(-log_ratio), Σ mask·dual_clipped],
#      d_tok [rows, 3] = d loss / d (old_logp, advantages, ref_logp);
# and logits now hold d loss / d logits.
def _triton_pass(x, lab, old, adv, m, scale, ref, c: _Config):
    dt, acc, nterms = acc_dtypes(x, old, adv, ref)
    N, V = x.shape
    stats = torch.zeros(N, _fl._NS, dtype=dt, device=x.device)
    grads = torch.zeros(N, _fl._NG, dtype=dt, device=x.device)
    est, plus = estimator_code(c.kl_estimator)
    if N:
        # the chunk as one [1, N, V] batch of rows (the kernels' layout); T = 1: one scale per token
        row_acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        with _backend.device_guard(x.device):
            x3 = x.unsqueeze(0)
            _fl.launch_fwd(x3, lab, old, adv, ref, _mask_arg(m), scale, stats, grads, 1, c.inv_t, 1.0 - c.clip_low,
                           1.0 + c.clip_high, c.dual_clip or 0.0, c.kl_coef, c.entropy_coef,
                           HAS_DUAL=c.dual_clip is not None, HAS_REF=c.has_ref, EST=est, PLUS=plus, ROW_ACC=row_acc,
                           ACC=acc, NTERMS=nterms)
            one = torch.ones(1, dtype=dt, device=x.device)
            _fl.launch_bwd(x3, lab, grads, one, x3, c.inv_t, row_acc)
    return stats.sum(0)[:6], grads[:, 4:7]


def _runs(scale):
    """[(start, end)] of the runs of equal values of scale (host)."""
    if scale.numel() == 0:
        return []
    cuts = ((scale[1:] != scale[:-1]).nonzero().reshape(-1) + 1).tolist()
    edges = [0, *cuts, scale.numel()]
    return list(zip(edges[:-1], edges[1:]))


def _cpu_pass(x, lab, old, adv, m, scale, ref, c: _Config):
    dt, at = old.dtype, x.dtype  # the per-token math dtype, the logits' (the in-place backward's)
    N = x.shape[0]
    sums = torch.zeros(6, dtype=dt)
    d_tok = torch.zeros(N, 3, dtype=dt)
    g_lp, g_ent, lse, ent = (torch.zeros(N, dtype=at) for _ in range(4))
    w = m.to(dt)
    for a, b in _runs(scale):
        # token-mean over the run: every value is (Σ mask·term) / n with n = Σ mask over the run
        _, st, saved = torch.ops.rlhf_fast.ppo_from_logits_fwd(
            x[a:b], lab[a:b], old[a:b], adv[a:b], m[a:b], ref[a:b] if c.has_ref else None, c.kl_coef,
            c.kl_estimator, c.entropy_coef, c.inv_t, c.clip_low, c.clip_high, c.dual_clip, "token-mean")
        n = w[a:b].sum()
        n = torch.where(n > 0, n, torch.ones_like(n))
        k = n * scale[a]  # undoes 1 / n, applies the batch's weight
        sums += torch.stack([st[0] * k, st[4] * k, st[5] * k, st[1] * n, st[2] * n, st[3] * n])
        g_lp[a:b], g_ent[a:b] = saved[:, 0] * k, saved[:, 1] * k
        d_tok[a:b] = saved[:, 5:8] * k
        # one-part lse, as logprobs_bwd_ takes it (the fused op keeps m and log_s apart for |x| ~ 1e4)
        lse[a:b] = saved[:, 2] * c.inv_t + saved[:, 3]
        ent[a:b] = saved[:, 4]
    if N:
        torch.ops.rlhf_fast.logprobs_bwd_(x, g_lp, g_ent, lab, lse, ent, c.inv_t, -100)
    return sums, d_tok


# The row pass of the general path: fwd (logits, labels, inv_t, ignore_index) -> logp, entropy, lse;
# bwd_ (logits, g_logp, g_entropy, labels, lse, entropy, inv_t, ignore_index) writes d loss / d logits into logits.
class _Rows(NamedTuple):
    fwd: object
    bwd_: object


_TRITON_ROWS = _Rows(_tlp.logprobs_fwd, lambda x, g, e, lab, lse, ent, inv_t, ii: _tlp.logprobs_bwd(
    g, e, x, lab, lse, ent, inv_t, ii, out=x))
_CPU_ROWS = _Rows(lambda *a: torch.ops.rlhf_fast.logprobs_fwd(*a), lambda *a: torch.ops.rlhf_fast.logprobs_bwd_(*a))


def _general_pass(rows, x, lab, old, adv, m, scale, pol_scale, ref, seq_lr, c: _Config):
    """A chunk of the general path (weights, gspo, cispo): the fused pass's outputs from the row pass, the
    per-token math of the reference under autograd (the chunk's [rows] only), and the row backward."""
    logp, ent, lse = rows.fwd(x, lab, c.inv_t, -100)
    dt = old.dtype
    w = m.to(dt) * scale
    with torch.enable_grad():
        lp, h, o, a, r = (t.detach().to(dt).requires_grad_() for t in (logp, ent, old, adv, ref))
        pg, clipped, neg_lr, dual = reference.policy_token_loss(lp, o, a, m, c.loss_type, c.clip_low, c.clip_high,
                                                                c.dual_clip, seq_lr)
        pol = (pg * (w if pol_scale is None else m.to(dt) * pol_scale)).sum()
        ent_sum = (h * w).sum()
        kl_sum = (reference.kl(lp, r, c.kl_estimator) * w).sum() if c.has_ref else torch.zeros((), dtype=dt)
        total = pol
        if c.entropy_coef:
            total = total - c.entropy_coef * ent_sum
        if c.kl_coef:
            total = total + c.kl_coef * kl_sum
        grads = torch.autograd.grad(total, (lp, h, o, a, r), allow_unused=True)
    g_lp, g_h, g_o, g_a, g_r = (torch.zeros_like(lp) if g is None else g for g in grads)
    if x.shape[0]:
        rows.bwd_(x, g_lp.to(lse.dtype), g_h.to(lse.dtype), lab, lse, ent, c.inv_t, -100)
    sums = torch.stack([pol, ent_sum, kl_sum.to(dt), (m.to(dt) * clipped).sum(), (m.to(dt) * neg_lr).sum(),
                        (m.to(dt) * dual).sum()]).detach()
    return sums, torch.stack([g_o, g_a, g_r], 1)


def _seq_log_ratio(rows, hidden, w, b, acc, gd, lab, old, mask, cu_seqlens, C, inv_t):
    """gspo's per-token sequence log-ratio: a logp-only pass over every chunk (GEMM + row pass), then the
    mean of logp - old_logp over each sequence's valid tokens."""
    N = hidden.shape[0]
    logp = torch.empty(N, dtype=old.dtype, device=hidden.device)
    for i in range(0, N, C):
        j = min(N, i + C)
        logits = _chunk_logits(hidden[i:j].to(gd), w, b, acc)
        logp[i:j] = rows.fwd(logits, lab[i:j], inv_t, -100)[0]
        del logits
    d = (logp - old).view(mask.shape)
    return reference.seq_mean(d, mask, cu_seqlens).reshape(-1)


class LinearPPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp, cfg, scale, cu_seqlens,
                head_dtype, passes, chunk_rows, grad_enabled, weights):
        fp64 = torch.float64 in (hidden.dtype, weight.dtype, head_dtype)
        acc = torch.float64 if fp64 else torch.float32  # of the logits
        dt = torch.float64 if fp64 else acc_dtypes(old_logp, advantages, ref_logp)[0]  # of the per-token math
        N, V = hidden.shape[0], weight.shape[0]
        C = chunk_rows or default_chunk_rows(N, V, acc)
        # the gradients cost two of the three GEMMs: none under no_grad
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        need_tok = [grad_enabled and ctx.needs_input_grad[i] for i in (4, 5, 7)]
        # the per-token aggregation scale (reference.agg_scale), Σ mask for the token-mean statistics
        scale = scale.reshape(-1).to(dt).contiguous()
        pol_scale = None if weights is None else scale * weights.reshape(-1).to(dt)
        tot = mask.sum(dtype=dt)
        tot = torch.where(tot > 0, tot, torch.ones_like(tot))
        old, adv = old_logp.reshape(-1).to(dt), advantages.reshape(-1).to(dt)
        ref = ref_logp.reshape(-1).to(dt) if ref_logp is not None else old
        m = mask.reshape(-1)
        m = m if m.dtype == torch.bool else m.to(dt)
        lab = labels.reshape(-1).long()
        gd = head_dtype or _gemm_dtype(hidden, weight, acc)
        w = weight.to(gd)
        b = None if bias is None else bias.to(acc)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
        d_tok = torch.empty(N, 3, dtype=dt, device=hidden.device) if any(need_tok) else None
        fused, rows = passes
        general = weights is not None or cfg.loss_type != "ppo"
        seq_lr = None
        if cfg.loss_type == "gspo":
            seq_lr = _seq_log_ratio(rows, hidden, w, b, acc, gd, lab, old, mask, cu_seqlens, C, cfg.inv_t)
        parts = []
        for i in range(0, N, C):
            j = min(N, i + C)
            h = hidden[i:j].to(gd)
            logits = _chunk_logits(h, w, b, acc)
            if general:
                sums, dt_c = _general_pass(rows, logits, lab[i:j], old[i:j], adv[i:j], m[i:j], scale[i:j],
                                           None if pol_scale is None else pol_scale[i:j], ref[i:j],
                                           None if seq_lr is None else seq_lr[i:j], cfg)
            else:
                sums, dt_c = fused(logits, lab[i:j], old[i:j], adv[i:j], m[i:j], scale[i:j], ref[i:j], cfg)
            parts.append(sums)
            if d_tok is not None:
                d_tok[i:j] = dt_c
            g = logits  # (the fused pass wrote d loss / d logits into it)
            del logits
            if need_b:
                grad_b += g.sum(0)
            g = g.to(gd)
            if need_h:
                grad_h[i:j] = _mm(g, w, acc)
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.T, h)
                else:
                    grad_w += _mm(g.T, h, acc)
            del g, h
        sums = torch.stack(parts).sum(0) if parts else torch.zeros(6, dtype=dt, device=hidden.device)
        sums = sums.to(dt)
        pg_loss, ent, kl = sums[0], sums[1], sums[2]
        loss = pg_loss.clone()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * ent
        if cfg.kl_coef:
            loss = loss + cfg.kl_coef * kl
        out = [pg_loss, sums[3] / tot, sums[4] / tot, sums[5] / tot, ent, kl]
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b, d_tok)
        ctx.tok_meta = [(t.shape, t.dtype) if t is not None else None for t in (old_logp, advantages, ref_logp)]
        ctx.used = False
        ctx.mark_non_differentiable(*out)
        return (loss, *out)

    @staticmethod
    def backward(ctx, G, *_):
        if ctx.used:
            raise RuntimeError("linear_ppo_loss: its backward scales the gradients saved by the forward in place "
                               "and runs once; recompute the loss to differentiate it again")
        ctx.used = True
        grad_h, grad_w, grad_b, d_tok = ctx.saved_tensors
        grads = [g.mul_(G.to(g.dtype)) if g is not None else None for g in (grad_h, grad_w, grad_b)]
        tok = [None, None, None]
        for c, (i, meta) in enumerate(zip((4, 5, 7), ctx.tok_meta)):
            if ctx.needs_input_grad[i] and meta is not None and d_tok is not None:
                tok[c] = (G * d_tok[:, c]).view(meta[0]).to(meta[1])
        return (*grads, None, tok[0], tok[1], None, tok[2], *([None] * 8))


def _implementation(fused, rows: _Rows, backend: str):
    def linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, bias=None, ref_logp=None, kl_coef=0.0,
                        kl_estimator="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=None,
                        dual_clip=None, agg="token-mean", head_dtype=None, *, cu_seqlens=None, chunk_size=None,
                        weights=None, num_tokens=None, num_seqs=None, loss_type="ppo"):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
        has_ref = ref_logp is not None
        cfg = _Config(1.0 / temperature, float(clip_low), float(clip_low if clip_high is None else clip_high),
                      None if dual_clip is None else float(dual_clip), float(kl_coef) if has_ref else 0.0,
                      kl_estimator, float(entropy_coef), has_ref, loss_type)
        scale = reference.agg_scale(mask, agg, num_tokens, num_seqs, cu_seqlens)
        loss, pg_loss, clipfrac, approx_kl, dual_frac, ent, k = LinearPPOLossFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels, old_logp, advantages, mask, ref_logp, cfg,
            scale, cu_seqlens, head_dtype, (fused, rows), chunk_size, torch.is_grad_enabled(), weights)
        stats = {"clipfrac": clipfrac, "approx_kl": approx_kl, "dual_clipfrac": dual_frac, "pg_loss": pg_loss,
                 "entropy": ent}
        if has_ref:
            stats["kl"] = k
        return loss, stats

    linear_ppo_loss.__doc__ = (
        f'The "{backend}" backend of ``rf.linear_ppo_loss`` (signature of ``reference.linear_ppo_loss``), in\n'
        "chunks of ``chunk_size`` rows (default: ``default_chunk_rows``).")
    return linear_ppo_loss


linear_ppo_loss_triton = _implementation(_triton_pass, _TRITON_ROWS, "triton")
_backend.register("linear_ppo_loss", "triton")(linear_ppo_loss_triton)
if _compiled.LOADED:
    linear_ppo_loss_cpu = _implementation(_cpu_pass, _CPU_ROWS, "cpu")
    _backend.register("linear_ppo_loss", "cpu")(linear_ppo_loss_cpu)
