"""Tensor parallelism over the vocabulary: the logits ops on a vocab-sharded [..., V] (or lm_head [V, H]).

Layout (Megatron's): rank r of ``process_group`` holds the columns [start_r, start_r + V_r) of the logits,
start_r = r·V_r by default or ``vocab_start`` (an uneven split); the shards tile [0, V) in rank order.
Labels are global ids, the same on every rank.

Forward. Each rank runs the EXISTING row kernels of its backend on its shard, with the label mapped into
the shard where the rank owns it (any in-shard column, 0, where it does not), and keeps per row
  lse_r = log Σ_shard exp(z),  H_r = the shard's own entropy,  lp_r = z_label - lse_r,  own_r ∈ {0, 1}
(the kernels' own outputs: logp, entropy, lse). These [N, 4] floats are all-gathered ([tp, N, 4], O(N)
bytes, one collective) and every rank merges them with elementwise ops in rank order (``merge``):
  M = max_r lse_r,  lse = M + log Σ_r exp(lse_r - M),  log w_r = (lse_r - M) - (lse - M)
  logp = lp_owner + log w_owner,   H = Σ_r w_r·(H_r - log w_r)   (the entropy of a mixture)
Every rank computes the same bits (same inputs, same order), a row's bits do not depend on the other rows
(the kernels are batch invariant and the merge is elementwise), and no all-reduce with a backend-chosen
summation order is involved. A group of one gives the unsharded op's bits exactly.

Backward: no communication. With the merged (global) lse and H the kernels' backward,
  grad_z = g_lp·(onehot - p) - g_ent·p·(z - lse + H),  p = exp(z - lse),
is already the slice of the unsharded gradient, except the onehot on rows this rank does not own: there
the kernel ran with label 0 and column 0 is recomputed by the same kernel on a [N, 2] copy of column 0
(label at its second column), so the whole gradient comes from the kernels' own formula, rounded once.

The linear ops (lm_head rows [V_r, H] on rank r) run the same partials per chunk of rows; grad hidden is
this rank's partial, all-reduced over the group in the backward unless ``reduce_hidden_grad=False``.

Checks (``rf.checks``, on by default for CPU tensors): one small all-gather of (vocab_start, V_r, N) and
one of the labels, then ValueErrors for shards that do not tile [0, V) in rank order and labels that differ
across ranks or lie outside [0, V). With checks off nothing here syncs with the host.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks as check
from . import reference as ref


class Shard(NamedTuple):
    group: object       # the torch.distributed ProcessGroup
    rank: int           # this process's rank in the group
    size: int           # tp, the group's size
    start: int          # this rank's first global vocabulary column
    V: int              # this rank's number of columns


def _dist():
    import torch.distributed as dist

    return dist


def shard(process_group, vocab_start, V_local, labels, ignore_index, device) -> Shard:
    """Validate the group and this rank's columns; with the data checks on, check across the group that the
    shards tile [0, V) in rank order and that every rank holds the same labels."""
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs torch.distributed initialised (dist.init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup, got {type(process_group).__name__}")
    rank, size = dist.get_rank(process_group), dist.get_world_size(process_group)
    if rank < 0:
        raise ValueError("process_group: this process is not a member of the group it was given")
    if vocab_start is None:
        start = rank * V_local
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (this rank's first vocabulary column) or None, "
                         f"got {vocab_start!r}")
    else:
        start = vocab_start
    sh = Shard(process_group, rank, size, start, V_local)
    if not check._skip_data_checks(labels):
        _check_group(sh, labels, ignore_index, vocab_start is None, device)
    return sh


def _all_gather(x: torch.Tensor, sh: Shard) -> torch.Tensor:
    """[n, ...] on every rank -> [tp, n, ...] in rank order (one all-gather; traceable by torch.compile)."""
    if sh.size == 1:
        return x.unsqueeze(0)
    import torch.distributed._functional_collectives as fc

    gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor  # (the older name before torch 2.12)
    out = fc.wait_tensor(gather(x.contiguous(), 0, sh.group))
    return out.view(sh.size, *x.shape)


def _check_group(sh: Shard, labels, ignore_index, default_start, device):
    geo = _all_gather(torch.tensor([sh.start, sh.V, labels.numel()], device=device), sh).tolist()
    starts, sizes, ns = zip(*geo)
    expect = [sum(sizes[:r]) for r in range(sh.size)]
    if list(starts) != expect:
        how = ("pass vocab_start= for an uneven split" if default_start else
               "vocab_start must be the sum of the lower ranks' shard sizes")
        raise ValueError(f"vocab_start: the {sh.size} shards of process_group (start, columns) = "
                         f"{list(zip(starts, sizes))} do not tile the vocabulary in rank order; {how}")
    if len(set(ns)) != 1:
        raise ValueError(f"labels must be the same on every rank of process_group, got {list(ns)} labels per rank")
    V = sum(sizes)
    lab = labels.reshape(-1).to(device=device, dtype=torch.int64)
    if not bool((_all_gather(lab, sh) == lab).all()):
        raise ValueError("labels must be the same global ids on every rank of process_group; they differ")
    check.labels_in_range(lab, V, ignore_index)


def local_labels(labels: torch.Tensor, sh: Shard, ignore_index: int):
    """(labels in the shard's columns, 0 where another rank owns the label; ignore_index kept) and owned."""
    valid = labels != ignore_index
    owned = valid & (labels >= sh.start) & (labels < sh.start + sh.V)
    local = torch.where(owned, labels - sh.start, torch.where(valid, 0, labels))
    return local, owned


def merge(partials: torch.Tensor, valid: torch.Tensor):
    """[tp, N, 4] gathered (lse_r, H_r, lp_r, own_r) -> global (logp, entropy, lse) [N], merged in rank order
    with elementwise ops only. A shard whose row is all -inf (lse_r = -inf) weighs 0; NaN in any shard makes
    the row NaN; a valid row owned by no rank (or several: bad labels, checks off) is NaN."""
    lse_r, H_r, lp_r, own_r = partials.unbind(-1)
    tp = partials.shape[0]
    M = lse_r[0]
    for r in range(1, tp):
        M = torch.maximum(M, lse_r[r])  # NaN propagates
    S = torch.exp(lse_r[0] - M)
    for r in range(1, tp):
        S = S + torch.exp(lse_r[r] - M)
    L = torch.log(S)
    lse = M + L
    zero = torch.zeros_like(M)
    H, logp, n_own = zero, zero, zero
    for r in range(tp):
        dead = lse_r[r] == float("-inf")
        log_w = torch.where(dead, zero, (lse_r[r] - M) - L)  # (finite where dead: no 0·inf in autograd)
        H = H + torch.where(dead, zero, torch.exp(log_w) * (H_r[r] - log_w))
        # an all -inf shard owning the label: logp = -inf (its lp_r is NaN: -inf - -inf)
        lp = torch.where(dead, lse_r[r] - lse, lp_r[r] + log_w)
        logp = logp + torch.where(own_r[r] > 0, lp, zero)
        n_own = n_own + own_r[r]
    bad = n_own != 1
    nan = torch.full_like(M, float("nan"))
    out = []
    for t in (logp, H, lse):
        out.append(torch.where(valid, torch.where(bad, nan, t), zero))
    return tuple(out)


def gather_merge(logp_r, ent_r, lse_r, owned, valid, sh: Shard):
    """The shard's kernel outputs [N] -> the global (logp, entropy, lse) [N]: one all-gather of [N, 4]."""
    partials = torch.stack([lse_r, ent_r, logp_r, owned.to(lse_r.dtype)], -1)
    return merge(_all_gather(partials, sh), valid)


def shard_backward(bwd, g_logp, g_ent, x, labels, owned, lse, ent, inv_t, ignore_index):
    """grad of this rank's logits x ([B, T, V_r] or [N, V_r]) given the global lse and entropy: the backend's
    row backward ``bwd`` (signature of torch.ops.rlhf_fast.logprobs_bwd; it may write into x), then column 0 of
    the rows owned elsewhere (the kernel saw label 0 there) replaced by the same kernel's value for a
    non-label column: a [N, 2] copy of column 0 with the label on its second column."""
    rows = x.shape[:-1]
    N = owned.numel()
    col0 = x[..., 0].reshape(N, 1)
    pair = torch.cat([col0, col0], 1)
    valid = labels != ignore_index
    fix_lab = torch.where(valid, torch.ones_like(labels), labels)
    fix = bwd(g_logp, g_ent, pair, fix_lab, lse, ent, inv_t, ignore_index)[:, 0]  # before bwd may overwrite x
    grad = bwd(g_logp, g_ent, x, labels, lse, ent, inv_t, ignore_index)
    g0 = grad[..., 0]
    g0.copy_(torch.where(owned.reshape(rows) | ~valid.reshape(rows), g0, fix.reshape(rows)))
    return grad


class VocabParallelLogprobs(torch.autograd.Function):
    """(this rank's logits [B, T, V_r] view, global labels [N]) -> global (logp [N], entropy [N]) through a
    backend's row kernels ``kernels`` (fwd, bwd as in ops/linear_logprobs._Kernels); saves two [N] rows."""

    @staticmethod
    def forward(ctx, x, labels, kernels, sh, temperature, ignore_index):
        inv_t = 1.0 / temperature
        lab, owned = local_labels(labels, sh, ignore_index)
        lp_r, ent_r, lse_r = kernels.fwd(x, lab, inv_t, ignore_index)
        logp, ent, lse = gather_merge(lp_r, ent_r, lse_r, owned, labels != ignore_index, sh)
        ctx.save_for_backward(x, lab, owned, lse, ent)
        ctx.kernels, ctx.inv_t, ctx.ignore_index = kernels, inv_t, ignore_index
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        x, lab, owned, lse, ent = ctx.saved_tensors
        if g_logp is not None:
            g_logp = g_logp.contiguous()
        grad = shard_backward(ctx.kernels.bwd, g_logp, g_ent, x, lab, owned, lse, ent, ctx.inv_t, ctx.ignore_index)
        return grad, None, None, None, None, None


def _reference_logprobs(x, labels, sh: Shard, temperature, ignore_index):
    """The reference backend: the shard's partials in plain torch (differentiable), the other ranks' gathered
    partials as constants, the same merge; autograd gives the shard's gradient without communication."""
    lab, owned = local_labels(labels, sh, ignore_index)
    valid = labels != ignore_index
    z = ref._acc(x) / temperature
    dead = (z == float("-inf")).all(-1) & valid  # an all -inf shard row: lse_r = -inf, no gradient
    zs = torch.where(dead.unsqueeze(-1), 0.0, z)
    lp_r, ent_r = ref.logprobs(zs, lab, 1.0, ignore_index, return_entropy=True)
    lse_r = torch.where(valid, torch.logsumexp(torch.where(valid.unsqueeze(-1), zs, 0.0), -1), 0.0)
    # = -inf in a dead row, written as its label's logit so that logp = z_label - lse keeps d/dz_label = 1
    z_lab = z.gather(-1, torch.where(valid, lab, 0).unsqueeze(-1)).squeeze(-1)
    lse_r = torch.where(dead, z_lab, lse_r)
    own = torch.stack([lse_r, ent_r, lp_r, owned.to(lse_r.dtype)], -1)
    gathered = _all_gather(own.detach(), sh)
    parts = torch.cat([gathered[:sh.rank], own.unsqueeze(0), gathered[sh.rank + 1:]], 0)
    logp, ent, _ = merge(parts, valid)
    return logp, ent


def _kernels(backend: str):
    from .ops import linear_logprobs as _ll

    if backend == "triton":
        from .ops import logprobs as _tlp

        return _ll._Kernels(_tlp.logprobs_fwd, _tlp.logprobs_bwd)
    return _ll._CPU  # torch.ops.rlhf_fast.logprobs_fwd / _bwd: the "cpu" and "cuda" backends


def logprobs(x, labels, sh: Shard, backend: str, temperature, ignore_index):
    """rf.logprobs on this rank's shard x ([B, T, V_r] view), labels [B·T] global: (logp, entropy) [B·T]."""
    if backend == "reference":
        return _reference_logprobs(x, labels.reshape(x.shape[:-1]), sh, temperature, ignore_index)
    return VocabParallelLogprobs.apply(x, labels.reshape(-1), _kernels(backend), sh, float(temperature),
                                       int(ignore_index))


class _ReduceGrad(torch.autograd.Function):
    """Identity forward, all-reduce (sum) of the gradient over the group: the input of a column-parallel
    layer (Megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, sh):
        ctx.sh = sh
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.sh.size == 1:
            return g, None
        import torch.distributed._functional_collectives as fc

        return fc.wait_tensor(fc.all_reduce(g.contiguous(), "sum", ctx.sh.group)), None


def reduce_grad(hidden, sh: Shard):
    return _ReduceGrad.apply(hidden, sh)


def linear_logprobs(hidden, weight, labels, bias, sh: Shard, backend: str, impl, temperature, ignore_index,
                    reduce_hidden_grad, chunk_size=None):
    """rf.linear_logprobs with this rank's lm_head rows weight [V_r, H] (and bias [V_r]); hidden [N, H]."""
    if reduce_hidden_grad:
        hidden = reduce_grad(hidden, sh)
    if backend == "reference":
        logits = ref._acc(hidden) @ ref._acc(weight).T
        if bias is not None:
            logits = logits + ref._acc(bias)
        return _reference_logprobs(logits, labels, sh, temperature, ignore_index)
    return impl(hidden, weight, labels, bias, temperature, ignore_index, True, chunk_size=chunk_size, tp=sh)
