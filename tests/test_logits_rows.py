"""The row contracts of the logits ops (logprobs, linear_logprobs, ppo_loss_from_logits and the in-place
backward) on every backend (issue 10):

- a NaN logit makes its row's logp, entropy and gradient NaN, exactly where the float64 reference is NaN;
- an out-of-range label (when no host check runs: torch.compile, the raw ops, the Triton launchers)
  poisons its own row only (NaN logp and entropy, NaN gradient row) and never touches memory outside it;
- strided [..., V] views such as ``logits[:, :-1]`` are read in place (no copy), the gradient has their layout;
- a row's logp, entropy and gradient are bitwise the same alone, in any batch, under any chunking.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_fast as rf
from rlhf_fast import _compiled
from rlhf_fast import reference as ref
from utils import DEVICE, GRAD_TOL, OUT_TOL, assert_rel, backends

LP_BACKENDS = [b for b in backends("logprobs") if b != "reference"]
FL_BACKENDS = [b for b in backends("ppo_loss_from_logits") if b != "reference"]
LIN_BACKENDS = [b for b in backends("linear_logprobs") if b != "reference"]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    """Several Triton chunks per row (the CPU loop has 1024-element chunks), so NaN and -inf land in later ones."""
    if "triton" in backends("logprobs"):
        from rlhf_fast.ops import logprobs as tlp
        from rlhf_fast.ops import ppo_loss_from_logits as tfl
        monkeypatch.setattr(tlp, "_MAX_BLOCK_V", 512)
        monkeypatch.setattr(tfl, "MAX_BLOCK_V", 512)


def _assert_same_nan(out, want, tol, what):
    """NaN exactly where `want` is NaN; the rest within tol of it."""
    out, want = out.detach().double().cpu(), want.detach().double().cpu()
    assert torch.equal(out.isnan(), want.isnan()), \
        f"{what}: NaN at {out.isnan().nonzero()[:8].tolist()}, reference at {want.isnan().nonzero()[:8].tolist()}"
    keep = ~want.isnan()
    assert_rel(out[keep], want[keep], tol, what)


def _lp_run(fn, x, labels, g_lp, g_ent):
    """(logp, entropy, d(Σ g_lp·logp + g_ent·H)/dx) of fn(x, labels) -> (logp, entropy)."""
    x = x.detach().requires_grad_()
    lp, ent = fn(x, labels)
    (gx,) = torch.autograd.grad((lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum(), x)
    return lp.detach(), ent.detach(), gx


def _public(backend, **kw):
    return lambda x, labels: rf.logprobs(x, labels, return_entropy=True, backend=backend, **kw)


def _nan_logits(V, dtype):
    x = torch.randn(8, V, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (8,))
    x[0, 5] = NAN                                      # one NaN
    x[1, labels[1]] = NAN                              # NaN at the label
    x[2, :2048] = -INF                                 # a masked (-inf) chunk holding a NaN
    x[2, 1200] = NAN
    labels[2] = 2060
    x[3] = NAN                                         # all NaN
    x[4] = -INF                                        # -inf but the label and one NaN
    labels[4] = 3
    x[4, 3], x[4, 1500] = 0.5, NAN
    x[5, ::3] = -INF                                   # clean, masked vocabulary: exact
    labels[5] = 1
    x[6, 3], labels[6] = NAN, -100                     # ignored: 0, 0 and a zero gradient row
    return x.to(DEVICE, dtype), labels.to(DEVICE)      # row 7 clean


@pytest.mark.parametrize("backend", LP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_logprobs_nan_propagates_to_its_row(backend, dtype):
    x, labels = _nan_logits(2100, dtype)
    g_lp, g_ent = torch.randn(8, dtype=torch.float64, device=DEVICE), torch.randn(8, dtype=torch.float64, device=DEVICE)
    lp, ent, gx = _lp_run(_public(backend, temperature=0.7), x, labels, g_lp, g_ent)
    lp64, ent64, gx64 = _lp_run(lambda x, y: ref.logprobs(x, y, 0.7, -100, True), x.double(), labels, g_lp, g_ent)
    assert lp64[[0, 1, 2, 3, 4]].isnan().all() and not lp64[[5, 6, 7]].isnan().any()  # the reference's own NaN
    assert (gx64[6] == 0).all() and (lp64[6] == 0) and (ent64[6] == 0)
    _assert_same_nan(lp, lp64, OUT_TOL[dtype], f"{backend} logp")
    _assert_same_nan(ent, ent64, OUT_TOL[dtype], f"{backend} entropy")
    _assert_same_nan(gx, gx64, GRAD_TOL[dtype], f"{backend} grad logits")
    assert torch.equal(gx[6], torch.zeros_like(gx[6]))


@pytest.mark.parametrize("backend", FL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_loss_from_logits_nan_propagates_to_its_row(backend, dtype):
    B, T, V = 2, 4, 2100
    x = torch.randn(B, T, V, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, T))
    x[0, 1, 7] = NAN
    x[1, 2, :2048] = -INF  # NaN inside a masked chunk: `x > -inf` is False for NaN
    x[1, 2, 1200] = NAN
    labels[1, 2] = 2060
    x[1, 0, 4], labels[1, 0] = NAN, -100  # ignored row: never read, zero gradient
    x[0, 3, ::5] = -INF  # masked vocabulary in a clean row
    labels[0, 3] = 1
    old = -torch.rand(B, T, dtype=torch.float64) * 8
    adv, rl = torch.randn(B, T, dtype=torch.float64), -torch.rand(B, T, dtype=torch.float64) * 8
    mask = torch.ones(B, T, dtype=torch.bool)
    kw = dict(ref_logp=rl.to(DEVICE), kl_coef=0.1, entropy_coef=0.1, temperature=0.9)

    def run(b, x):
        x = x.detach().requires_grad_()
        loss, st = rf.ppo_loss_from_logits(x, labels.to(DEVICE), old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE),
                                           backend=b, **kw)
        (gx,) = torch.autograd.grad(loss, x)
        return loss.detach(), st["entropy"], gx

    loss, ent, gx = run(backend, x.to(DEVICE, dtype))
    loss64, ent64, gx64 = run("reference", x.to(dtype).double())
    assert loss64.isnan() and ent64.isnan()
    assert loss.isnan() and ent.isnan()
    assert gx64[0, 1].isnan().all() and gx64[1, 2].isnan().all() and not gx64[1, 0].any()
    _assert_same_nan(gx, gx64, GRAD_TOL[dtype], f"{backend} grad logits")
    assert torch.equal(gx[1, 0], torch.zeros_like(gx[1, 0]))


# ----------------------------------------------------------------------------- out-of-range labels
def _bad_label_logits(dtype, V=300):
    """[6, V] logits as a view into a buffer with guard columns either side of every row and guard rows."""
    buf = torch.full((8, V + 2), 50.0, dtype=torch.float64)
    buf[1:7, 1:V + 1] = torch.randn(6, V, dtype=torch.float64) * 3
    buf = buf.to(DEVICE, dtype)
    labels = torch.randint(0, V, (6,), device=DEVICE)
    bad = labels.clone()
    bad[2], bad[4] = -1, V
    return buf, buf[1:7, 1:V + 1], labels, bad


def _assert_poisoned(clean, dirty, rows=(2, 4)):
    """Rows `rows` of every output NaN (gradients: all NaN or all 0), every other row bitwise the clean run's."""
    others = [r for r in range(clean[0].shape[0]) if r not in rows]
    for i, (c, d) in enumerate(zip(clean, dirty)):
        assert torch.equal(c[others], d[others]), f"output {i}: a bad label changed another row"
        for r in rows:
            if d.dim() == 1:
                assert d[r].isnan(), f"output {i}: row {r} with a bad label is {d[r]}, not NaN"
            else:
                assert d[r].isnan().all() or not d[r].any(), f"output {i}: gradient row {r} neither NaN nor 0"


def _lp_raw_compiled(x, labels, g_lp, g_ent):
    ops = torch.ops.rlhf_fast
    lp, ent, lse = ops.logprobs_fwd(x, labels, 1 / 0.7, -100)
    gx = ops.logprobs_bwd(g_lp, g_ent, x, labels, lse, ent, 1 / 0.7, -100)
    inplace = x.clone()
    ops.logprobs_bwd_(inplace, g_lp, g_ent, labels, lse, ent, 1 / 0.7, -100)
    return lp, ent, gx, inplace


def _lp_raw_triton(x, labels, g_lp, g_ent):
    from rlhf_fast.ops import logprobs as tlp
    lp, ent, lse = tlp.logprobs_fwd(x, labels, 1 / 0.7, -100)
    gx = tlp.logprobs_bwd(g_lp, g_ent, x, labels, lse, ent, 1 / 0.7, -100)
    inplace = x.clone()
    tlp.logprobs_bwd(g_lp, g_ent, inplace, labels, lse, ent, 1 / 0.7, -100, out=inplace)
    return lp, ent, gx, inplace


@pytest.mark.parametrize("backend", LP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_bad_labels_raw_kernels(backend, dtype):
    buf, x, labels, bad = _bad_label_logits(dtype)
    acc = torch.float32
    g_lp, g_ent = torch.randn(6, dtype=acc, device=DEVICE), torch.randn(6, dtype=acc, device=DEVICE)
    raw = _lp_raw_triton if backend == "triton" else _lp_raw_compiled
    clean = raw(x, labels, g_lp, g_ent)
    before = buf.clone()
    dirty = raw(x, bad, g_lp, g_ent)
    assert torch.equal(buf, before)
    _assert_poisoned(clean, dirty)
    # the in-place backward into the buffer itself: guard columns and rows untouched
    buf2 = buf.clone()
    view = buf2[1:7, 1:-1]
    if backend == "triton":
        from rlhf_fast.ops import logprobs as tlp
        _, ent, lse = tlp.logprobs_fwd(view, bad, 1 / 0.7, -100)
        tlp.logprobs_bwd(g_lp, g_ent, view, bad, lse, ent, 1 / 0.7, -100, out=view)
    else:
        _, ent, lse = torch.ops.rlhf_fast.logprobs_fwd(view, bad, 1 / 0.7, -100)
        torch.ops.rlhf_fast.logprobs_bwd_(view, g_lp, g_ent, bad, lse, ent, 1 / 0.7, -100)
    outside = torch.ones_like(buf2, dtype=torch.bool)
    outside[1:7, 1:-1] = False
    assert torch.equal(buf2[outside], buf[outside]), "the in-place backward wrote outside the logits rows"


COMPILED = "cuda" if DEVICE == "cuda" else "cpu"  # the compiled backend of the test device


@pytest.mark.skipif(COMPILED not in LP_BACKENDS, reason="compiled extension not built for the test device")
def test_logprobs_bad_labels_under_torch_compile():
    _, x, labels, bad = _bad_label_logits(torch.float32)
    x = x.reshape(2, 3, -1)  # [B, T, V] view with a row stride != V
    labels, bad = labels.reshape(2, 3), bad.reshape(2, 3)
    g_lp, g_ent = torch.randn(2, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE)
    f = _public(COMPILED, temperature=0.7)
    clean = _lp_run(f, x, labels, g_lp, g_ent)
    dirty = _lp_run(torch.compile(f, fullgraph=True), x, bad, g_lp, g_ent)
    flat = [t.reshape(6, *t.shape[2:]) for t in clean], [t.reshape(6, *t.shape[2:]) for t in dirty]
    _assert_poisoned(*flat)


def _fl_inputs(V=300):
    B, T = 2, 3
    _, x, labels, bad = _bad_label_logits(torch.float32, V)
    x, labels, bad = x.reshape(B, T, V), labels.reshape(B, T), bad.reshape(B, T)
    old = -torch.rand(B, T, device=DEVICE) * 6
    adv = torch.randn(B, T, device=DEVICE)
    rl = -torch.rand(B, T, device=DEVICE) * 6
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    return x, labels, bad, old, adv, rl, mask


_FL_KW = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.1, temperature=0.7, clip_low=0.2, clip_high=0.28,
              dual_clip=None, agg="token-mean")


def _fl_run(fn, x, labels, old, adv, rl, mask):
    x = x.detach().requires_grad_()
    loss, st = fn(x, labels, old, adv, mask, rl)
    (gx,) = torch.autograd.grad(loss, x)
    return loss.detach(), st["entropy"], gx


@pytest.mark.parametrize("backend", FL_BACKENDS)
@pytest.mark.parametrize("how", ["backend function", "torch.compile", "raw op"])
def test_ppo_loss_from_logits_bad_labels(backend, how):
    x, labels, bad, old, adv, rl, mask = _fl_inputs()
    if how == "raw op":
        if backend == "triton":
            pytest.skip("the Triton backend has no raw op; its launcher is the backend function")
        ops = torch.ops.rlhf_fast

        def fn(x, y, o, a, m, r):
            loss, st, saved = ops.ppo_from_logits_fwd(x.reshape(-1, x.shape[-1]), y.reshape(-1), o, a, m, r, 0.1,
                                                      "k3", 0.1, 1 / 0.7, 0.2, 0.28, None, "token-mean")
            gx = ops.ppo_from_logits_bwd(torch.ones((), device=x.device), x.detach().reshape(-1, x.shape[-1]),
                                         y.reshape(-1), saved, 1 / 0.7)
            return loss + (gx.reshape(x.shape).detach() * x).sum(), {"entropy": st[4]}
    else:
        if how == "torch.compile" and backend == "triton":
            pytest.skip("the Triton backend under torch.compile is not covered (the interpreter cannot be compiled)")
        from rlhf_fast._backend import select
        impl = select("ppo_loss_from_logits", x.device, backend)  # the backend itself: no host check

        def direct(x, y, o, a, m, r):
            return impl(x, y, o, a, m, r, **_FL_KW)

        def public(x, y, o, a, m, r):  # compiled: the host check is skipped while tracing
            return rf.ppo_loss_from_logits(x, y, o, a, m, ref_logp=r, backend=backend, **_FL_KW)
        fn = torch.compile(public, fullgraph=True) if how == "torch.compile" else direct
    clean = _fl_run(fn, x, labels, old, adv, rl, mask)
    dirty = _fl_run(fn, x, bad, old, adv, rl, mask)
    assert clean[0].isfinite() and dirty[0].isnan() and dirty[1].isnan()
    gc, gd = clean[2].reshape(6, -1), dirty[2].reshape(6, -1)
    others = [0, 1, 3, 5]
    assert torch.equal(gc[others], gd[others]), "a bad label changed another row's gradient"
    for r in (2, 4):
        assert gd[r].isnan().all() or not gd[r].any()


@pytest.mark.parametrize("backend", LIN_BACKENDS)
def test_linear_logprobs_bad_labels(backend):
    """The backend called directly (no host check): NaN logp, entropy and grad_hidden rows for the bad
    labels, every other row bitwise the clean run's (grad_weight sums over rows: NaN, as any NaN loss)."""
    N, H, V = 7, 16, 301
    hidden, weight = torch.randn(N, H, device=DEVICE), torch.randn(V, H, device=DEVICE) / 2
    labels = torch.randint(0, V, (N,), device=DEVICE)
    bad = labels.clone()
    bad[2], bad[4] = -1, V
    impl = rf._backend.select("linear_logprobs", hidden.device, backend)

    def run(y):
        h = hidden.clone().requires_grad_()
        lp, ent = impl(h, weight, y, None, 0.9, -100, True, chunk_size=3)
        (gh,) = torch.autograd.grad(lp.sum() + ent.sum(), h)
        return lp, ent, gh
    _assert_poisoned(run(labels), run(bad))


# ----------------------------------------------------------------------------- strided views, no copy
class _Copies(TorchDispatchMode):
    """Records aten copies (copy_, clone, _to_copy, ...) that touch a tensor of `dtype` with >= `numel` elements."""

    COPY_OPS = ("copy_", "clone", "_to_copy", "contiguous", "cat", "index_select", "as_strided_copy", "view_copy")

    def __init__(self, dtype, numel):
        super().__init__()
        self.dtype, self.numel, self.seen = dtype, numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in self.COPY_OPS:
            big = [a for a in list(args) + list(kwargs.values())
                   if isinstance(a, torch.Tensor) and a.dtype == self.dtype and a.numel() >= self.numel]
            if big:
                self.seen.append(str(func))
        return func(*args, **kwargs)


def _strided_views(dtype, V=301):
    big = (torch.randn(3, 8, V + 5, device=DEVICE) * 3).to(dtype)
    return {"time slice [:, :-1]": big[:, :-1, :V], "every other step": big[:, ::2, :V],
            "transposed batch": big[:, :-1, :V].transpose(0, 1)}


@pytest.mark.parametrize("backend", LP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_strided_views_are_not_copied(backend, dtype):
    for name, x in _strided_views(dtype).items():
        labels = torch.randint(0, x.shape[-1], x.shape[:-1], device=DEVICE)
        labels[0, 0] = -100
        g_lp, g_ent = torch.randn(x.shape[:-1], device=DEVICE), torch.randn(x.shape[:-1], device=DEVICE)
        with _Copies(dtype, x[..., 0].numel() * x.shape[-1] // 2) as mode:
            lp, ent, gx = _lp_run(_public(backend), x, labels, g_lp, g_ent)
        assert mode.seen == [], f"{name}: {backend} copied the logits: {mode.seen}"
        want = _lp_run(_public(backend), x.contiguous(), labels, g_lp, g_ent)
        for a, b in zip((lp, ent, gx), want):
            assert torch.equal(a, b), f"{name}: {backend} differs on the view"
        assert gx.stride() == x.stride(), f"{name}: gradient strides {gx.stride()} != logits strides {x.stride()}"


@pytest.mark.parametrize("backend", FL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_loss_from_logits_strided_views_are_not_copied(backend, dtype):
    for name, x in _strided_views(dtype).items():
        B, T, V = x.shape
        labels = torch.randint(0, V, (B, T), device=DEVICE)
        labels[0, 1] = -100
        old, adv = -torch.rand(B, T, device=DEVICE) * 6, torch.randn(B, T, device=DEVICE)
        mask = torch.rand(B, T, device=DEVICE) > 0.2

        def fn(x, y, o, a, m, r):
            return rf.ppo_loss_from_logits(x, y, o, a, m, ref_logp=r, backend=backend, **_FL_KW)
        with _Copies(dtype, x.numel() // 2) as mode:
            got = _fl_run(fn, x, labels, old, adv, old * 0.9, mask)
        assert mode.seen == [], f"{name}: {backend} copied the logits: {mode.seen}"
        want = _fl_run(fn, x.contiguous(), labels, old, adv, old * 0.9, mask)
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"{name}: {backend} differs on the view"


@pytest.mark.parametrize("backend", LP_BACKENDS)
def test_inplace_backward_on_a_strided_view(backend):
    """The in-place backward writes the gradient into the view's own rows and nowhere else."""
    big = torch.randn(2, 6, 305, device=DEVICE) * 3
    x = big[:, :-1, :301]
    labels = torch.randint(0, 301, (2, 5), device=DEVICE)
    labels[1, 2] = -100
    g_lp, g_ent = torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE)
    _, _, want = _lp_run(_public(backend), x, labels, g_lp, g_ent)
    before = big.clone()
    if backend == "triton":
        from rlhf_fast.ops import logprobs as tlp
        h = big.clone().requires_grad_()
        logits = h * 1.0  # a non-leaf whose backward does not read it
        view = logits[:, :-1, :301]
        seen = {}
        view.register_hook(lambda g: seen.update(ptr=g.data_ptr(), grad=g))
        with _Copies(torch.float32, x.numel() // 2) as mode:
            lp, ent = tlp.logprobs_inplace_backward(view, labels, return_entropy=True)
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        assert mode.seen == [], f"copied: {mode.seen}"
        assert seen["ptr"] == view.data_ptr()
        assert torch.equal(seen["grad"], want)
    else:
        ops = torch.ops.rlhf_fast
        buf = big.clone()
        view = buf[:, :-1, :301]
        lp, ent, lse = ops.logprobs_fwd(view, labels.reshape(-1), 1.0, -100)
        ops.logprobs_bwd_(view, g_lp.reshape(-1), g_ent.reshape(-1), labels.reshape(-1), lse, ent, 1.0, -100)
        assert torch.equal(view, want)
        assert torch.equal(buf[:, -1], before[:, -1]) and torch.equal(buf[..., 301:], before[..., 301:])


# ----------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("backend", LP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_batch_invariant(backend, dtype):
    N, V = 9, 1031  # two CPU chunks, three Triton blocks, an odd row length (16-byte phase varies by row)
    x = (torch.randn(N, V, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    g_lp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    f = _public(backend, temperature=0.8)
    full = _lp_run(f, x, labels, g_lp, g_ent)
    for i in (0, 4, 8):
        alone = _lp_run(f, x[i:i + 1].clone(), labels[i:i + 1], g_lp[i:i + 1], g_ent[i:i + 1])
        for a, b in zip(alone, full):
            assert torch.equal(a, b[i:i + 1]), f"row {i} alone differs from the batch"
    part = _lp_run(f, x[3:8], labels[3:8], g_lp[3:8], g_ent[3:8])
    grid = _lp_run(f, x.reshape(3, 3, V), labels.reshape(3, 3), g_lp.reshape(3, 3), g_ent.reshape(3, 3))
    for a, b, c in zip(part, grid, full):
        assert torch.equal(a, c[3:8]) and torch.equal(b.reshape(c.shape), c)


@pytest.mark.parametrize("backend", LP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("V", [1031, 4133])  # one program per row; rows split over programs (fp32, fp64)
def test_logprobs_row_bits_do_not_depend_on_its_address(backend, dtype, V):
    """A row at every element offset from a 16-byte boundary (the Triton forward's straddling loads, one
    compiled loop per offset) gives the bits of the same row on the boundary, forward and backward."""
    vec = 16 // torch.empty(0, dtype=dtype).element_size()
    row = (torch.randn(1, V, device=DEVICE) * 3).to(dtype)
    label = torch.randint(0, V, (1,), device=DEVICE)
    g_lp, g_ent = torch.randn(1, device=DEVICE), torch.randn(1, device=DEVICE)
    f = _public(backend, temperature=0.8)
    buf = torch.zeros(V + vec, dtype=dtype, device=DEVICE)
    assert buf.data_ptr() % 16 == 0
    want = None
    for o in range(vec):
        buf.zero_()
        buf[o:o + V] = row[0]
        got = _lp_run(f, buf[o:o + V][None], label, g_lp, g_ent)
        if want is None:
            want = got
        for a, b, what in zip(got, want, ("logp", "entropy", "grad")):
            assert torch.equal(a, b), f"{what} of the row at element offset {o} differs from offset 0"


@pytest.mark.parametrize("backend", LIN_BACKENDS)
def test_linear_logprobs_invariant_to_chunking(backend, monkeypatch):
    """Chunking never changes a row's bits. torch.mm itself is not batch-invariant (MKL and cuBLAS pick
    kernels by the row count), so it is swapped for a row-by-row product here to test the chunking alone."""
    from rlhf_fast.ops import linear_logprobs as lin

    def rowwise_mm(a, b, acc):
        return torch.stack([(r.to(acc) @ b.to(acc)) for r in a]) if a.shape[0] else a.new_empty(0, b.shape[1], dtype=acc)
    monkeypatch.setattr(lin, "_mm", rowwise_mm)
    N, H, V = 13, 16, 301
    hidden, weight = torch.randn(N, H, device=DEVICE), torch.randn(V, H, device=DEVICE) / 2
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[5] = -100
    g_lp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    impl = rf._backend.select("linear_logprobs", hidden.device, backend)

    def run(chunk, rows=slice(None)):
        h = hidden[rows].clone().requires_grad_()
        lp, ent = impl(h, weight, labels[rows], None, 0.9, -100, True, chunk_size=chunk)
        (gh,) = torch.autograd.grad((lp * g_lp[rows]).sum() + (ent * g_ent[rows]).sum(), h)
        return lp, ent, gh

    full = run(None)
    for chunk in (1, 3, 8):
        for a, b in zip(run(chunk), full):
            assert torch.equal(a, b), f"chunk_size={chunk} changed a row"
    for a, b in zip(run(2, slice(4, 9)), full):
        assert torch.equal(a, b[4:9]), "a sub-batch changed a row"


# ----------------------------------------------------------------------------- Triton specifics
@pytest.mark.skipif("triton" not in LP_BACKENDS, reason="Triton backend unavailable here")
def test_triton_launchers_run_under_the_tensor_device(monkeypatch):
    """Every launcher enters the logits' device (torch.cuda.device for CUDA tensors: cuda:1 without set_device)."""
    from rlhf_fast import _backend
    from rlhf_fast.ops import linear_logprobs as lin

    guard = _backend.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_backend.device_guard(torch.zeros(1).device), contextlib.nullcontext)
    entered = []

    def spy(device):
        entered.append(device)
        return contextlib.nullcontext()
    monkeypatch.setattr(_backend, "device_guard", spy)
    x = torch.randn(2, 3, 40, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 40, (2, 3), device=DEVICE)
    lp, ent = rf.logprobs(x, labels, return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    assert len(entered) == 2, "logprobs forward and backward"
    loss, _ = rf.ppo_loss_from_logits(x, labels, lp.detach(), torch.randn(2, 3, device=DEVICE), labels >= 0,
                                      backend="triton")
    loss.backward()
    assert len(entered) == 4, "ppo_loss_from_logits forward and backward"
    lp = lin.linear_logprobs_triton(torch.randn(4, 8, device=DEVICE, requires_grad=True),
                                    torch.randn(40, 8, device=DEVICE), labels.reshape(-1)[:4])
    lp.sum().backward()
    assert len(entered) >= 6, "linear_logprobs forward and backward"


@pytest.mark.skipif("triton" not in FL_BACKENDS, reason="Triton backend unavailable here")
def test_triton_ppo_accumulates_in_the_logits_dtype(monkeypatch):
    """fp32 logits with fp64 per-token inputs: the [N, V] pass runs in fp32 (fp64 only for fp64 logits)."""
    import triton.language as tl

    from rlhf_fast.ops import ppo_loss_from_logits as tfl
    seen = {}
    real = tfl._fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.update(kw)
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(tfl, "_fwd_kernel", Spy())
    x = torch.randn(2, 3, 40, device=DEVICE)
    labels = torch.randint(0, 40, (2, 3), device=DEVICE)
    old = torch.randn(2, 3, dtype=torch.float64, device=DEVICE)
    for dtype, want in ((torch.float32, tl.float32), (torch.bfloat16, tl.float32), (torch.float64, tl.float64)):
        got, st = rf.ppo_loss_from_logits(x.to(dtype), labels, old, old, labels >= 0, backend="triton")
        assert seen["ROW_ACC"] == want and seen["ACC"] == tl.float64
        want_loss, _ = rf.ppo_loss_from_logits(x.to(dtype).double(), labels, old, old, labels >= 0, backend="reference")
        assert_rel(got, want_loss, 1e-5 if dtype != torch.float64 else 1e-12, f"{dtype} loss")


@pytest.mark.skipif(not _compiled.LOADED, reason="compiled extension not built")
def test_opcheck_on_strided_views():
    """The fake impls (rlhf_fast/_compiled.py) agree with the kernels on 3-D strided views (shapes and
    strides of every output). (No bad label here: opcheck compares outputs with NaN != NaN.)"""
    ops = torch.ops.rlhf_fast
    big = torch.randn(2, 5, 41, device=DEVICE)
    x = big[:, :-1, :37].detach().requires_grad_()  # [2, 4, 37], strides (205, 41, 1)
    labels = torch.randint(0, 37, (8,), device=DEVICE)
    labels[1] = -100
    torch.library.opcheck(ops.logprobs_fwd, (x, labels, 1.25, -100))
    _, ent, lse = ops.logprobs_fwd(x.detach(), labels, 1.25, -100)
    g = torch.randn(2, 8, device=DEVICE)
    torch.library.opcheck(ops.logprobs_bwd, (g[0], g[1], x.detach(), labels, lse, ent, 1.25, -100))
    torch.library.opcheck(ops.logprobs_bwd_, (big.clone()[:, :-1, :37], g[0], g[1], labels, lse, ent, 1.25, -100))
    assert ops.logprobs_bwd(g[0], None, x.detach(), labels, lse, ent, 1.25, -100).stride() == x.stride()
    old, adv = (torch.randn(2, 4, device=DEVICE, requires_grad=True) for _ in range(2))
    args = (x, labels, old, adv, torch.ones(2, 4, dtype=torch.bool, device=DEVICE), None, 0.0, "k3", 0.01, 1.0,
            0.2, 0.2, None, "token-mean")
    torch.library.opcheck(ops.ppo_from_logits_fwd, args)
    _, _, saved = ops.ppo_from_logits_fwd(*args)
    torch.library.opcheck(ops.ppo_from_logits_bwd, (torch.tensor(1.0, device=DEVICE), x.detach(), labels, saved, 1.0))
