"""PPO policy loss straight from the logits (+ KL and entropy terms), fused in Triton.

Forward: the row pass of ops/logprobs.py (_row_triple: 16-byte groups in the row's index space with running
max / sum-exp / Σ e·(x - max), read with loads inside aligned 16-byte packs whatever the row's phase — a
group straddling two packs is cut out in registers — the row split over programs by V alone and merged in
a fixed order) gives logp and entropy; the row's last program then computes the clipped policy loss, the
KL estimate and the aggregation weight in registers. Per token it writes the loss terms (a [N, 8] buffer
that torch sums: deterministic) and the scalars the backward needs: g_lp = d loss / d logp, g_ent = d loss /
d entropy (both already scaled by the aggregation weight), the raw row max m and log_s = log Σ exp((x - m)/T)
(lse = m/T + log_s kept in two parts, for huge logits), and the entropy. No [N, V] tensor is allocated in
the forward.

Backward: one more read of the logits and one write of grad_logits (recomputing p = exp(z - lse)):
  grad_z = G·(g_lp·(onehot - p) - g_ent·p·(z - lse + H)),   grad_x = grad_z / temperature,
with G the upstream gradient of the scalar loss (read on device). Recomputing costs one read of the
logits; writing grad_logits in the forward instead would cost a write plus a read and write in the
backward, and an [N, V] buffer held between them. d old_logp, d advantages, d ref_logp are per-token
scalars saved by the forward and scaled by G.

Rows as in ops/logprobs.py: [B, T, V] views with any leading strides read in place, NaN propagating
to its row, ignored rows (label -100) never read in either pass (zero gradient row), out-of-range
labels giving a NaN row. The row pass runs in the logits' math dtype (fp32; fp64 only for fp64
logits, as the CUDA kernels), the per-token math in fp64 if any per-token input is fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend, _layout
from .._layout import logits_rows
from .kl import acc_dtypes, estimator_code, kl_elem
from . import logprobs as _tlp
from .ppo_loss import _mask_arg, agg_row_scale, flat_bt, ppo_token

MAX_BLOCK_V = 2048  # columns of one chunk for bf16 (tests lower it to exercise the loop); see _tlp.row_launch
_NS, _NG = 8, 8  # columns of the per-token stats and gradient buffers


@triton.jit
def _fwd_kernel(x_ptr, XT, xs0, xs1, phase0, lab_ptr, old_ptr, adv_ptr, ref_ptr, m_ptr, scale_ptr, stats_ptr,
                grads_ptr, part_ptr, count_ptr, V, T, inv_t: "fp64", c2: "fp64", lo: "fp64", hi: "fp64",
                dual_c: "fp64", kl_coef: "fp64", ent_coef: "fp64", HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr,
                EST: tl.constexpr, PLUS: tl.constexpr, ROW_ACC: tl.constexpr, ACC: tl.constexpr,
                NTERMS: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr, SPAN: tl.constexpr,
                SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, ALIGNED: tl.constexpr, FAST: tl.constexpr):
    # logits [B, XT, V] with strides (xs0, xs1, 1); grid (N, SPLIT): program (n, k) reads the columns
    # [k·SPAN, (k+1)·SPAN) of row n and the last of a row's programs does the per-token math. The row pass in
    # ROW_ACC (the logits' math dtype), the per-token math in ACC (fp64 if any per-token input is)
    n = tl.program_id(0).to(tl.int64)
    row_off = (n // XT) * xs0 + (n % XT) * xs1
    it = tl.full([], inv_t, ROW_ACC)
    label = tl.load(lab_ptr + n)
    ignored = label == -100
    m = tl.zeros([], ROW_ACC)
    log_s = tl.zeros([], ROW_ACC)
    logp = tl.zeros([], ROW_ACC)
    ent = tl.zeros([], ROW_ACC)
    go = tl.program_id(1) == 0
    if (label >= 0) & (label < V):
        # the max is taken over the raw logits x (temperature > 0 commutes with it) and z - max formed as
        # (x - max)·(1/T): exact subtraction first, so huge logits lose nothing to the temperature product
        go, m, s, t = _tlp._row_triple(x_ptr, n, row_off, phase0, V, tl.full([], c2, ROW_ACC), part_ptr, count_ptr,
                                       ROW_ACC, VEC, BLOCK_V, SPAN, SPLIT, SPLIT_P2, ALIGNED, FAST)
        x_lab = tl.load(x_ptr + row_off + label).to(ROW_ACC)
        log_s = tl.log(s)
        logp = (x_lab - m) * it - log_s
        ent = log_s - (t * it) / s
    elif label != -100:  # out-of-range label (no host check ran): a NaN row, nothing read
        m = tl.full([], float("nan"), ROW_ACC)
        log_s = m
        logp = m
        ent = m
    # ignored rows are not read: logp = H = 0 and a zero gradient row
    if go:
        _token(n, T, ignored, m, log_s, logp.to(ACC), ent.to(ACC), old_ptr, adv_ptr, ref_ptr, m_ptr, scale_ptr,
               stats_ptr, grads_ptr, lo, hi, dual_c, kl_coef, ent_coef, HAS_DUAL, HAS_REF, EST, PLUS, ACC, NTERMS)


@triton.jit
def _token(n, T, ignored, m, log_s, logp, ent, old_ptr, adv_ptr, ref_ptr, m_ptr, scale_ptr, stats_ptr, grads_ptr,
           lo, hi, dual_c, kl_coef, ent_coef, HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, EST: tl.constexpr,
           PLUS: tl.constexpr, ACC: tl.constexpr, NTERMS: tl.constexpr):
    """The per-token math of one row given its logp and entropy; writes its stats and gradient scalars."""
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
    tl.store(gr + 2, m.to(ACC))  # lse = m/T + log_s, kept apart: (x - m)/T - log_s is accurate for huge x
    tl.store(gr + 7, log_s.to(ACC))
    tl.store(gr + 3, ent)
    tl.store(gr + 4, -w * d_lp)  # d old_logp
    tl.store(gr + 5, w * d_adv)
    tl.store(gr + 6, d_ref)


@triton.jit
def _bwd_kernel(x_ptr, XT, xs0, xs1, phase0, lab_ptr, grads_ptr, G_ptr, dx_ptr, ds0, ds1, V, inv_t: "fp64",
                ROW_ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr, SPAN: tl.constexpr,
                SPLIT: tl.constexpr, SAME: tl.constexpr, FAST: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    x_off = (n // XT) * xs0 + (n % XT) * xs1
    d_off = (n // XT) * ds0 + (n % XT) * ds1
    label = tl.load(lab_ptr + n)
    if label == -100:  # ignored: a zero row, the logits not read
        _tlp._fill_row(dx_ptr, d_off, V, 0.0, ROW_ACC, BLOCK_V)
    elif (label < 0) | (label >= V):  # out-of-range label: a NaN row, the logits not read
        _tlp._fill_row(dx_ptr, d_off, V, float("nan"), ROW_ACC, BLOCK_V)
    else:
        it = tl.full([], inv_t, ROW_ACC)
        G = tl.load(G_ptr)
        gr = grads_ptr + n * 8
        a = (G * tl.load(gr + 0)).to(ROW_ACC) * it  # grad_x = grad_z / T: 1/T folded into the coefficients
        b = (G * tl.load(gr + 1)).to(ROW_ACC) * it
        m = tl.load(gr + 2).to(ROW_ACC)
        log_s = tl.load(gr + 7).to(ROW_ACC)
        ent = tl.load(gr + 3).to(ROW_ACC)
        # log p = (x - m)/T - log_s in log2 units: p = 2^((x - m)·c2 - log2 Σ), b·(log p + H) = b·ln2·(log2 p + H·log2 e)
        log2e = tl.full([], 1.4426950408889634, ROW_ACC)  # tl.full: an fp64 constant stays fp64
        _tlp._grad_row(x_ptr, x_off, dx_ptr, d_off, phase0, V, label, m, log_s * log2e, it * log2e, a,
                       b * tl.full([], 0.6931471805599453, ROW_ACC), ent * log2e, ROW_ACC, VEC, BLOCK_V, SPAN, SPLIT, SAME, True, FAST)


def launch_fwd(x, lab, old, adv, ref, mask, scale, stats, grads, T, inv_t, lo, hi, dual_c, kl_coef, ent_coef,
               **constexprs):
    """_fwd_kernel over the rows of the [B, XT, V] view x (unit stride over V; N = B·XT > 0 rows): grid (N, SPLIT)
    and the row constants of _tlp.row_launch; T the length of a scale row (scale[n // T])."""
    N, V = x.shape[0] * x.shape[1], x.shape[2]
    kw = _tlp.row_launch(V, x, MAX_BLOCK_V)
    phase0, split = kw.pop("phase0"), kw["SPLIT"]
    part = torch.empty(N * split * 3 if split > 1 else 1, device=x.device,
                       dtype=torch.float64 if constexprs["ROW_ACC"] == tl.float64 else torch.float32)  # row triples
    count = torch.zeros(N if split > 1 else 1, dtype=torch.int32, device=x.device)
    _fwd_kernel[(N, split)](x, x.shape[1], x.stride(0), x.stride(1), phase0, lab, old, adv, ref, mask, scale, stats,
                            grads, part, count, V, T, inv_t, _tlp._LOG2E * inv_t, lo, hi, dual_c, kl_coef, ent_coef,
                            SPLIT_P2=triton.next_power_of_2(split), ALIGNED=_tlp._aligned_rows(x, phase0, kw["VEC"]),
                            **constexprs, **kw)


def launch_bwd(x, lab, grads, G, out, inv_t, row_acc):
    """_bwd_kernel: grad logits of the [B, XT, V] view x into the [B, XT, V] view out (may be x itself)."""
    N, V = x.shape[0] * x.shape[1], x.shape[2]
    kw = _tlp.row_launch(V, x, MAX_BLOCK_V)
    phase0 = kw.pop("phase0")
    same = out.stride()[:2] == x.stride()[:2] and (out.data_ptr() - x.data_ptr()) % 16 == 0
    _bwd_kernel[(N, kw["SPLIT"])](x, x.shape[1], x.stride(0), x.stride(1), phase0, lab, grads, G, out, out.stride(0),
                                  out.stride(1), V, inv_t, ROW_ACC=row_acc, SAME=same, **kw)


class PPOLossFromLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator, entropy_coef,
                temperature, clip_low, clip_high, dual_clip, agg):
        dt, acc, nterms = acc_dtypes(logits, old_logp, advantages, ref_logp)
        row_acc = tl.float64 if logits.dtype == torch.float64 else tl.float32  # as the CUDA kernels
        x = _tlp.as_rows(logits_rows(logits))  # [B, T, V] view of the logits: no copy of a time slice
        old, B, T = flat_bt(old_logp, agg)
        adv, m = flat_bt(advantages, agg)[0], flat_bt(mask, agg)[0]
        rf = flat_bt(ref_logp, agg)[0] if ref_logp is not None else old
        lab = labels.reshape(-1).contiguous()
        scale, tot = agg_row_scale(m, agg, dt)
        N = x.shape[0] * x.shape[1]
        stats = torch.zeros(N, _NS, dtype=dt, device=x.device)
        grads = torch.zeros(N, _NG, dtype=dt, device=x.device)
        has_ref = ref_logp is not None
        use_kl = has_ref and bool(kl_coef)
        est, plus = estimator_code(kl_estimator)
        if N:
            with _backend.device_guard(x.device):
                launch_fwd(x, lab, old, adv, rf, _mask_arg(m), scale, stats, grads, T, 1.0 / temperature,
                           1.0 - clip_low, 1.0 + (clip_low if clip_high is None else clip_high),
                           float(dual_clip) if dual_clip is not None else 0.0, float(kl_coef) if use_kl else 0.0,
                           float(entropy_coef), HAS_DUAL=dual_clip is not None, HAS_REF=has_ref, EST=est, PLUS=plus,
                           ROW_ACC=row_acc, ACC=acc, NTERMS=nterms)
        sums = stats.sum(0)
        pg_loss, ent = sums[0], sums[1]
        loss = pg_loss.clone()
        if entropy_coef:
            loss = loss - entropy_coef * ent
        if use_kl:
            loss = loss + kl_coef * sums[2]
        out = [pg_loss, sums[3] / tot, sums[4] / tot, sums[5] / tot, ent, sums[2]]
        ctx.save_for_backward(x, lab, grads)
        ctx.inv_t, ctx.row_acc = 1.0 / temperature, row_acc
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
            d_logits = _layout.grad_like(x)  # the logits' own strides: rows share their 16-byte phase
            B, T, V = x.shape
            if B * T:
                with _backend.device_guard(x.device):
                    launch_bwd(x, lab, grads, G, d_logits, ctx.inv_t, ctx.row_acc)
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
