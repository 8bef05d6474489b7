"""linear_ppo_loss: the PPO loss of ppo_loss_from_logits(hidden @ weight.T + bias, ...) without the
[N, V] logits, in row chunks, with 3 GEMMs per chunk and no recompute.

The loss is Σ_t w_t·(pg_t - entropy_coef·H_t + kl_coef·kl_t) with per-token aggregation weights
w_t = mask_t·scale_t known from the mask before any logit exists (``token_scale``), so each chunk's
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
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton.language as tl

from .. import _backend, _compiled
from .. import reference
from . import ppo_loss_from_logits as _fl
from .kl import acc_dtypes, estimator_code
from .linear_logprobs import _chunk_logits, _gemm_dtype, _mm
from .ppo_loss import _mask_arg, agg_row_scale

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


def token_scale(mask: torch.Tensor, agg: str, dtype: torch.dtype, cu_seqlens: torch.Tensor | None = None):
    """Per-token aggregation scale s [N] (w = mask·s reproduces reference.aggregate per sequence:
    rows of a [B, T] mask, or the sequences of cu_seqlens over a flat [N] mask) and Σ mask (0 -> 1)."""
    if cu_seqlens is not None:
        m = mask.reshape(-1)
        seq, lens = reference.seq_ids(cu_seqlens, m.shape[0])
        # a [S, 1] "mask" of each sequence's token count has the row sums of the padded [S, T] mask
        n_tok = torch.zeros(lens.shape[0], dtype=dtype, device=m.device).index_add_(0, seq, m.to(dtype))
        scale, tot = agg_row_scale(n_tok.unsqueeze(-1), agg, dtype)
        return scale[seq].contiguous(), tot
    m2d = mask.reshape(1, -1) if agg == "token-mean" or mask.dim() != 2 else mask
    scale, tot = agg_row_scale(m2d, agg, dtype)
    return scale.repeat_interleave(m2d.shape[1]), tot


class _Config(NamedTuple):
    inv_t: float
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float          # 0 unless a ref_logp is given
    kl_estimator: str
    entropy_coef: float
    has_ref: bool


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


class LinearPPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp, cfg, agg, cu_seqlens,
                head_dtype, fused, chunk_rows, grad_enabled):
        fp64 = torch.float64 in (hidden.dtype, weight.dtype, head_dtype)
        acc = torch.float64 if fp64 else torch.float32  # of the logits
        dt = torch.float64 if fp64 else acc_dtypes(old_logp, advantages, ref_logp)[0]  # of the per-token math
        N, V = hidden.shape[0], weight.shape[0]
        C = chunk_rows or default_chunk_rows(N, V, acc)
        # the gradients cost two of the three GEMMs: none under no_grad
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        need_tok = [grad_enabled and ctx.needs_input_grad[i] for i in (4, 5, 7)]
        scale, tot = token_scale(mask, agg, dt, cu_seqlens)
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
        parts = []
        for i in range(0, N, C):
            j = min(N, i + C)
            h = hidden[i:j].to(gd)
            logits = _chunk_logits(h, w, b, acc)
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
        return (*grads, None, tok[0], tok[1], None, tok[2], *([None] * 7))


def _implementation(fused, backend: str):
    def linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, bias=None, ref_logp=None, kl_coef=0.0,
                        kl_estimator="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=None,
                        dual_clip=None, agg="token-mean", head_dtype=None, *, cu_seqlens=None, chunk_size=None):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
        has_ref = ref_logp is not None
        cfg = _Config(1.0 / temperature, float(clip_low), float(clip_low if clip_high is None else clip_high),
                      None if dual_clip is None else float(dual_clip), float(kl_coef) if has_ref else 0.0,
                      kl_estimator, float(entropy_coef), has_ref)
        loss, pg_loss, clipfrac, approx_kl, dual_frac, ent, k = LinearPPOLossFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels, old_logp, advantages, mask, ref_logp, cfg,
            agg, cu_seqlens, head_dtype, fused, chunk_size, torch.is_grad_enabled())
        stats = {"clipfrac": clipfrac, "approx_kl": approx_kl, "dual_clipfrac": dual_frac, "pg_loss": pg_loss,
                 "entropy": ent}
        if has_ref:
            stats["kl"] = k
        return loss, stats

    linear_ppo_loss.__doc__ = (
        f'The "{backend}" backend of ``rf.linear_ppo_loss`` (signature of ``reference.linear_ppo_loss``), in\n'
        "chunks of ``chunk_size`` rows (default: ``default_chunk_rows``).")
    return linear_ppo_loss


linear_ppo_loss_triton = _implementation(_triton_pass, "triton")
_backend.register("linear_ppo_loss", "triton")(linear_ppo_loss_triton)
if _compiled.LOADED:
    linear_ppo_loss_cpu = _implementation(_cpu_pass, "cpu")
    _backend.register("linear_ppo_loss", "cpu")(linear_ppo_loss_cpu)
