"""The tensor-parallel checks, one process per rank (gloo, CPU tensors): run by tests/test_tensor_parallel.py as
``torchrun --standalone --nproc_per_node=2|4 tests/tp_worker.py``. With 4 ranks the ops run in two groups of 2
({0, 1} and {2, 3}, different data per group) and on the whole world of 4. Every check compares against the
float64 reference on the unsharded logits (rlhf_fast.reference); a failure raises on that rank (nonzero exit).
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlhf_fast as rf  # noqa: E402
from rlhf_fast import reference as ref  # noqa: E402
from utils import assert_rel  # noqa: E402

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 1e-2), torch.float64: (1e-10, 1e-10)}  # (out, grad)
BACKENDS = rf.backends_for("logprobs", "cpu")  # reference, cpu, triton (interpreter)


class CommCount(TorchDispatchMode):
    """Elements sent by the c10d ops (eager c10d and functional collectives) and host syncs seen."""

    def __init__(self):
        super().__init__()
        self.calls, self.syncs = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional") and "wait" not in func.__name__ and "wrap" not in func.__name__:
            t = next(a for a in args if isinstance(a, torch.Tensor) or isinstance(a, list))
            t = t[0] if isinstance(t, list) else t
            self.calls.append((func.__name__.split(".")[0], t.numel(), t.dtype))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def split_of(V, tp, uneven):
    """Column boundaries of tp shards of V (uneven: shard r gets 2 + 3r columns more or less)."""
    if not uneven:
        return [V * r // tp for r in range(tp + 1)]
    sizes = [max(1, V // tp + (3 * r - 3 * (tp - 1) // 2)) for r in range(tp)]
    sizes[-1] = V - sum(sizes[:-1])
    return [sum(sizes[:r]) for r in range(tp + 1)]


def make_case(seed, B, T, V, bounds, dtype):
    """Full logits [B, T + 1, V] (the op reads the time slice [:, :-1]) with the edge rows, labels [B, T]."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    tp = len(bounds) - 1
    labels[0, 0] = V - 1                      # label in the last shard, last column
    labels[0, 1] = bounds[0]                  # label in shard 0, max in the last shard
    full[0, 1, bounds[-2]] = 40.0
    full[1, 0, bounds[1]:bounds[2] if tp > 1 else V] = float("-inf")  # a shard all -inf
    labels[1, 0] = 0 if tp > 1 else labels[1, 0]
    if tp > 1:
        full[1, 1, bounds[1]:bounds[2]] = float("-inf")  # the label's shard all -inf: logp = -inf
        labels[1, 1] = bounds[1]
    labels[1, 2] = -100                       # ignored (NaN logits there are never read)
    full[1, 2, 3] = float("nan")
    return full.to(dtype), labels


def check_logprobs(group, rank, tp, seed, uneven=False, dtype=torch.float32, temperature=0.7, B=2, T=4, V=None):
    V = V or (11 * tp + 5 if uneven else 11 * tp)
    bounds = split_of(V, tp, uneven)
    full, labels = make_case(seed, B, T, V, bounds, dtype)
    g_lp, g_ent = (torch.randn(B, T, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
                   for i in (1, 2))
    x64 = full[:, :-1].double().requires_grad_()
    lp_ref, ent_ref = ref.logprobs(x64, labels, temperature, -100, True)
    (gx_ref,) = torch.autograd.grad((lp_ref * g_lp).sum() + (ent_ref * g_ent).where(ent_ref.isfinite(), 0).sum(), x64)
    lo, hi = bounds[rank], bounds[rank + 1]
    o_tol, g_tol = TOL[dtype]
    results = {}
    for be in BACKENDS:
        x = full.clone()[:, :-1, lo:hi].requires_grad_()  # a sliced [B, T, V_r] view of the shard
        kw = dict(temperature=temperature, return_entropy=True, process_group=group, backend=be,
                  vocab_start=lo if uneven else None)
        lp, ent = rf.logprobs(x, labels, **kw)
        what = f"tp={tp} {be} {dtype} uneven={uneven} rank={rank}"
        assert_rel(lp, lp_ref, o_tol, f"logp {what}")
        assert_rel(ent, ent_ref, o_tol, f"entropy {what}")
        (gx,) = torch.autograd.grad((lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).where(
            ent.isfinite(), 0).sum(), x)
        assert gx.dtype == dtype
        assert_rel(gx, gx_ref[..., lo:hi], g_tol, f"grad {what}")
        # run to run, and a row alone: the same bits
        lp2, ent2 = rf.logprobs(x, labels, **kw)
        assert torch.equal(lp2, lp) and torch.equal(ent2, ent), what
        lp1, ent1 = rf.logprobs(x[1:, 3:], labels[1:, 3:], **kw)
        assert torch.equal(lp1, lp[1:, 3:]) and torch.equal(ent1, ent[1:, 3:]), f"batch invariance {what}"
        results[be] = torch.stack([lp.detach(), ent.detach()])
    # every rank of the group holds the same bits
    for be, out in results.items():
        allv = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(allv, out, group=group)
        assert all(torch.equal(a, out) for a in allv), f"ranks differ: {be}"


def check_ppo(group, rank, tp, seed):
    B, T, V = 3, 4, 7 * tp
    bounds = split_of(V, tp, False)
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    labels[~mask & (torch.rand(B, T, generator=g) > 0.5)] = -100
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    rl = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    w = torch.rand(B, T, generator=g, dtype=torch.float64)
    lo, hi = bounds[rank], bounds[rank + 1]
    for agg in ("token-mean", "seq-mean-token-mean"):
        kw = dict(ref_logp=rl, kl_coef=0.05, entropy_coef=0.01, temperature=0.9, clip_low=0.2, clip_high=0.28,
                  agg=agg)
        x64 = full.clone().requires_grad_()
        old64 = old.clone().requires_grad_()
        loss_ref, st_ref = ref.ppo_loss_from_logits(x64, labels, old64, adv, mask, **kw, weights=w)
        gx_ref, gold_ref = torch.autograd.grad(loss_ref, (x64, old64))
        for be in BACKENDS:
            x = full.float()[..., lo:hi].requires_grad_()
            o = old.float().requires_grad_()
            loss, st = rf.ppo_loss_from_logits(x, labels, o, adv.float(), mask, **{**kw, "ref_logp": rl.float()},
                                               weights=w.float(), process_group=group, backend=be)
            gx, go = torch.autograd.grad(loss, (x, o))
            what = f"ppo tp={tp} {be} {agg}"
            assert_rel(loss, loss_ref, 2e-5, what)
            for k in st_ref:
                assert_rel(st[k], st_ref[k], 2e-5, f"{what} {k}")
            assert_rel(gx, gx_ref[..., lo:hi], 2e-5, f"{what} grad logits")
            assert_rel(go, gold_ref, 2e-5, f"{what} grad old_logp")
            if agg == "seq-mean-token-mean" and be == BACKENDS[-1]:  # packed: the same loss from [N, V_r] rows
                cu = torch.arange(0, B * T + 1, T)
                flat = [t.reshape(B * T) for t in (labels, o, adv.float(), mask, rl.float(), w.float())]
                lp_, st_ = rf.ppo_loss_from_logits(x.reshape(B * T, -1), flat[0], flat[1], flat[2], flat[3],
                                                   **{**kw, "ref_logp": flat[4]}, weights=flat[5], cu_seqlens=cu,
                                                   process_group=group, backend=be)
                assert_rel(lp_, loss_ref, 2e-5, f"{what} packed")
            out = torch.stack([loss.detach(), *(st[k] for k in sorted(st))])
            allv = [torch.empty_like(out) for _ in range(tp)]
            dist.all_gather(allv, out, group=group)
            assert all(torch.equal(a, out) for a in allv), f"ranks differ: {what}"


def check_linear(group, rank, tp, seed):
    N, H, V = 7, 5, 5 * tp + 2
    bounds = split_of(V, tp, True)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    labels[3] = V - 1
    g_lp, g_ent = torch.randn(2, N, generator=g, dtype=torch.float64)
    h64, w64, b64 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    lp_ref, ent_ref = ref.linear_logprobs(h64, w64, labels, b64, 1.3, -100, True)
    gh_ref, gw_ref, gb_ref = torch.autograd.grad((lp_ref * g_lp + ent_ref * g_ent).sum(), (h64, w64, b64))
    lo, hi = bounds[rank], bounds[rank + 1]
    for be in rf.backends_for("linear_logprobs", "cpu"):
        for reduce in (True, False):
            h = hidden.float().requires_grad_()
            w = weight.float()[lo:hi].clone().requires_grad_()
            b = bias.float()[lo:hi].clone().requires_grad_()
            with CommCount() as cc:
                lp, ent = rf.linear_logprobs(h, w, labels, bias=b, temperature=1.3, return_entropy=True,
                                             process_group=group, vocab_start=lo, reduce_hidden_grad=reduce,
                                             backend=be)
            what = f"linear tp={tp} {be} reduce={reduce}"
            assert_rel(lp, lp_ref, 2e-5, what)
            assert_rel(ent, ent_ref, 2e-5, what)
            gh, gw, gb = torch.autograd.grad((lp * g_lp.float() + ent * g_ent.float()).sum(), (h, w, b))
            assert_rel(gw, gw_ref[lo:hi], 2e-5, f"{what} grad weight")
            assert_rel(gb, gb_ref[lo:hi], 2e-5, f"{what} grad bias")
            if not reduce:  # this rank's partial: the group's partials sum to the full gradient
                dist.all_reduce(gh, group=group)
            assert_rel(gh, gh_ref, 2e-5, f"{what} grad hidden")
    # linear_ppo_loss == ppo_loss_from_logits(hidden @ W.T + b) (float64 reference), packed and padded
    B, T = 2, 4
    hid = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    lab = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    h64, w64 = hid.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_ref, st_ref = ref.linear_ppo_loss(h64, w64, lab, old, adv, mask, entropy_coef=0.01, agg="seq-mean-token-mean")
    gh_ref, gw_ref = torch.autograd.grad(loss_ref, (h64, w64))
    for be in rf.backends_for("linear_ppo_loss", "cpu"):
        h = hid.float().requires_grad_()
        w = weight.float()[lo:hi].clone().requires_grad_()
        loss, st = rf.linear_ppo_loss(h, w, lab, old.float(), adv.float(), mask, entropy_coef=0.01,
                                      agg="seq-mean-token-mean", process_group=group, vocab_start=lo, chunk_size=3,
                                      backend=be)
        gh, gw = torch.autograd.grad(loss, (h, w))
        what = f"linear_ppo_loss tp={tp} {be}"
        assert_rel(loss, loss_ref, 2e-5, what)
        assert_rel(st["entropy"], st_ref["entropy"], 2e-5, what)
        assert_rel(gh, gh_ref, 2e-5, f"{what} grad hidden")
        assert_rel(gw, gw_ref[lo:hi], 2e-5, f"{what} grad weight")


def check_comm(group, rank, tp):
    """With checks off: one all-gather of [N, 4] floats in the forward, nothing in the backward, no host sync."""
    B, T, Vl = 2, 3, 7
    x = torch.randn(B, T, Vl).requires_grad_()
    labels = torch.randint(0, Vl * tp, (B, T), generator=torch.Generator().manual_seed(5))
    for be in BACKENDS:
        with rf.checks(False):
            with CommCount() as fwd:
                lp, ent = rf.logprobs(x, labels, return_entropy=True, process_group=group, backend=be)
            with CommCount() as bwd:
                (lp.sum() + ent.sum()).backward()
        assert [c[:2] for c in fwd.calls] == [("all_gather_into_tensor", B * T * 4)], (be, fwd.calls)
        assert bwd.calls == [] and fwd.syncs == 0 and bwd.syncs == 0, (be, bwd.calls, fwd.syncs, bwd.syncs)
    with CommCount() as on:  # checks on (the CPU default): the geometry and label gathers, then the op's
        rf.logprobs(x, labels, process_group=group)
    assert [c[1] for c in on.calls] == [3, B * T, B * T * 4], on.calls


def check_errors(group, rank, tp):
    x = torch.randn(2, 5)
    labels = torch.tensor([1, 3])
    for kw, msg in ((dict(vocab_start=rank * 4), "vocab_start"), (dict(vocab_start=-1), "vocab_start")):
        try:
            rf.logprobs(x, labels, process_group=group, **kw)
        except ValueError as e:
            assert msg in str(e), e
        else:
            raise AssertionError(f"no ValueError for {kw}")
    try:
        rf.logprobs(x, labels + rank, process_group=group)
    except ValueError as e:
        assert "labels" in str(e) and "same" in str(e), e
    else:
        raise AssertionError("labels differing across ranks passed")
    try:
        rf.logprobs(x, labels, vocab_start=0)
    except ValueError as e:
        assert "process_group" in str(e)
    else:
        raise AssertionError("vocab_start without a group passed")
    try:
        rf.logprobs(x, torch.tensor([1, 5 * tp]), process_group=group)
    except ValueError as e:
        assert "labels" in str(e) and f"V={5 * tp}" in str(e), e
    else:
        raise AssertionError("a label past the last shard passed")


def check_compile(group, rank, tp):
    """No graph break: the compiled "cpu" backend under torch.compile(fullgraph=True)."""
    if "cpu" not in BACKENDS:
        return
    x = torch.randn(2, 3, 6).requires_grad_()
    labels = torch.randint(0, 6 * tp, (2, 3), generator=torch.Generator().manual_seed(1))

    def f(x):
        lp, ent = rf.logprobs(x, labels, return_entropy=True, process_group=group, backend="cpu")
        return lp.sum() + 0.5 * ent.sum()

    with rf.checks(False):
        eager = f(x)
        (g_e,) = torch.autograd.grad(eager, x)
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        (g_c,) = torch.autograd.grad(out, x)
    assert torch.equal(out, eager) and torch.equal(g_c, g_e), (out, eager)


def check_megatron(group, rank, tp):
    """Megatron-core's vocab_parallel_cross_entropy (the installed peer) on the same shards: -logp."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    B, T, Vl = 3, 2, 11
    g = torch.Generator().manual_seed(11 + dist.get_rank() // tp)
    x = torch.randn(B, T, Vl * tp, generator=g)[..., rank * Vl:(rank + 1) * Vl].contiguous()
    labels = torch.randint(0, Vl * tp, (B, T), generator=g)
    xm = x.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(xm, labels)
    (gm,) = torch.autograd.grad(loss.sum(), xm)
    for be in BACKENDS:
        xr = x.clone().requires_grad_()
        lp = rf.logprobs(xr, labels, process_group=group, backend=be)
        (gr,) = torch.autograd.grad(-lp.sum(), xr)
        assert torch.allclose(-lp, loss, atol=1e-5, rtol=1e-5), (be, -lp, loss)
        assert torch.allclose(gr, gm, atol=1e-6, rtol=1e-5), be


def main():
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [(dist.group.WORLD, rank, world, 0)]
    if world == 4:  # two TP groups of 2: {0, 1} and {2, 3}, different data per group
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        groups.insert(0, (pairs[rank // 2], rank % 2, 2, 100 * (rank // 2)))
    for group, r, tp, seed in groups:
        full = tp == world  # the groups of 2 inside 4 ranks: the checks that tell their group from WORLD
        for dtype in (torch.float32, torch.bfloat16, torch.float64) if full else (torch.float32,):
            check_logprobs(group, r, tp, seed + 1, dtype=dtype)
        if full:
            check_logprobs(group, r, tp, seed + 2, uneven=True, temperature=1.0)
            check_ppo(group, r, tp, seed + 3)
            check_errors(group, r, tp)
        check_linear(group, r, tp, seed + 4)
        check_comm(group, r, tp)
    if world == 2:
        check_compile(dist.group.WORLD, rank, world)
    try:
        from megatron.core import parallel_state
    except ImportError:
        print("megatron-core not installed: oracle skipped", flush=True)
    else:  # Megatron's TP groups of 2: {0, 1} (and {2, 3})
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        check_megatron(parallel_state.get_tensor_model_parallel_group(),
                       parallel_state.get_tensor_model_parallel_rank(), 2)
    dist.barrier()
    print(f"rank {rank}: ok (backends {BACKENDS})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
