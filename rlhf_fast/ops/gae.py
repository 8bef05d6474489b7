"""GAE and REINFORCE++ returns as associative scans (Triton), masked positions skipped.

Forward. Over a row walked backwards in time, the state (A, N) = (running advantage, value of the
next valid position) is updated at a valid t by the affine map
    (A, N) -> (γλ·A + γ·N + r_t - V_t,  V_t)
and left alone at a masked t (the identity). Maps of the form (A, N) -> (p·A + q·N + u, s·N + w)
are closed under composition, so one inclusive `tl.associative_scan` over 5-tuples gives the state
after every position: A_t is the advantage, and the "next valid value" skip semantics (right / left
padding, holes) come for free. Rows are processed in chunks of BLOCK_T (loaded in reversed time
order, so a forward scan runs backwards in time) with the state carried from chunk to chunk.

Backward (the adjoint of reference.gae, as csrc/gae_cpu.cpp gae_bwd_cpu), forwards in time over
valid t: u_t = gA_t + gR_t + γλ·u_prev, d r_t = u_t, d V_t = -u_t + gR_t + γ·u_prev. With the state
(U, X) = (u of the last valid position, u of the valid position before it), a valid t maps
(U, X) -> (γλ·U + gA_t + gR_t, U): maps (U, X) -> (p·U + u, s·U + e·X + w) compose, one more scan.

Math in fp32 (fp64 for fp64 inputs); outputs in values' dtype, gradients in the inputs' dtypes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend


@triton.jit
def _fwd_combine(p1, q1, u1, s1, w1, p2, q2, u2, s2, w2):
    # map 2 after map 1, each (A, N) -> (p·A + q·N + u, s·N + w)
    return p2 * p1, p2 * q1 + q2 * s1, p2 * u1 + q2 * w1 + u2, s2 * s1, s2 * w1 + w2


@triton.jit
def _bwd_combine(p1, u1, s1, e1, w1, p2, u2, s2, e2, w2):
    # map 2 after map 1, each (U, X) -> (p·U + u, s·U + e·X + w)
    return p2 * p1, p2 * u1 + u2, s2 * p1 + e2 * s1, e2 * e1, s2 * u1 + e2 * w1 + w2


@triton.jit
def _gae_fwd_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, T, gamma: "fp64", lam: "fp64",
                    HAS_VALUES: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * T
    i = tl.arange(0, BLOCK_T)
    g = tl.full([], gamma, ACC)
    gl = tl.full([], gamma * lam, ACC)
    zero = tl.zeros([BLOCK_T], ACC)
    one = zero + 1.0
    a_carry = tl.zeros([], ACC)
    n_carry = tl.zeros([], ACC)
    for start in range(0, T, BLOCK_T):
        t = T - 1 - start - i  # reversed time: the forward scan walks backwards
        inb = t >= 0
        valid = (tl.load(m_ptr + base + t, mask=inb, other=0) != 0) & inb
        r = tl.load(r_ptr + base + t, mask=inb, other=0).to(ACC)
        if HAS_VALUES:
            v = tl.load(v_ptr + base + t, mask=inb, other=0).to(ACC)
        else:
            v = zero
        p = tl.where(valid, gl, one)
        q = tl.where(valid, g, zero)
        u = tl.where(valid, r - v, zero)
        s = tl.where(valid, zero, one)
        w = tl.where(valid, v, zero)
        p, q, u, s, w = tl.associative_scan((p, q, u, s, w), 0, _fwd_combine)
        a = p * a_carry + q * n_carry + u
        n = s * n_carry + w
        adv = tl.where(valid, a, zero)
        tl.store(adv_ptr + base + t, adv.to(adv_ptr.dtype.element_ty), mask=inb)
        if HAS_VALUES:
            tl.store(ret_ptr + base + t, tl.where(valid, a + v, zero).to(ret_ptr.dtype.element_ty), mask=inb)
        # out-of-range lanes sit at the end of the chunk and are identities: the last lane is the state
        last = i == BLOCK_T - 1
        a_carry = tl.sum(tl.where(last, a, zero), 0)
        n_carry = tl.sum(tl.where(last, n, zero), 0)


@triton.jit
def _gae_bwd_kernel(ga_ptr, gr_ptr, m_ptr, dr_ptr, dv_ptr, T, gamma: "fp64", lam: "fp64",
                    HAS_GA: tl.constexpr, HAS_GR: tl.constexpr, HAS_VALUES: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * T
    i = tl.arange(0, BLOCK_T)
    g = tl.full([], gamma, ACC)
    gl = tl.full([], gamma * lam, ACC)
    zero = tl.zeros([BLOCK_T], ACC)
    one = zero + 1.0
    u_carry = tl.zeros([], ACC)
    x_carry = tl.zeros([], ACC)
    for start in range(0, T, BLOCK_T):
        t = start + i
        inb = t < T
        valid = (tl.load(m_ptr + base + t, mask=inb, other=0) != 0) & inb
        gr = zero
        if HAS_GR:
            gr = tl.load(gr_ptr + base + t, mask=inb, other=0).to(ACC)
        c = gr
        if HAS_GA:
            c += tl.load(ga_ptr + base + t, mask=inb, other=0).to(ACC)
        p = tl.where(valid, gl, one)
        u = tl.where(valid, c, zero)
        s = tl.where(valid, one, zero)
        e = tl.where(valid, zero, one)
        w = zero
        p, u, s, e, w = tl.associative_scan((p, u, s, e, w), 0, _bwd_combine)
        uu = p * u_carry + u  # u_t
        xx = s * u_carry + e * x_carry + w  # u of the previous valid position
        tl.store(dr_ptr + base + t, tl.where(valid, uu, zero).to(dr_ptr.dtype.element_ty), mask=inb)
        if HAS_VALUES:
            dv = tl.where(valid, -uu + gr + g * xx, zero)
            tl.store(dv_ptr + base + t, dv.to(dv_ptr.dtype.element_ty), mask=inb)
        last = i == BLOCK_T - 1
        u_carry = tl.sum(tl.where(last, uu, zero), 0)
        x_carry = tl.sum(tl.where(last, xx, zero), 0)


def _block_t(T: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(T, 1))))


def _acc_dtype(*ts):
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else tl.float32


def _bool_mask(mask):
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous()


class GAEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, values, mask, gamma, lam):
        # values None: REINFORCE++ returns (values 0; only the advantages are written)
        B, T = rewards.shape
        out_dtype = torch.float64 if _acc_dtype(rewards, values) == tl.float64 else torch.float32
        r = rewards.contiguous()
        v = None if values is None else values.contiguous()
        m = _bool_mask(mask)
        adv = torch.empty(B, T, dtype=out_dtype, device=r.device)
        ret = torch.empty_like(adv) if values is not None else adv
        if B and T:
            with _backend.device_guard(r.device):
                _gae_fwd_kernel[(B,)](r, r if v is None else v, m, adv, ret, T, float(gamma), float(lam),
                                      HAS_VALUES=v is not None, ACC=_acc_dtype(rewards, values),
                                      BLOCK_T=_block_t(T))
        ctx.save_for_backward(m)
        ctx.gamma, ctx.lam = float(gamma), float(lam)
        ctx.r_dtype = rewards.dtype
        ctx.v_dtype = None if values is None else values.dtype
        ctx.acc = _acc_dtype(rewards, values)
        if values is None:
            return adv
        return adv, ret

    @staticmethod
    def backward(ctx, g_adv, g_ret=None):
        (m,) = ctx.saved_tensors
        B, T = m.shape
        has_values = ctx.v_dtype is not None
        d_rew = torch.empty(B, T, dtype=ctx.r_dtype, device=m.device)
        d_val = torch.empty(B, T, dtype=ctx.v_dtype, device=m.device) if has_values else None
        ga = None if g_adv is None else g_adv.contiguous()
        gr = None if g_ret is None else g_ret.contiguous()
        if B and T:
            with _backend.device_guard(m.device):
                _gae_bwd_kernel[(B,)](ga if ga is not None else d_rew, gr if gr is not None else d_rew, m, d_rew,
                                      d_val if has_values else d_rew, T, ctx.gamma, ctx.lam,
                                      HAS_GA=ga is not None, HAS_GR=gr is not None, HAS_VALUES=has_values,
                                      ACC=ctx.acc, BLOCK_T=_block_t(T))
        return d_rew, d_val, None, None, None


@_backend.register("gae", "triton")
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    return GAEFunction.apply(rewards, values, mask, gamma, lam)


@_backend.register("reinforce_pp_returns", "triton")
def reinforce_pp_returns(rewards, mask, gamma=1.0):
    return GAEFunction.apply(rewards, None, mask, gamma, 1.0)
