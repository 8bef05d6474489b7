"""linear_logprobs without the [N, V] logits: logprobs(hidden @ weight.T + bias, labels), in row chunks.

Forward: per chunk of rows, logits_c = hidden_c @ weight.T (+ bias) in fp32 (fp64 for fp64 inputs),
then the device's logprobs kernels give logp, entropy and lse for the chunk; only those [N] rows
are kept. Backward: per chunk, recompute logits_c, turn it into grad_logits_c with the logprobs
backward (written into logits_c itself on the Triton path), then grad_hidden_c = g_c @ W,
grad_weight += g_c.T @ hidden_c, grad_bias += Σ_rows g_c. The largest temporary is one chunk's
[rows, V] logits (≤ 256 MiB by default), plus an fp32 [V, H] accumulator for grad_weight.

GEMMs: fp32 inputs run in fp32; fp16/bf16 hidden and weight of one dtype on CUDA run in that
dtype with fp32 output (``torch.mm(..., out_dtype=torch.float32)``); otherwise (CPU, mixed dtypes)
the operands are upcast (the weight once per call, the hidden states per chunk). In the half-GEMM
backward grad_logits is rounded to the weight dtype before the two GEMMs, as in mixed precision.

Backends: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) uses the kernels of
ops/logprobs.py; "cpu" uses torch.ops.rlhf_fast.logprobs_fwd / logprobs_bwd of the compiled extension.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .. import _backend, _compiled
from .. import _vocab_parallel as _vp
from . import logprobs as _triton_logprobs

CHUNK_BYTES = 256 << 20   # bound on one chunk's fp32 logits
MAX_CHUNK_ROWS = 4096
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(a, b, out_dtype=) (torch >= 2.8, CUDA)


class _Kernels(NamedTuple):
    fwd: Callable  # (logits, labels, inv_t, ignore_index) -> logp, entropy, lse
    bwd: Callable  # (g_logp | None, g_entropy | None, logits, labels, lse, entropy, inv_t, ignore_index) -> grad


def _cpu_bwd(g_logp, g_ent, logits, labels, lse, ent, inv_t, ignore_index):
    g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.contiguous()
    return torch.ops.rlhf_fast.logprobs_bwd(g_logp, g_ent, logits, labels, lse, ent, inv_t, ignore_index)


def _triton_bwd(g_logp, g_ent, logits, labels, lse, ent, inv_t, ignore_index):
    # the chunk's logits are ours: the gradient overwrites them, no second [rows, V] buffer
    return _triton_logprobs.logprobs_bwd(g_logp, g_ent, logits, labels, lse, ent, inv_t, ignore_index, out=logits)


_TRITON = _Kernels(_triton_logprobs.logprobs_fwd, _triton_bwd)
_CPU = _Kernels(lambda *a: torch.ops.rlhf_fast.logprobs_fwd(*a), _cpu_bwd)


def default_chunk_rows(n_rows: int, vocab: int, acc: torch.dtype = torch.float32) -> int:
    """Rows per chunk: the chunk's logits stay within CHUNK_BYTES and MAX_CHUNK_ROWS rows."""
    per_row = max(1, vocab) * torch.empty((), dtype=acc).element_size()
    return max(1, min(n_rows, MAX_CHUNK_ROWS, CHUNK_BYTES // per_row))


def _gemm_dtype(hidden, weight, acc):
    """The dtype the GEMMs read: the inputs' own half dtype where torch.mm can write fp32, else acc."""
    half = hidden.dtype == weight.dtype and hidden.dtype in (torch.float16, torch.bfloat16)
    return hidden.dtype if half and hidden.is_cuda and _MM_OUT_DTYPE and acc == torch.float32 else acc


def _mm(a, b, acc):
    """a @ b with the result in acc (a and b already of one dtype)."""
    return a @ b if a.dtype == acc else torch.mm(a, b, out_dtype=acc)


def _chunk_logits(h, w, bias, acc):
    """[rows, V] logits in acc for a chunk of hidden rows (h, w in the GEMM dtype, bias in acc)."""
    logits = _mm(h.to(w.dtype), w.T, acc)
    return logits if bias is None else logits.add_(bias)


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, kernels, chunk_rows, tp):
        # tp: a _vocab_parallel.Shard (weight holds rows [start, start + V) of the lm_head) or None
        glabels = labels
        if tp is not None:
            labels, owned = _vp.local_labels(labels, tp, ignore_index)
        acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        N, V = hidden.shape[0], weight.shape[0]
        chunk_rows = chunk_rows or default_chunk_rows(N, V, acc)
        inv_t = 1.0 / temperature
        w = weight.to(_gemm_dtype(hidden, weight, acc))
        b = None if bias is None else bias.to(acc)
        logp, ent, lse = (torch.empty(N, dtype=acc, device=hidden.device) for _ in range(3))
        for i in range(0, N, chunk_rows):
            j = min(N, i + chunk_rows)
            logits = _chunk_logits(hidden[i:j], w, b, acc)
            out = kernels.fwd(logits, labels[i:j], inv_t, ignore_index)
            for dst, src in zip((logp, ent, lse), out):
                dst[i:j] = src
            del logits, out
        if tp is not None:  # the shard's partials -> the global rows (one all-gather of [N, 4])
            logp, ent, lse = _vp.gather_merge(logp, ent, lse, owned, glabels != ignore_index, tp)
            ctx.owned = owned
        ctx.tp = tp
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.acc, ctx.inv_t, ctx.ignore_index = acc, inv_t, ignore_index
        ctx.kernels, ctx.chunk_rows = kernels, chunk_rows
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        acc, C = ctx.acc, ctx.chunk_rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, V = hidden.shape[0], weight.shape[0]
        w = weight.to(_gemm_dtype(hidden, weight, acc))
        b = None if bias is None else bias.to(acc)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
        for i in range(0, N, C):
            j = min(N, i + C)
            h = hidden[i:j].to(w.dtype)
            logits = _chunk_logits(h, w, b, acc)
            g_args = (None if g_logp is None else g_logp[i:j], None if g_ent is None else g_ent[i:j])
            if ctx.tp is None:
                g = ctx.kernels.bwd(*g_args, logits, labels[i:j], lse[i:j], ent[i:j], ctx.inv_t, ctx.ignore_index)
            else:  # the same kernel, column 0 of the rows owned by other ranks recomputed
                g = _vp.shard_backward(ctx.kernels.bwd, *g_args, logits, labels[i:j], ctx.owned[i:j], lse[i:j],
                                       ent[i:j], ctx.inv_t, ctx.ignore_index)
            del logits  # (the Triton backward wrote g into it)
            if need_b:
                grad_b += g.sum(0)
            g = g.to(w.dtype)
            if need_h:
                grad_h[i:j] = _mm(g, w, acc)
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.T, h)
                else:
                    grad_w += _mm(g.T, h, acc)
            del g
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


def _implementation(kernels: _Kernels, backend: str):
    def linear_logprobs(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100,
                        return_entropy=False, *, chunk_size=None, tp=None):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
        logp, ent = LinearLogprobsFunction.apply(hidden, weight, bias, labels, float(temperature),
                                                 int(ignore_index), kernels, chunk_size, tp)
        return (logp, ent) if return_entropy else logp

    linear_logprobs.__doc__ = (
        f'The "{backend}" backend of ``rf.linear_logprobs`` (signature of ``reference.linear_logprobs``):\n'
        "hidden [N, H], weight [V, H], labels [N], bias [V] or None, in chunks of ``chunk_size`` rows\n"
        "(default: ``default_chunk_rows``) that never hold more than one chunk's [rows, V] logits;\n"
        "``tp``: a rlhf_fast._vocab_parallel.Shard when weight is this rank's rows of a vocab-sharded lm_head.")
    return linear_logprobs


linear_logprobs_triton = _implementation(_TRITON, "triton")
_backend.register("linear_logprobs", "triton")(linear_logprobs_triton)
if _compiled.LOADED:
    linear_logprobs_cpu = _implementation(_CPU, "cpu")
    _backend.register("linear_logprobs", "cpu")(linear_logprobs_cpu)
