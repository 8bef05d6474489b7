"""Group advantages (GRPO, RLOO) and KL-penalised token rewards as Triton kernels.

Group ops: one program per BLOCK_G consecutive groups, a [BLOCK_G, BLOCK_S] tile in registers.
Centering (GRPO without std) and RLOO are linear and self-adjoint (symmetric matrices
I - 11ᵀ/n and n/(n-1)·I - 11ᵀ/(n-1)), so their backward is the same kernel run on the upstream
gradient. GRPO with std has its own backward: with y = s - mean, σ the unbiased std, D = σ + eps,
  d s_j = (g_j - mean(g)) / D - (Σ_i g_i·y_i) · y_j / (D²·(n-1)·σ)
(the σ term is dropped for a constant group, where σ = 0: y = 0 there, so this is the limit, and
torch's std backward, which gives 0 at σ = 0, agrees).

kl_penalized_rewards: one program per row, walking the row backwards in chunks so the last valid
position is found on the way (one read); the forward also writes -β·d kl / d logp, the backward is
a scale, and d score is the upstream gradient at each row's last valid position.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .kl import acc_dtypes, estimator_code, kl_elem

_CENTER, _GRPO_FWD, _GRPO_BWD, _RLOO = 0, 1, 2, 3


@triton.jit
def _group_kernel(x_ptr, g_ptr, out_ptr, G, n, eps: "fp64", MODE: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    grp = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    col = tl.arange(0, BLOCK_S)
    inb = (grp[:, None] < G) & (col[None, :] < n)
    offs = grp[:, None] * n + col[None, :]
    x = tl.load(x_ptr + offs, mask=inb, other=0).to(ACC)
    nf = tl.full([], n, ACC)
    if MODE == 3:  # RLOO: s - (S - s)/(n-1)
        total = tl.sum(x, 1)[:, None]
        out = x - (total - x) / (nf - 1.0)
    else:
        y = tl.where(inb, x - (tl.sum(x, 1) / nf)[:, None], 0.0)
        if MODE == 0:
            out = y
        else:
            sigma = tl.sqrt(tl.sum(y * y, 1) / (nf - 1.0))[:, None]
            d = sigma + tl.full([], eps, ACC)
            if MODE == 1:
                out = y / d
            else:
                g = tl.load(g_ptr + offs, mask=inb, other=0).to(ACC)
                gc = tl.where(inb, g - (tl.sum(g, 1) / nf)[:, None], 0.0)
                gy = tl.sum(g * y, 1)[:, None]
                safe = tl.where(sigma > 0, sigma, 1.0)  # padded tiles and constant groups
                corr = tl.where(sigma > 0, gy / (d * d * (nf - 1.0) * safe), 0.0)
                out = gc / d - corr * y
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)


def _group_launch(x, g, group_size, mode, eps, out_dtype):
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    G = x.numel() // group_size
    if G:
        block_s = triton.next_power_of_2(group_size)
        block_g = max(1, min(64, 2048 // block_s))
        acc = tl.float64 if out_dtype == torch.float64 else tl.float32
        with _backend.device_guard(x.device):
            _group_kernel[(triton.cdiv(G, block_g),)](x, x if g is None else g, out, G, group_size, float(eps),
                                                      MODE=mode, ACC=acc, BLOCK_G=block_g, BLOCK_S=block_s)
    return out


class GroupAdvantageFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, group_size, mode, eps):
        s = scores.contiguous()
        dt = acc_dtypes(scores)[0]
        ctx.save_for_backward(s if mode == _GRPO_FWD else None)
        ctx.group_size, ctx.mode, ctx.eps, ctx.in_dtype = group_size, mode, eps, scores.dtype
        return _group_launch(s, None, group_size, mode, eps, dt)

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        g = g.contiguous()
        if ctx.mode == _GRPO_FWD:
            d = _group_launch(s, g, ctx.group_size, _GRPO_BWD, ctx.eps, g.dtype)
        else:  # self-adjoint
            d = _group_launch(g, None, ctx.group_size, ctx.mode, ctx.eps, g.dtype)
        return d.to(ctx.in_dtype), None, None, None


@_backend.register("grpo_advantages", "triton")
def grpo_advantages(scores, group_size, normalize_std=True, eps=1e-6):
    return GroupAdvantageFunction.apply(scores, group_size, _GRPO_FWD if normalize_std else _CENTER, eps)


@_backend.register("rloo_advantages", "triton")
def rloo_advantages(scores, group_size):
    return GroupAdvantageFunction.apply(scores, group_size, _RLOO, 0.0)


# ----------------------------------------------------------------------------- shaped rewards
@triton.jit
def _kl_rewards_kernel(score_ptr, lp_ptr, ref_ptr, m_ptr, out_ptr, grad_ptr, last_ptr, T, beta: "fp64",
                       EST: tl.constexpr, PLUS: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
                       NTERMS: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    i = tl.arange(0, BLOCK_T)
    b = tl.full([], beta, ACC)
    score = tl.load(score_ptr + row).to(ACC)
    last = tl.full([], -1, tl.int64)
    for start in range(0, T, BLOCK_T):
        t = (T - 1 - start - i).to(tl.int64)  # backwards: the first valid position seen is the last
        inb = t >= 0
        valid = (tl.load(m_ptr + base + t, mask=inb, other=0) != 0) & inb
        lp = tl.load(lp_ptr + base + t, mask=inb, other=0).to(ACC)
        rf = tl.load(ref_ptr + base + t, mask=inb, other=0).to(ACC)
        k, dk = kl_elem(lp - rf, EST, PLUS, NTERMS)
        rew = tl.where(valid, -b * k, 0.0)
        cand = tl.max(tl.where(valid, t, -1), 0)
        is_last = (t == cand) & (last < 0)
        rew = tl.where(is_last, rew + score, rew)
        last = tl.where(last < 0, cand, last)
        tl.store(out_ptr + base + t, rew, mask=inb)
        if WRITE_GRAD:
            tl.store(grad_ptr + base + t, tl.where(valid, -b * dk, 0.0), mask=inb)
    tl.store(last_ptr + row, last)


class KLPenalizedRewardsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, score, logp, ref_logp, mask, beta, estimator):
        dt, acc, nterms = acc_dtypes(score, logp, ref_logp)
        B, T = logp.shape
        lp, rf, sc = logp.contiguous(), ref_logp.contiguous(), score.contiguous()
        m = mask.contiguous()
        m = m.view(torch.uint8) if m.dtype == torch.bool else m
        out = torch.empty(B, T, dtype=dt, device=lp.device)
        write_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad = torch.empty_like(out) if write_grad else out
        last = torch.full((B,), -1, dtype=torch.int64, device=lp.device)
        est, plus = estimator_code(estimator)
        if B and T:
            with _backend.device_guard(lp.device):
                _kl_rewards_kernel[(B,)](sc, lp, rf, m, out, grad, last, T, float(beta), EST=est, PLUS=plus,
                                         WRITE_GRAD=write_grad, ACC=acc, NTERMS=nterms,
                                         BLOCK_T=max(16, min(1024, triton.next_power_of_2(T))))
        ctx.save_for_backward(grad if write_grad else None, last)
        ctx.dtypes = (score.dtype, logp.dtype, ref_logp.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        grad, last = ctx.saved_tensors
        d_score = d_lp = d_ref = None
        if ctx.needs_input_grad[0]:
            at_last = g.gather(1, last.clamp(min=0)[:, None])[:, 0]
            d_score = torch.where(last >= 0, at_last, torch.zeros_like(at_last)).to(ctx.dtypes[0])
        if grad is not None:
            d = g * grad
            d_lp = d.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
            d_ref = (-d).to(ctx.dtypes[2]) if ctx.needs_input_grad[2] else None
        return d_score, d_lp, d_ref, None, None, None


@_backend.register("kl_penalized_rewards", "triton")
def kl_penalized_rewards(score, logp, ref_logp, mask, beta, estimator="k1"):
    return KLPenalizedRewardsFunction.apply(score, logp, ref_logp, mask, beta, estimator)
