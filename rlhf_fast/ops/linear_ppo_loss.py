"""linear_ppo_loss: the PPO loss of ppo_loss_from_logits(hidden @ weight.T + bias, ...) without the
[N, V] logits: row chunks in the forward, vocabulary slices for grad_weight in the backward.

The loss is Σ_t w_t·(pg_t - entropy_coef·H_t + kl_coef·kl_t) with per-token aggregation weights
w_t = mask_t·scale_t known from the mask before any logit exists (``reference.agg_scale``), so each chunk's
contribution and its gradient are final when the chunk is done. Forward, per chunk of rows:
  1. logits_c = hidden_c @ weight.T (+ bias)                    GEMM, [rows, V] in fp32 (fp64)
  2. the fused ppo_loss_from_logits pass on logits_c with the weights of the whole batch: one read
     for the row statistics and the per-token terms, then the in-place backward turns logits_c into
     d loss / d logits_c (one read + one write, no second [rows, V] buffer)
  3. grad_hidden_c = g_c @ weight                               GEMM (grad_bias += Σ_rows g_c)
and the row state (logsumexp, entropy, d loss / d logp and d loss / d entropy per row: O(N)) is kept.
Backward: grad_hidden and grad_bias are scaled by the upstream gradient (in place: a second backward
through the same graph is an error); grad_weight (``_grad_weight``), per slice of vocabulary columns:
  4. logits_s = hidden @ weight[slice].T                        GEMM, [N, cols] (recomputed)
  5. d loss / d logits_s from the row state, in place (the same row backward kernels)
  6. grad_weight[slice] = g_s.T @ hidden                        GEMM over all N rows, rounded once
Why grad_weight in the backward, at one more GEMM (4 instead of 3 when the weight is trained; 2 when it
is frozen, as before): summing it over row chunks needs a [V, H] accumulator kept from the forward to the
backward, 2.49 GB in fp32 at N=16384, H=4096, V=151936 (plus the weight-dtype copy returned); summing it
in the weight's dtype instead rounds at every chunk, and where the sum over tokens cancels (zero-mean
advantages) that error is of the order of the result. Measured on the CPU (benchmarks/bench_linear_ppo_loss.py
``--grad-weight-designs``, results/cpu/linear_ppo_loss_grad_weight.json): forward + backward takes 1.41x
the time of the fp32-accumulator design at the issue-13 CPU shape (N=1024, H=512, V=151936 fp32, median of
4 interleaved runs; 4/3 in GEMM FLOPs), 1.57x that of materialised logits (the accumulator design: 1.12x),
and keeps 2.1 MB instead of 313 MB from the forward to the backward; for bf16
weights with 43 row chunks its grad_weight is as close to float64 as the fp32 accumulator (one bf16
rounding, 1.6e-3 relative), where a bf16 accumulator gives 2.5e-3 overall and 0.56 on the 1% of entries
whose sum cancels most. Beyond what a plain autograd backward
needs (grad_hidden, grad_weight), the forward keeps O(N·H) (grad_hidden) and O(N) and the backward
allocates one chunk of logits (``vocab_chunk_cols``) at a time.

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
    return stats.sum(0)[:6], grads[:, 4:7], grads  # grads: the row state of _triton_slice_bwd


def _triton_slice_bwd(x, lab, state, G, c: _Config):
    """d loss / d x into x (in place) for logits x [N, W] of some W vocabulary columns, labels lab [N] in that
    window, the row state of _triton_pass (lse and the per-token coefficients of the whole row) times G."""
    if x.shape[0]:
        row_acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        with _backend.device_guard(x.device):
            x3 = x.unsqueeze(0)
            _fl.launch_bwd(x3, lab, state, G.reshape(1).to(state.dtype), x3, c.inv_t, row_acc)


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
    return sums, d_tok, torch.stack([g_lp, g_ent, lse, ent], 1)  # the row state of _rows_slice_bwd


# False: the 3-GEMM design instead, grad_weight summed over the row chunks in the forward into an fp32 [V, H]
# accumulator kept until the backward (faster by one GEMM per row of logits, 2·V·H·4 bytes more at the peak
# for half weights; see the module docstring). A setting for measurements and for runs with memory to spare.
GRAD_WEIGHT_IN_BACKWARD = True
SPARE = 4  # vocabulary columns beside a slice, where the rows whose label is elsewhere put their one-hot


def vocab_chunk_cols(n_rows: int, hidden: int, vocab: int, chunk_rows: int) -> int:
    """Vocabulary columns per slice of the backward: [N, cols + SPARE] logits and a [cols, H] grad_weight slice
    each within one row chunk's [chunk_rows, V] elements, a multiple of ROW_MULTIPLE where that leaves one."""
    cols = min(vocab, max(1, chunk_rows * vocab // max(n_rows, hidden, 1) - SPARE))
    if cols >= ROW_MULTIPLE and cols < vocab:
        cols -= cols % ROW_MULTIPLE
    return cols


def _grad_weight(hidden, weight, bias, lab, state, G, slice_bwd, c: _Config, gd, acc, C):
    """grad_weight [V, H] (weight's dtype) of the loss, G times: per slice of vocabulary columns, recompute the
    slice's logits for all N rows (one GEMM), turn them into d loss / d logits with the forward's row state
    (logsumexp and per-token coefficients of the whole row), and grad_weight[slice] = g.T @ hidden (one GEMM,
    the whole sum over the N rows in it, rounded once): no [V, H] accumulator.
    The row kernels want each row's label inside the row: the logits are those of a window of the slice and
    SPARE other columns, and a row whose label lies outside the slice points at a spare column (its one-hot
    lands there and is dropped; the slice's columns get exactly -p·(...) terms)."""
    N, V = hidden.shape[0], weight.shape[0]
    cols = vocab_chunk_cols(N, hidden.shape[1], V, C)
    h = hidden.to(gd)
    b = None if bias is None else bias.to(acc)
    grad_w = torch.empty_like(weight)
    valid = (lab >= 0) & (lab < V)
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        width = V if v1 - v0 == V else min(V, v1 - v0 + SPARE)
        a = v0 if v0 + width <= V else V - width  # the window [a, a + width) holds [v0, v1)
        spare = v1 - a if v1 < a + width else 0  # a column of the window outside the slice
        inside = (lab >= v0) & (lab < v1)
        lab_w = torch.where(inside, lab - a, torch.where(valid, spare, torch.where(lab == -100, -100, -1)))
        x = _chunk_logits(h, weight[a:a + width].to(gd), None if b is None else b[a:a + width], acc)
        slice_bwd(x, lab_w, state, G, c)  # x now holds G · d loss / d logits
        g = x[:, v0 - a:v1 - a].to(gd)
        del x
        grad_w[v0:v1] = _mm(g.T, h, acc)
        del g
    return grad_w


class _Passes(NamedTuple):
    pass_: object      # the fused forward pass over a chunk of rows (_triton_pass, _cpu_pass)
    slice_bwd: object  # d loss / d logits of a window of vocabulary columns, from pass_'s row state
    rows: object       # the row kernels (_Rows) of the general path (weights, gspo, cispo)


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
        kl_sum = (reference.kl(lp, r, c.kl_estimator) * w).sum() if c.has_ref else pol.new_zeros(())
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
    state = torch.stack([g_lp.to(lse.dtype), g_h.to(lse.dtype), lse, ent.to(lse.dtype)], 1)  # of _rows_slice_bwd
    return sums, torch.stack([g_o, g_a, g_r], 1), state


def _rows_slice_bwd(rows):
    """The slice backward of the general path: the row kernels' backward with the row state of _general_pass."""
    def slice_bwd(x, lab, state, G, c: _Config):
        if x.shape[0]:
            g = G.to(state.dtype)
            rows.bwd_(x, (state[:, 0] * g).contiguous(), (state[:, 1] * g).contiguous(), lab,
                      state[:, 2].contiguous(), state[:, 3].contiguous(), c.inv_t, -100)
    return slice_bwd


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
        with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs the backward recomputes, alike
            return LinearPPOLossFunction._forward(ctx, hidden, weight, bias, labels, old_logp, advantages, mask,
                                                  ref_logp, cfg, scale, cu_seqlens, head_dtype, passes, chunk_rows,
                                                  grad_enabled, weights)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp, cfg, scale, cu_seqlens,
                 head_dtype, passes, chunk_rows, grad_enabled, weights):
        fp64 = torch.float64 in (hidden.dtype, weight.dtype, head_dtype)
        acc = torch.float64 if fp64 else torch.float32  # of the logits
        dt = torch.float64 if fp64 else acc_dtypes(old_logp, advantages, ref_logp)[0]  # of the per-token math
        N, V = hidden.shape[0], weight.shape[0]
        C = chunk_rows or default_chunk_rows(N, V, acc)
        # the gradients cost two of the three GEMMs: none under no_grad
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        acc_w = need_w and not GRAD_WEIGHT_IN_BACKWARD  # the 3-GEMM design: a [V, H] accumulator
        need_w = need_w and GRAD_WEIGHT_IN_BACKWARD
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
        state = None  # the passes' row state, kept for grad_weight (computed in the backward: _grad_weight)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if acc_w else None
        grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
        d_tok = torch.empty(N, 3, dtype=dt, device=hidden.device) if any(need_tok) else None
        general = weights is not None or cfg.loss_type != "ppo"
        rows = passes.rows
        seq_lr = None
        if cfg.loss_type == "gspo":
            seq_lr = _seq_log_ratio(rows, hidden, w, b, acc, gd, lab, old, mask, cu_seqlens, C, cfg.inv_t)
        parts = []
        for i in range(0, N, C):
            j = min(N, i + C)
            h = hidden[i:j].to(gd)
            logits = _chunk_logits(h, w, b, acc)
            if general:
                sums, dt_c, st_c = _general_pass(passes.rows, logits, lab[i:j], old[i:j], adv[i:j], m[i:j],
                                                 scale[i:j], None if pol_scale is None else pol_scale[i:j], ref[i:j],
                                                 None if seq_lr is None else seq_lr[i:j], cfg)
            else:
                sums, dt_c, st_c = passes.pass_(logits, lab[i:j], old[i:j], adv[i:j], m[i:j], scale[i:j], ref[i:j],
                                                cfg)
            parts.append(sums)
            if need_w:
                if state is None:
                    state = torch.empty(N, st_c.shape[1], dtype=st_c.dtype, device=st_c.device)
                state[i:j] = st_c
            if d_tok is not None:
                d_tok[i:j] = dt_c
            g = logits  # (the fused pass wrote d loss / d logits into it)
            del logits
            if need_b:
                grad_b += g.sum(0)
            g = g.to(gd)
            if need_h:
                grad_h[i:j] = _mm(g, w, acc)
            if acc_w:
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
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        del w
        if need_w:
            ctx.save_for_backward(grad_h, grad_b, d_tok, hidden, weight, bias, lab, state)
        elif acc_w:
            ctx.save_for_backward(grad_h, grad_b, d_tok, grad_w.to(weight.dtype))
        else:
            ctx.save_for_backward(grad_h, grad_b, d_tok)
        # the general path's row state is the logprobs kernels' (g_logp, g_entropy, lse, entropy)
        ctx.slice_bwd = _rows_slice_bwd(rows) if general else passes.slice_bwd
        ctx.need_w, ctx.cfg, ctx.gd, ctx.acc, ctx.C = need_w, cfg, gd, acc, C
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
        grad_h, grad_b, d_tok, *kept = ctx.saved_tensors
        grad_w = None
        if ctx.need_w:
            with torch.autocast(G.device.type, enabled=False):
                grad_w = _grad_weight(*kept, G, ctx.slice_bwd, ctx.cfg, ctx.gd, ctx.acc, ctx.C)
        elif kept:  # summed in the forward (GRAD_WEIGHT_IN_BACKWARD = False)
            grad_w = kept[0].mul_(G.to(kept[0].dtype))
        grads = [g.mul_(G.to(g.dtype)) if g is not None else None for g in (grad_h, grad_b)]
        grads.insert(1, grad_w)
        tok = [None, None, None]
        for c, (i, meta) in enumerate(zip((4, 5, 7), ctx.tok_meta)):
            if ctx.needs_input_grad[i] and meta is not None and d_tok is not None:
                tok[c] = (G * d_tok[:, c]).view(meta[0]).to(meta[1])
        return (*grads, None, tok[0], tok[1], None, tok[2], *([None] * 8))


def _implementation(passes: "_Passes", backend: str):
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
            scale, cu_seqlens, head_dtype, passes, chunk_size, torch.is_grad_enabled(), weights)
        stats = {"clipfrac": clipfrac, "approx_kl": approx_kl, "dual_clipfrac": dual_frac, "pg_loss": pg_loss,
                 "entropy": ent}
        if has_ref:
            stats["kl"] = k
        return loss, stats

    linear_ppo_loss.__doc__ = (
        f'The "{backend}" backend of ``rf.linear_ppo_loss`` (signature of ``reference.linear_ppo_loss``), in\n'
        "chunks of ``chunk_size`` rows (default: ``default_chunk_rows``).")
    return linear_ppo_loss


linear_ppo_loss_triton = _implementation(_Passes(_triton_pass, _triton_slice_bwd, _TRITON_ROWS), "triton")
_backend.register("linear_ppo_loss", "triton")(linear_ppo_loss_triton)
if _compiled.LOADED:
    linear_ppo_loss_cpu = _implementation(_Passes(_cpu_pass, _rows_slice_bwd(_CPU_ROWS), _CPU_ROWS), "cpu")
    _backend.register("linear_ppo_loss", "cpu")(linear_ppo_loss_cpu)
