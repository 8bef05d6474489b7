"""PPO policy and value losses: one fused Triton kernel each for the forward.

Each program takes BLOCK flattened tokens, computes the per-token loss, writes the per-token
gradients already scaled by the aggregation weight (so the backward is one scale by the upstream
gradient), and writes its partial sums (loss, clipped count, approx-kl, dual-clipped count) to a
[programs, 4] buffer that torch sums: deterministic, no float atomics.

Aggregation weights: the loss is Σ_t w_t·loss_t with w = m·row_scale[row] (reference.aggregate):
token-mean 1 / Σm; seq-mean-token-sum 1 / #rows with tokens; seq-mean-token-mean
1 / (row's Σm · #rows with tokens). row_scale is a [B] vector computed by torch from the mask's row
sums (no host sync). Masks are read as weights, as the reference does (mask.to(dtype)).
Gradients at the kinks follow the conventions written out in reference.py: the clips pass their
exact ends, a tie of the max / min keeps the unclipped branch, NaN propagates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .kl import acc_dtypes, clip_elem

BLOCK = 1024
_AGG = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


@triton.jit
def second_wins(a, b):
    """Where reference._max(a, b) takes b: b strictly larger, or NaN (a tie keeps a)."""
    return (b > a) | (b != b)


@triton.jit
def ppo_token(lp, old, adv, lo, hi, dual_c, HAS_DUAL: tl.constexpr):
    """Per-token PPO clipped loss. Returns (loss, d loss/d logp, d loss/d adv, clipped, dual-clipped,
    -log_ratio); d loss / d old_logp = -(d loss / d logp). Conventions of reference.ppo_policy_loss:
    the clips pass their exact ends, a tie of the max or the min keeps the unclipped branch, NaN
    propagates (selects written with where: tl.maximum / tl.minimum drop NaN)."""
    lr, d_lr = clip_elem(lp - old, tl.full([], -20.0, lp.dtype), tl.full([], 20.0, lp.dtype))
    ratio = tl.exp(lr)
    rc, d_rc = clip_elem(ratio, lo, hi)
    pg1 = -adv * ratio
    pg2 = -adv * rc
    take2 = second_wins(pg1, pg2)  # reference._max(pg1, pg2)
    pg = tl.where(take2, pg2, pg1)
    d_ratio = tl.where(take2, -adv * d_rc, -adv)
    d_adv = tl.where(take2, -rc, -ratio)
    dual = pg < pg  # all False
    if HAS_DUAL:
        cap = -adv * dual_c
        dual = (adv < 0) & (pg > cap)  # reference._min(pg, cap) takes cap (cap is NaN only if adv is)
        d_ratio = tl.where(dual, 0.0, d_ratio)
        d_adv = tl.where(dual, -dual_c, d_adv)
        pg = tl.where(dual, cap, pg)
    d_lp = d_ratio * ratio * d_lr
    return pg, d_lp, d_adv, pg2 > pg1, dual, -lr


LOSS_CODES = {"ppo": 0, "gspo": 1, "cispo": 2}


@triton.jit
def policy_token(lp, old, adv, seq_lr, lo, hi, dual_c, HAS_DUAL: tl.constexpr, LOSS: tl.constexpr):
    """ppo_token for each loss type of reference.policy_token_loss (LOSS: LOSS_CODES). Returns (loss,
    d loss/d logp, d loss/d adv, clipped, dual-clipped, neg_log_ratio); d loss / d old_logp is
    -(d loss / d logp) for ppo and 0 for gspo and cispo (their ratio is detached). seq_lr: gspo's
    sequence log-ratio of the token (unused otherwise)."""
    if LOSS == 0:
        return ppo_token(lp, old, adv, lo, hi, dual_c, HAS_DUAL)
    elif LOSS == 1:  # gspo: the clipped surrogate of r = exp(min(seq_lr, 10)), d log r / d logp = 1 inside
        lr, d_lr = clip_elem(seq_lr, tl.full([], float("-inf"), lp.dtype), tl.full([], 10.0, lp.dtype))
        ratio = tl.exp(lr)
        rc, d_rc = clip_elem(ratio, lo, hi)
        pg1 = -adv * ratio
        pg2 = -adv * rc
        take2 = second_wins(pg1, pg2)
        pg = tl.where(take2, pg2, pg1)
        d_lp = tl.where(take2, -adv * d_rc, -adv) * ratio * d_lr
        d_adv = tl.where(take2, -rc, -ratio)
        return pg, d_lp, d_adv, pg2 > pg1, pg < pg, old - lp
    else:  # cispo: -sg(clip(r))·A·logp
        lr, d_lr = clip_elem(lp - old, tl.full([], -20.0, lp.dtype), tl.full([], 20.0, lp.dtype))
        ratio = tl.exp(lr)
        rc, d_rc = clip_elem(ratio, lo, hi)
        return -rc * adv * lp, -rc * adv, -rc * lp, (ratio < lo) | (ratio > hi), lp < lp, -lr


@triton.jit
def _policy_fwd_kernel(lp_ptr, old_ptr, adv_ptr, m_ptr, scale_ptr, dlp_ptr, dadv_ptr, part_ptr, seq_ptr, N, T,
                       lo: "fp64", hi: "fp64", dual_c: "fp64", HAS_DUAL: tl.constexpr,
                       WRITE_DLP: tl.constexpr, WRITE_DADV: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr, LOSS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    lp = tl.load(lp_ptr + offs, mask=inb, other=0).to(ACC)
    old = tl.load(old_ptr + offs, mask=inb, other=0).to(ACC)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0).to(ACC)
    m = tl.load(m_ptr + offs, mask=inb, other=0).to(ACC)
    w = m * tl.load(scale_ptr + offs // T, mask=inb, other=0)
    seq_lr = lp
    if LOSS == 1:
        seq_lr = tl.load(seq_ptr + offs, mask=inb, other=0).to(ACC)
    pg, d_lp, d_adv, clipped, dual, neg_lr = policy_token(
        lp, old, adv, seq_lr, tl.full([], lo, ACC), tl.full([], hi, ACC), tl.full([], dual_c, ACC), HAS_DUAL, LOSS)
    if WRITE_DLP:
        tl.store(dlp_ptr + offs, w * d_lp, mask=inb)
    if WRITE_DADV:
        tl.store(dadv_ptr + offs, w * d_adv, mask=inb)
    tl.store(part_ptr + pid * 4 + 0, tl.sum(w * pg, 0))
    tl.store(part_ptr + pid * 4 + 1, tl.sum(tl.where(clipped, m, 0.0), 0))
    tl.store(part_ptr + pid * 4 + 2, tl.sum(m * neg_lr, 0))
    tl.store(part_ptr + pid * 4 + 3, tl.sum(tl.where(dual, m, 0.0), 0))


@triton.jit
def _value_fwd_kernel(v_ptr, old_ptr, ret_ptr, m_ptr, scale_ptr, dv_ptr, dold_ptr, part_ptr, N, T,
                      clip: "fp64", HAS_CLIP: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    v = tl.load(v_ptr + offs, mask=inb, other=0).to(ACC)
    ret = tl.load(ret_ptr + offs, mask=inb, other=0).to(ACC)
    m = tl.load(m_ptr + offs, mask=inb, other=0).to(ACC)
    w = m * tl.load(scale_ptr + offs // T, mask=inb, other=0)
    e1 = v - ret
    l1 = e1 * e1
    if HAS_CLIP:
        c = tl.full([], clip, ACC)
        old = tl.load(old_ptr + offs, mask=inb, other=0).to(ACC)
        dv_c, in_c = clip_elem(v - old, -c, c)
        e2 = old + dv_c - ret
        l2 = e2 * e2
        take2 = second_wins(l1, l2)  # reference._max(l1, l2): a tie keeps the unclipped loss
        vl = 0.5 * tl.where(take2, l2, l1)
        d_v = tl.where(take2, e2 * in_c, e1)
        d_old = tl.where(take2, e2 * (1.0 - in_c), 0.0)
        clipped = tl.sum(tl.where((l2 > l1) & (in_c == 0), m, 0.0), 0)  # clip active and binding
    else:
        vl = 0.5 * l1
        d_v = e1
        d_old = tl.zeros_like(e1)
        clipped = tl.sum(tl.zeros_like(e1), 0)
    if WRITE_GRAD:  # d / d returns = -(d_v + d_old)
        tl.store(dv_ptr + offs, w * d_v, mask=inb)
        if HAS_CLIP:
            tl.store(dold_ptr + offs, w * d_old, mask=inb)
    tl.store(part_ptr + pid * 4 + 0, tl.sum(w * vl, 0))
    tl.store(part_ptr + pid * 4 + 1, clipped)


def flat_bt(x, agg):
    """[B, T] (any shape for token-mean, seen as [1, N]) contiguous; returns (x, B, T)."""
    if agg == "token-mean" or x.dim() != 2:
        x = x.reshape(1, -1)
    return x.contiguous(), x.shape[0], x.shape[1]


def agg_row_scale(mask2d, agg, dtype):
    """[B] weights: loss = Σ_t loss_t · mask_t · scale[row] reproduces reference.aggregate; also
    returns Σ mask with 0 replaced by 1 (the denominator of the token-mean stats)."""
    n_tok = mask2d.sum(-1, dtype=dtype)
    tot = n_tok.sum()
    tot = torch.where(tot > 0, tot, torch.ones_like(tot))
    B = mask2d.shape[0]
    if agg == "token-mean":
        scale = (1.0 / tot).expand(B)
    else:
        rows = (n_tok > 0).to(dtype).sum()
        scale = (1.0 / torch.where(rows > 0, rows, torch.ones_like(rows))).expand(B)
        if agg == "seq-mean-token-mean":
            scale = scale / n_tok.clamp(min=1)
    return scale.contiguous(), tot


def _mask_arg(mask2d):
    return mask2d if mask2d.dtype != torch.bool else mask2d.view(torch.uint8)


class PPOPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, loss_type, seq_log_ratio):
        dt, acc, _ = acc_dtypes(logp, old_logp, advantages)
        lp, B, T = flat_bt(logp, agg)
        old, adv, m = (flat_bt(x, agg)[0] for x in (old_logp, advantages, mask))
        scale, tot = agg_row_scale(m, agg, dt)
        N = B * T
        n_prog = max(1, triton.cdiv(N, BLOCK))
        write_dlp = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        d_lp = torch.empty(N, dtype=dt, device=lp.device) if write_dlp else scale
        d_adv = torch.empty(N, dtype=dt, device=lp.device) if ctx.needs_input_grad[2] else scale
        part = torch.zeros(n_prog, 4, dtype=dt, device=lp.device)
        if N:
            with _backend.device_guard(lp.device):
                seq = flat_bt(seq_log_ratio, agg)[0] if seq_log_ratio is not None else lp
                _policy_fwd_kernel[(n_prog,)](
                    lp, old, adv, _mask_arg(m), scale, d_lp, d_adv, part, seq, N, T,
                    1.0 - clip_low, 1.0 + (clip_low if clip_high is None else clip_high),
                    float(dual_clip) if dual_clip is not None else 0.0, HAS_DUAL=dual_clip is not None,
                    WRITE_DLP=write_dlp, WRITE_DADV=ctx.needs_input_grad[2], ACC=acc, BLOCK=BLOCK,
                    LOSS=LOSS_CODES[loss_type])
        sums = part.sum(0)
        ctx.save_for_backward(d_lp if write_dlp else None, d_adv if ctx.needs_input_grad[2] else None)
        ctx.shapes_dtypes = [(x.shape, x.dtype) for x in (logp, old_logp, advantages)]
        ctx.old_grad = loss_type == "ppo"  # gspo and cispo detach the ratio: no gradient to old_logp
        clipfrac, approx_kl, dual_frac = sums[1] / tot, sums[2] / tot, sums[3] / tot
        ctx.mark_non_differentiable(clipfrac, approx_kl, dual_frac)
        return sums[0], clipfrac, approx_kl, dual_frac

    @staticmethod
    def backward(ctx, g, *_):
        d_lp, d_adv = ctx.saved_tensors
        (s0, t0), (s1, t1), (s2, t2) = ctx.shapes_dtypes
        gl = g * d_lp if d_lp is not None else None
        return (gl.view(s0).to(t0) if ctx.needs_input_grad[0] else None,
                ((-gl) if ctx.old_grad else torch.zeros_like(gl)).view(s1).to(t1) if ctx.needs_input_grad[1] else None,
                (g * d_adv).view(s2).to(t2) if ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None, None)


class PPOValueLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip, agg):
        dt, acc, _ = acc_dtypes(values, old_values, returns)
        v, B, T = flat_bt(values, agg)
        old, ret, m = (flat_bt(x, agg)[0] for x in (old_values, returns, mask))
        scale, tot = agg_row_scale(m, agg, dt)
        N = B * T
        n_prog = max(1, triton.cdiv(N, BLOCK))
        write = any(ctx.needs_input_grad[:3])
        d_v = torch.empty(N, dtype=dt, device=v.device) if write else scale
        d_old = torch.empty(N, dtype=dt, device=v.device) if write and clip is not None else None
        part = torch.zeros(n_prog, 4, dtype=dt, device=v.device)
        if N:
            with _backend.device_guard(v.device):
                _value_fwd_kernel[(n_prog,)](
                    v, old, ret, _mask_arg(m), scale, d_v, d_old if d_old is not None else d_v, part, N, T,
                    float(clip) if clip is not None else 0.0, HAS_CLIP=clip is not None, WRITE_GRAD=write,
                    ACC=acc, BLOCK=BLOCK)
        sums = part.sum(0)
        ctx.save_for_backward(d_v if write else None, d_old)
        ctx.shapes_dtypes = [(x.shape, x.dtype) for x in (values, old_values, returns)]
        clipfrac = sums[1] / tot if clip is not None else torch.zeros((), dtype=dt, device=v.device)
        ctx.mark_non_differentiable(clipfrac)
        return sums[0], clipfrac

    @staticmethod
    def backward(ctx, g, _):
        d_v, d_old = ctx.saved_tensors
        (s0, t0), (s1, t1), (s2, t2) = ctx.shapes_dtypes
        gv = g * d_v
        go = g * d_old if d_old is not None else None
        gr = -(gv + go) if go is not None else -gv
        return (gv.view(s0).to(t0) if ctx.needs_input_grad[0] else None,
                go.view(s1).to(t1) if go is not None and ctx.needs_input_grad[1] else None,
                gr.view(s2).to(t2) if ctx.needs_input_grad[2] else None,
                None, None, None)


@_backend.register("ppo_policy_loss", "triton")
def ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", loss_type="ppo", seq_log_ratio=None):
    loss, clipfrac, approx_kl, dual_frac = PPOPolicyLossFunction.apply(
        logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, loss_type, seq_log_ratio)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl, "dual_clipfrac": dual_frac}


@_backend.register("ppo_value_loss", "triton")
def ppo_value_loss(values, old_values, returns, mask, clip=0.2, agg="token-mean"):
    loss, clipfrac = PPOValueLossFunction.apply(values, old_values, returns, mask, clip, agg)
    return loss, {"vf_clipfrac": clipfrac}
