"""Per-token KL estimators (k1 / k2 / k3 / abs, "+" straight-through variants, clamp), one fused
elementwise Triton kernel.

The forward writes the value and d value / d logp (d / d ref_logp is its negative for every
estimator, "+" ones included: k2's gradient is antisymmetric too), so the backward is one scale by
the upstream gradient. k3 = expm1(-d) + d is evaluated without libdevice (the interpreter has none):
a Taylor series for |d| < 1/2, exp(-d) - 1 + d beyond, where there is no cancellation to fear.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from ..reference import K3_FLOOR

_EST = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
BLOCK = 1024


def estimator_code(estimator: str) -> tuple[int, bool]:
    """"k3+" -> (2, True): the tl.constexpr id of the estimator and whether it is straight-through."""
    return _EST[estimator.rstrip("+")], estimator.endswith("+")


@triton.jit
def _expm1_minus_x(x, NTERMS: tl.constexpr):
    """expm1(x) - x = Σ_{n>=2} x^n / n! for |x| < 1/2 (Horner), exp(x) - 1 - x elsewhere."""
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    acc = tl.zeros_like(x) + 1.0
    for n in tl.static_range(NTERMS, 2, -1):
        acc = 1.0 + acc * xs / n
    series = 0.5 * xs * xs * acc
    return tl.where(small, series, tl.exp(x) - 1.0 - x)


@triton.jit
def clip_elem(x, lo, hi):
    """reference._clip: (clamp(x, lo, hi), its gradient): the exact ends pass (gradient 1), NaN passes.
    Written with where, not tl.minimum / tl.maximum, which drop NaN."""
    below = x < lo
    above = x > hi
    out = tl.where(below, lo, tl.where(above, hi, x)).to(x.dtype)
    return out, tl.where(below | above, 0.0, 1.0).to(x.dtype)


@triton.jit
def kl_elem(d, EST: tl.constexpr, PLUS: tl.constexpr, NTERMS: tl.constexpr):
    """(kl value, d value / d logp) for d = logp - ref_logp; the estimator's code from estimator_code."""
    if EST == 0:
        out = d
        grad = tl.zeros_like(d) + 1.0
    elif EST == 1:
        out = 0.5 * d * d
        grad = d
    elif EST == 2:
        em = _expm1_minus_x(-d, NTERMS)  # = k3
        out = em
        grad = d - em  # 1 - exp(-d) = -expm1(-d) = -(-d + em)
    else:
        out = tl.abs(d)
        grad = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)
    if PLUS:
        grad = d
    return out, grad


@triton.jit
def _kl_fwd_kernel(lp_ptr, ref_ptr, out_ptr, grad_ptr, N, clamp: "fp64",
                   EST: tl.constexpr, PLUS: tl.constexpr, HAS_CLAMP: tl.constexpr, WRITE_GRAD: tl.constexpr,
                   K3_FLOOR: tl.constexpr, ACC: tl.constexpr, NTERMS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    lp = tl.load(lp_ptr + offs, mask=inb, other=0).to(ACC)
    rf = tl.load(ref_ptr + offs, mask=inb, other=0).to(ACC)
    d = lp - rf
    if HAS_CLAMP and EST == 2:  # reference.kl: k3 under a clamp at max(d, -K3_FLOOR), no exp overflow
        d = tl.where(d < -K3_FLOOR, -K3_FLOOR, d)
    out, grad = kl_elem(d, EST, PLUS, NTERMS)
    if HAS_CLAMP:
        out, d_clip = clip_elem(out, -tl.full([], clamp, ACC), tl.full([], clamp, ACC))
        grad = grad * d_clip
    tl.store(out_ptr + offs, out, mask=inb)
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, grad, mask=inb)


def acc_dtypes(*ts):
    """(torch dtype, tl dtype, series terms) of the math: fp64 if any input is fp64, else fp32."""
    if any(t is not None and t.dtype == torch.float64 for t in ts):
        return torch.float64, tl.float64, 18
    return torch.float32, tl.float32, 10


class KLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, estimator, clamp):
        dt, acc, nterms = acc_dtypes(logp, ref_logp)
        shape = logp.shape
        lp, rf = logp.reshape(-1).contiguous(), ref_logp.reshape(-1).contiguous()
        N = lp.numel()
        out = torch.empty(N, dtype=dt, device=lp.device)
        write_grad = any(ctx.needs_input_grad[:2])
        grad = torch.empty_like(out) if write_grad else out
        est, plus = estimator_code(estimator)
        if N:
            with _backend.device_guard(lp.device):
                _kl_fwd_kernel[(triton.cdiv(N, BLOCK),)](
                    lp, rf, out, grad, N, float(clamp) if clamp is not None else 0.0,
                    EST=est, PLUS=plus, HAS_CLAMP=clamp is not None, WRITE_GRAD=write_grad, K3_FLOOR=K3_FLOOR[dt],
                    ACC=acc, NTERMS=nterms, BLOCK=BLOCK)
        if write_grad:
            ctx.save_for_backward(grad)
        ctx.dtypes = (logp.dtype, ref_logp.dtype)
        return out.view(shape)

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        d = g.reshape(-1) * grad
        d_lp = d.view(g.shape).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        d_ref = (-d).view(g.shape).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return d_lp, d_ref, None, None


@_backend.register("kl", "triton")
def kl(logp, ref_logp, estimator="k3", clamp=None):
    return KLFunction.apply(logp, ref_logp, estimator, clamp)
