"""PPO policy loss straight from the logits (+ KL and entropy terms), fused in Triton.

Forward: one program per token row reads its logits once (online max / sum-exp / Σ e·(z - max) in
BLOCK_V chunks, so any V fits without spilling), giving logp and entropy, then computes the clipped
policy loss, the KL estimate and the aggregation weight in registers. Per token it writes the loss
terms (a [N, 8] buffer that torch sums: deterministic) and the scalars the backward needs:
g_lp = d loss / d logp, g_ent = d loss / d entropy (both already scaled by the aggregation
weight), the raw row max m and log_s = log Σ exp((x - m)/T) (lse = m/T + log_s
kept in two parts, for huge logits), and the entropy. No [N, V] tensor is allocated in the forward.

Backward: one more read of the logits and one write of grad_logits (recomputing p = exp(z - lse)):
  grad_z = G·(g_lp·(onehot - p) - g_ent·p·(z - lse + H)),   grad_x = grad_z / temperature,
with G the upstream gradient of the scalar loss (read on device). Recomputing costs one read of the
logits; writing grad_logits in the forward instead would cost a write plus a read and write in the
backward, and an [N, V] buffer held between them. d old_logp, d advantages, d ref_logp are per-token
scalars saved by the forward and scaled by G.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .kl import acc_dtypes, estimator_code, kl_elem
from .ppo_loss import _mask_arg, agg_row_scale, flat_bt, ppo_token

MAX_BLOCK_V = 4096  # chunk of the vocabulary held in registers (tests lower it to exercise the loop)
_NS, _NG = 8, 8  # columns of the per-token stats and gradient buffers


@triton.jit
def _fwd_kernel(x_ptr, stride_x, lab_ptr, old_ptr, adv_ptr, ref_ptr, m_ptr, scale_ptr, stats_ptr, grads_ptr,
                V, T, inv_t: "fp64", lo: "fp64", hi: "fp64", dual_c: "fp64", kl_coef: "fp64", ent_coef: "fp64",
                HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, EST: tl.constexpr, PLUS: tl.constexpr,
                ACC: tl.constexpr, NTERMS: tl.constexpr, BLOCK_V: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    row = x_ptr + n * stride_x
    it = tl.full([], inv_t, ACC)
    cols = tl.arange(0, BLOCK_V)
    # the max is taken over the raw logits x (temperature > 0 commutes with it) and z - max formed as
    # (x - max)·(1/T): exact subtraction first, so huge logits lose nothing to the temperature product
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)  # Σ exp(z - m/T)
    t = tl.zeros([], ACC)  # Σ exp(z - m/T)·(z - m/T)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(row + c, mask=c < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        fin = x > float("-inf")
        zm = tl.where(fin, (x - m_new) * it, 0.0)
        e = tl.where(fin, tl.exp(zm), 0.0)
        # rescale the running sums to the new max (nothing to rescale while they are empty)
        shift = tl.where(s > 0, (m - m_new) * it, 0.0)
        alpha = tl.exp(shift)
        t = alpha * (t + shift * s) + tl.sum(e * zm, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    label = tl.load(lab_ptr + n)
    ignored = label == -100
    x_lab = tl.load(row + tl.where(ignored, 0, label)).to(ACC)
    logp = tl.where(ignored, 0.0, (x_lab - m) * it - log_s)
    ent = tl.where(ignored, 0.0, log_s - t / s)

    old = tl.load(old_ptr + n).to(ACC)
    adv = tl.load(adv_ptr + n).to(ACC)
    mk = tl.load(m_ptr + n).to(ACC)
    w = mk * tl.load(scale_ptr + n // T)
    pg, d_lp, d_adv, clipped, dual, neg_lr = ppo_token(
        logp, old, adv, tl.full([], lo, ACC), tl.full([], hi, ACC), tl.full([], dual_c, ACC), HAS_DUAL)
    g_lp = w * d_lp
    k = tl.zeros([], ACC)
    d_ref = tl.zeros([], ACC)
    if HAS_REF:
        rf = tl.load(ref_ptr + n).to(ACC)
        k, dk = kl_elem(logp - rf, EST, PLUS, NTERMS)
        g_kl = tl.where(kl_coef != 0, w * tl.full([], kl_coef, ACC) * dk, 0.0)  # no 0·NaN: KL only a stat
        g_lp += g_kl
        d_ref = -g_kl
    g_ent = -w * tl.full([], ent_coef, ACC)
    st = stats_ptr + n * 8
    tl.store(st + 0, w * pg)
    tl.store(st + 1, w * ent)
    tl.store(st + 2, w * k)
    tl.store(st + 3, tl.where(clipped, mk, 0.0))
    tl.store(st + 4, mk * neg_lr)
    tl.store(st + 5, tl.where(dual, mk, 0.0))
    gr = grads_ptr + n * 8
    tl.store(gr + 0, tl.where(ignored, 0.0, g_lp))  # an ignored label's logp is the constant 0
    tl.store(gr + 1, tl.where(ignored, 0.0, g_ent))
    tl.store(gr + 2, m)  # lse = m/T + log_s, kept apart: (x - m)/T - log_s is accurate for huge x
    tl.store(gr + 7, log_s)
    tl.store(gr + 3, ent)
    tl.store(gr + 4, -w * d_lp)  # d old_logp
    tl.store(gr + 5, w * d_adv)
    tl.store(gr + 6, d_ref)


@triton.jit
def _bwd_kernel(x_ptr, stride_x, lab_ptr, grads_ptr, G_ptr, dx_ptr, stride_dx, V, inv_t: "fp64",
                ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    row = x_ptr + n * stride_x
    it = tl.full([], inv_t, ACC)
    G = tl.load(G_ptr).to(ACC)
    gr = grads_ptr + n * 8
    g_lp = G * tl.load(gr + 0)
    g_ent = G * tl.load(gr + 1)
    m = tl.load(gr + 2)
    log_s = tl.load(gr + 7)
    ent = tl.load(gr + 3)
    label = tl.load(lab_ptr + n)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        inb = c < V
        x = tl.load(row + c, mask=inb, other=float("-inf")).to(ACC)
        fin = x > float("-inf")
        zl = tl.where(fin, (x - m) * it - log_s, 0.0)  # log p
        p = tl.where(fin, tl.exp(zl), 0.0)
        onehot = (c == label).to(ACC)
        gz = g_lp * (onehot - p) - g_ent * p * (zl + ent)
        tl.store(dx_ptr + n * stride_dx + c, (gz * it).to(dx_ptr.dtype.element_ty), mask=inb)


def _block_v(V):
    return max(16, min(MAX_BLOCK_V, triton.next_power_of_2(V)))


class PPOLossFromLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator, entropy_coef,
                temperature, clip_low, clip_high, dual_clip, agg):
        dt, acc, nterms = acc_dtypes(logits, old_logp, advantages, ref_logp)
        V = logits.shape[-1]
        x = logits.reshape(-1, V)
        if x.stride(-1) != 1:
            x = x.contiguous()
        old, B, T = flat_bt(old_logp, agg)
        adv, m = flat_bt(advantages, agg)[0], flat_bt(mask, agg)[0]
        rf = flat_bt(ref_logp, agg)[0] if ref_logp is not None else old
        lab = labels.reshape(-1).contiguous()
        scale, tot = agg_row_scale(m, agg, dt)
        N = x.shape[0]
        stats = torch.zeros(N, _NS, dtype=dt, device=x.device)
        grads = torch.zeros(N, _NG, dtype=dt, device=x.device)
        has_ref = ref_logp is not None
        use_kl = has_ref and bool(kl_coef)
        est, plus = estimator_code(kl_estimator)
        if N:
            _fwd_kernel[(N,)](
                x, x.stride(0), lab, old, adv, rf, _mask_arg(m), scale, stats, grads, V, T, 1.0 / temperature,
                1.0 - clip_low, 1.0 + (clip_low if clip_high is None else clip_high),
                float(dual_clip) if dual_clip is not None else 0.0, float(kl_coef) if use_kl else 0.0,
                float(entropy_coef), HAS_DUAL=dual_clip is not None, HAS_REF=has_ref, EST=est, PLUS=plus,
                ACC=acc, NTERMS=nterms, BLOCK_V=_block_v(V))
        sums = stats.sum(0)
        pg_loss, ent = sums[0], sums[1]
        loss = pg_loss.clone()
        if entropy_coef:
            loss = loss - entropy_coef * ent
        if use_kl:
            loss = loss + kl_coef * sums[2]
        out = [pg_loss, sums[3] / tot, sums[4] / tot, sums[5] / tot, ent, sums[2]]
        ctx.save_for_backward(x, lab, grads)
        ctx.inv_t, ctx.acc = 1.0 / temperature, acc
        ctx.meta = [(t.shape, t.dtype) if t is not None else None
                    for t in (logits, old_logp, advantages, ref_logp)]
        ctx.use_kl = use_kl
        ctx.mark_non_differentiable(*out)
        return (loss, *out)

    @staticmethod
    def backward(ctx, G, *_):
        x, lab, grads = ctx.saved_tensors
        (ls, ldt), (os_, odt), (as_, adt), rmeta = ctx.meta
        need = ctx.needs_input_grad
        d_logits = d_old = d_adv = d_ref = None
        G = G.reshape(1).to(grads.dtype)
        if need[0]:
            d_logits = torch.empty(x.shape, dtype=ldt, device=x.device)
            if x.shape[0]:
                _bwd_kernel[(x.shape[0],)](x, x.stride(0), lab, grads, G, d_logits, d_logits.stride(0), x.shape[1],
                                           ctx.inv_t, ACC=ctx.acc, BLOCK_V=_block_v(x.shape[1]))
            d_logits = d_logits.view(ls)
        if need[2]:
            d_old = (G * grads[:, 4]).view(os_).to(odt)
        if need[3]:
            d_adv = (G * grads[:, 5]).view(as_).to(adt)
        if need[5] and ctx.use_kl:
            d_ref = (G * grads[:, 6]).view(rmeta[0]).to(rmeta[1])
        return d_logits, None, d_old, d_adv, None, d_ref, *([None] * 8)


@_backend.register("ppo_loss_from_logits", "triton")
def ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, ref_logp=None, kl_coef=0.0,
                         kl_estimator="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2,
                         clip_high=None, dual_clip=None, agg="token-mean"):
    loss, pg_loss, clipfrac, approx_kl, dual_frac, ent, k = PPOLossFromLogitsFunction.apply(
        logits, labels, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator, entropy_coef,
        temperature, clip_low, clip_high, dual_clip, agg)
    stats = {"clipfrac": clipfrac, "approx_kl": approx_kl, "dual_clipfrac": dual_frac, "pg_loss": pg_loss,
             "entropy": ent}
    if ref_logp is not None:
        stats["kl"] = k
    return loss, stats
