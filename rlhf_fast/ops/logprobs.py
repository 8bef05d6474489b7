"""logprobs in Triton: log softmax(logits / T)[label] and the entropy, without an [N, V] temporary.

Forward: one program per row reads the row once in BLOCK_V chunks, keeping an online max m,
s = Σ e^{z-m} and t = Σ e^{z-m}·(z-m) (both rescaled when m moves; same formulation as
csrc/logprobs_cpu.cpp), and the label's logit; it writes logp = z_y - lse, H = log s - t/s and
lse = m + log s per row. Backward: one read and one write of [N, V], p recomputed from lse:
grad_z = g_lp·(onehot - p) - g_ent·p·(z - lse + H), grad_x = grad_z / T — optionally written into
the logits buffer itself (``logprobs_inplace_backward``).

Logits are [B, T, V] with any strides over B and T (row r at (r // T)·s0 + (r % T)·s1, see
rlhf_fast/_layout.py), so a time slice ``logits[:, :-1]`` is read in place; grad logits take the
logits' strides. Row contract: a NaN logit makes the row's outputs NaN; an ignored row is not read
(0, 0, zero gradient); a label outside [0, V) (no host check ran) gives a NaN row, not read.

fp16/bf16/fp32 logits are upcast to fp32 right after the load; fp64 logits are computed in fp64
(the ``ACC`` constexpr). Outputs are fp32 (fp64 for fp64 logits); grad logits in the logits dtype.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .. import _backend, _layout

_MAX_BLOCK_V = 4096  # never a whole row in registers: V up to 262k is looped over


@triton.jit
def _row_offset(row, T, s0, s1):
    """Offset of row `row` of a [B, T, V] view with strides (s0, s1, 1)."""
    return (row // T) * s0 + (row % T) * s1


@triton.jit
def _logprobs_fwd_kernel(x_ptr, T, s0, s1, labels_ptr, logp_ptr, ent_ptr, lse_ptr, V, ignore_index,
                         inv_t_hi, inv_t_lo, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:  # not read at all
        tl.store(logp_ptr + row, tl.zeros([], ACC))
        tl.store(ent_ptr + row, tl.zeros([], ACC))
        tl.store(lse_ptr + row, tl.zeros([], ACC))
    elif (label < 0) | (label >= V):  # out of range (no host check ran): the row is NaN, nothing is read
        nan = tl.full([], float("nan"), ACC)
        tl.store(logp_ptr + row, nan)
        tl.store(ent_ptr + row, nan)
        tl.store(lse_ptr + row, nan)
    else:
        # 1/T as an fp32 pair: exact enough for fp64 rows (float kernel arguments are fp32)
        inv_t = (tl.zeros([], ACC) + inv_t_hi) + inv_t_lo
        x_row = x_ptr + _row_offset(row, T, s0, s1)
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([], float("-inf"), ACC)   # running max (never 0: all-negative rows)
        s = tl.zeros([BLOCK_V], ACC)           # per lane Σ e^{z-m}, m the row's running max
        t = tl.zeros([BLOCK_V], ACC)           # per lane Σ e^{z-m}·(z-m)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            z = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(ACC) * inv_t
            # NaN needs no special case: whatever the max makes of it, its e = exp(NaN) turns s into NaN
            m_new = tl.maximum(m, tl.max(z, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite while the row is all -inf
            d = tl.where(m == float("-inf"), 0.0, m - m_ref)     # s = t = 0 while m is -inf
            scale = tl.exp(d)
            t = scale * (t + d * s)
            s = scale * s
            w = z - m_ref
            e = tl.exp(w)
            s += e
            t += e * tl.where(w == float("-inf"), 0.0, w)  # e·(z-m) is 0, not nan, at -inf
            m = m_new
        z_label = tl.load(x_row + label).to(ACC) * inv_t  # once, outside the loop
        s_row = tl.sum(s, 0)
        log_s = tl.log(s_row)
        lse = m + log_s
        tl.store(logp_ptr + row, z_label - lse)
        tl.store(ent_ptr + row, log_s - tl.sum(t, 0) / s_row)
        tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(x_ptr, T, s0, s1, g_ptr, g0, g1, labels_ptr, glp_ptr, gent_ptr, lse_ptr, ent_ptr,
                         V, ignore_index, inv_t_hi, inv_t_lo, HAS_GENT: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_V: tl.constexpr):
    # g_ptr may be x_ptr (in-place): each element is read before it is written, by the same program
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    g_row = g_ptr + _row_offset(row, T, g0, g1)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        for start in range(0, V, BLOCK_V):
            c = start + cols
            tl.store(g_row + c, tl.zeros([BLOCK_V], ACC).to(g_ptr.dtype.element_ty), mask=c < V)
    elif (label < 0) | (label >= V):  # out-of-range label: a NaN row, the logits not read
        for start in range(0, V, BLOCK_V):
            c = start + cols
            tl.store(g_row + c, tl.full([BLOCK_V], float("nan"), ACC).to(g_ptr.dtype.element_ty), mask=c < V)
    else:
        inv_t = (tl.zeros([], ACC) + inv_t_hi) + inv_t_lo
        a = tl.load(glp_ptr + row).to(ACC) * inv_t
        b = tl.zeros([], ACC)
        if HAS_GENT:
            b = tl.load(gent_ptr + row).to(ACC) * inv_t
        lse = tl.load(lse_ptr + row).to(ACC)
        h = tl.load(ent_ptr + row).to(ACC)
        x_row = x_ptr + _row_offset(row, T, s0, s1)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            z = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(ACC) * inv_t
            w = z - lse
            p = tl.exp(w)
            w = tl.where(w == float("-inf"), 0.0, w)  # p·(z - lse) is 0, not nan, at -inf
            g = tl.where(c == label, a, 0.0) - a * p - b * p * (w + h)
            tl.store(g_row + c, g.to(g_ptr.dtype.element_ty), mask=c < V)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]  # rounded to fp32 on the host: no tensor, no sync


def _split(inv_t: float) -> tuple[float, float]:
    hi = _f32(inv_t)
    return hi, _f32(inv_t - hi)


def _launch_params(V: int, dtype: torch.dtype) -> dict:
    block = min(_MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
    return dict(ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK_V=block,
                num_warps=8 if block >= 2048 else 4)


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] or [B, T, V] (unit stride over V) -> the [B, T, V] view the kernels index."""
    x = logits.unsqueeze(0) if logits.dim() == 2 else logits
    assert x.dim() == 3 and (x.stride(2) == 1 or x.shape[2] <= 1 or x.numel() == 0), \
        "logits: [N, V] or [B, T, V] with unit stride over V"
    return x


def logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, ignore_index: int):
    """logits [N, V] or [B, T, V] (any leading strides, unit stride over V), labels [N = B·T] int64
    -> logp, entropy, lse [N] (fp32; fp64 for fp64 logits).

    Same contract as torch.ops.rlhf_fast.logprobs_fwd: ignored rows give 0, 0, 0; rows whose label is
    neither ignore_index nor in [0, V) give NaN and are not read."""
    x = as_rows(logits)
    B, T, V = x.shape
    N = B * T
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp, ent, lse = (torch.empty(N, dtype=dt, device=logits.device) for _ in range(3))
    if N:
        hi, lo = _split(inv_temperature)
        with _backend.device_guard(x.device):
            _logprobs_fwd_kernel[(N,)](x, T, x.stride(0), x.stride(1), labels.reshape(-1).contiguous(), logp, ent,
                                       lse, V, ignore_index, hi, lo, **_launch_params(V, x.dtype))
    return logp, ent, lse


def logprobs_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature: float,
                 ignore_index: int, out: torch.Tensor | None = None):
    """grad logits in the logits dtype, shape and strides (contract of torch.ops.rlhf_fast.logprobs_bwd;
    NaN rows for out-of-range labels); grad_logp / grad_entropy [N] or None. ``out`` (may be ``logits``
    itself) receives the gradient."""
    x = as_rows(logits)
    B, T, V = x.shape
    N = B * T
    if out is None:
        out = _layout.grad_like(logits)
    o = as_rows(out)
    if N:
        hi, lo = _split(inv_temperature)
        glp = torch.zeros_like(lse) if grad_logp is None else grad_logp.reshape(-1).contiguous()
        gent = glp if grad_entropy is None else grad_entropy.reshape(-1).contiguous()  # unread without HAS_GENT
        with _backend.device_guard(x.device):
            _logprobs_bwd_kernel[(N,)](x, T, x.stride(0), x.stride(1), o, o.stride(0), o.stride(1),
                                       labels.reshape(-1).contiguous(), glp, gent, lse, entropy, V, ignore_index,
                                       hi, lo, HAS_GENT=grad_entropy is not None, **_launch_params(V, x.dtype))
    return out


class LogprobsFunction(torch.autograd.Function):
    """(logits [N, V] or [B, T, V], labels [N]) -> (logp [N], entropy [N]); saves the logits and two [N]
    statistics.

    ``inplace_backward=True`` writes grad logits into the logits buffer (no second [N, V]); the
    logits' version counter is bumped, so any other use of them in the graph fails loudly."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, inplace_backward):
        inv_t = 1.0 / temperature
        logp, ent, lse = logprobs_fwd(logits, labels, inv_t, ignore_index)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.inv_t, ctx.ignore_index, ctx.inplace = inv_t, ignore_index, inplace_backward
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, labels, lse, ent = ctx.saved_tensors
        out = logits.detach() if ctx.inplace else None
        grad = logprobs_bwd(g_logp, g_ent, logits, labels, lse, ent, ctx.inv_t, ctx.ignore_index, out=out)
        if ctx.inplace:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None


def logprobs(logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False, *, inplace_backward=False):
    """The "triton" backend of ``rf.logprobs`` (signature of ``reference.logprobs``): logits [N, V] or
    [B, T, V] with any leading strides (unit stride over V), labels of the leading shape."""
    logp, ent = LogprobsFunction.apply(logits, labels.reshape(-1), float(temperature), int(ignore_index),
                                       inplace_backward)
    logp, ent = logp.view(labels.shape), ent.view(labels.shape)
    return (logp, ent) if return_entropy else logp


def logprobs_inplace_backward(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """``rf.logprobs`` on the Triton backend whose backward writes grad logits into ``logits``.

    Saves one [N, V] buffer of activation memory in the backward. Use it only when nothing else
    needs the logits after this op's backward (e.g. logits straight out of the lm_head matmul,
    whose backward does not read its output); a graph that does reuse them raises autograd's
    "modified by an inplace operation" error rather than computing wrong gradients, and so does a
    second backward through this op (retain_graph). Same shapes as ``rf.logprobs``; strided views
    (``logits[:, :-1]``) are written in place; when ``logits [..., V]`` cannot be seen as [B, T, V]
    without a copy (a strided vocabulary), the copy is what gets reused.
    """
    from ..functional import _check_logits_labels, _flat_logits, check

    _check_logits_labels(logits, labels, temperature)
    check.labels_in_range(labels, logits.shape[-1], ignore_index)
    x = _flat_logits(logits)
    out = logprobs(x, labels.reshape(x.shape[:-1]).long(), temperature, ignore_index, return_entropy,
                   inplace_backward=True)
    if return_entropy:
        return out[0].reshape(labels.shape), out[1].reshape(labels.shape)
    return out.reshape(labels.shape)


_backend.register("logprobs", "triton")(logprobs)
