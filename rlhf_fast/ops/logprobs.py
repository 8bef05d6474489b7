"""logprobs in Triton: log softmax(logits / T)[label] and the entropy, without an [N, V] temporary.

Forward: a row is read once as tiles of 16-byte groups (VEC elements, one thread each, groups in the row's
index space). A row on a 16-byte boundary reads a group with one 128-bit load; in a row o elements past one,
a group straddles two aligned 16-byte packs, read from both (each load inside one pack, ptxas keeping the
words the group uses; the second pack is the next group's first) and cut out in registers at the
compile-time offset o (one loop per o, the same tile as the aligned path: same bits). Each group keeps a
running raw max m, s = Σ 2^((x-m)·log2(e)/T) and t = Σ 2^(…)·(x-m) (rescaled when m moves;
``ex2.approx.ftz`` of the exact difference x - m on a GPU), so the max and sums of a chunk stay in
registers; the groups' triples are merged once per row. The row is split over SPLIT = cdiv(V,
_CHUNKS_PER_PROGRAM chunks) programs (a function of V only: a row's bits never depend on N); the last of
a row's programs merges their partial triples in a fixed order and reads the label's logit once:
logp = (x_y - m)/T - log s, H = log s - t/(T·s), lse = m/T + log s. Backward: elementwise, one read and
one write of [N, V] over an aligned body with a masked head/tail (128-bit for any V and row stride), p
recomputed from lse: grad_z = g_lp·(onehot - p) - g_ent·p·(z - lse + H), grad_x = grad_z / T
— optionally written into the logits buffer itself (``logprobs_inplace_backward``).

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

_MAX_BLOCK_V = 2048  # elements of one chunk (tests lower it to exercise the loop); bf16: 8 per lane x 256 lanes
_CHUNKS_PER_PROGRAM = 16  # a row is split over cdiv(V, 16 chunks) programs: fixed by V, never by N
_LOG2E = 1.4426950408889634


@triton.jit
def _row_offset(row, T, s0, s1):
    """Offset of row `row` of a [B, T, V] view with strides (s0, s1, 1)."""
    return (row // T) * s0 + (row % T) * s1


@triton.jit
def _lowest(ACC: tl.constexpr):
    if ACC == tl.float64:
        return -1.7976931348623157e308
    else:
        return -3.4028234663852886e38


@triton.jit
def _exp2(w, FAST: tl.constexpr):
    """2^w. FAST (fp32 on a GPU): one ex2.approx.ftz (MUFU.EX2; 2^-inf = 0, NaN stays NaN, results below
    2^-126 flush to 0, far under any probability that matters); else tl.math.exp2 (the interpreter, fp64)."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [w], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.math.exp2(w)


@triton.jit
def _merge_triples(m1, s1, t1, c1, m2, s2, t2, c2):
    """Merge two (raw max m, s = Σ 2^((x-m)·c), t = Σ 2^((x-m)·c)·(x-m)) triples; c = log2(e)/T rides along."""
    m = tl.maximum(m1, m2)
    d1 = tl.maximum(m1 - m, _lowest(m1.dtype))  # finite: never inf·0 below
    d2 = tl.maximum(m2 - m, _lowest(m2.dtype))
    a1 = tl.math.exp2(d1 * c1)
    a2 = tl.math.exp2(d2 * c2)
    return m, a1 * s1 + a2 * s2, a1 * t1 + (a1 * d1) * s1 + (a2 * t2 + (a2 * d2) * s2), c1


@triton.jit
def _accumulate(x, m, s, t, c2, FAST: tl.constexpr):
    """Fold a [G, VEC] tile of raw logits into per-group triples m, s, t [G] (each group's VEC elements sit in
    one thread: the max and sums over axis 1 are in registers, no shuffle, no barrier)."""
    m_new = tl.maximum(m, tl.max(x, 1))  # NaN is ignored here; its 2^NaN makes s NaN below
    dm = tl.maximum(m - m_new, _lowest(x.dtype))  # finite, so alpha·dm is 0, never NaN, when alpha = 0
    alpha = _exp2(dm * c2, FAST)
    u = x - m_new[:, None]  # exact subtraction first: huge logits lose nothing to the temperature product
    e = _exp2(u * c2, FAST)
    t = alpha * t + (alpha * dm) * s + tl.sum(e * tl.maximum(u, _lowest(x.dtype)), 1)  # e·(x-m) = 0 at -inf
    s = alpha * s + tl.sum(e, 1)
    return m_new, s, t


@triton.jit
def _columns(p, VEC: tl.constexpr):
    """The VEC columns ([G] each, in order) of a [G, VEC] tile whose rows sit in one thread: splits of its
    registers, no data movement."""
    G: tl.constexpr = p.shape[0]
    if VEC == 2:
        return tl.split(p)
    elif VEC == 4:
        even, odd = tl.split(tl.reshape(p, [G, 2, 2]))
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        return c0, c1, c2, c3
    else:
        tl.static_assert(VEC == 8)
        even, odd = tl.split(tl.reshape(p, [G, 4, 2]))
        e0, e1 = tl.split(tl.reshape(even, [G, 2, 2]))  # columns (0, 4) and (2, 6)
        o0, o1 = tl.split(tl.reshape(odd, [G, 2, 2]))  # columns (1, 5) and (3, 7)
        c0, c4 = tl.split(e0)
        c2, c6 = tl.split(e1)
        c1, c5 = tl.split(o0)
        c3, c7 = tl.split(o1)
        return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _tile(c, VEC: tl.constexpr):
    """The [G, VEC] tile of the VEC columns c (the inverse of _columns, in the same register layout)."""
    G: tl.constexpr = c[0].shape[0]
    if VEC == 2:
        return tl.join(c[0], c[1])
    elif VEC == 4:
        return tl.reshape(tl.join(tl.join(c[0], c[2]), tl.join(c[1], c[3])), [G, 4])
    else:
        even = tl.reshape(tl.join(tl.join(c[0], c[4]), tl.join(c[2], c[6])), [G, 4])
        odd = tl.reshape(tl.join(tl.join(c[1], c[5]), tl.join(c[3], c[7])), [G, 4])
        return tl.reshape(tl.join(even, odd), [G, 8])


@triton.jit
def _straddle(p0, p1, O: tl.constexpr, VEC: tl.constexpr):
    """Columns O .. O + VEC - 1 of the [G, 2·VEC] tile [p0 | p1] (0 < O < VEC, a compile-time shift)."""
    c = _columns(p0, VEC) + _columns(p1, VEC)
    if VEC == 2:
        return _tile((c[O], c[O + 1]), VEC)
    elif VEC == 4:
        return _tile((c[O], c[O + 1], c[O + 2], c[O + 3]), VEC)
    else:
        return _tile((c[O], c[O + 1], c[O + 2], c[O + 3], c[O + 4], c[O + 5], c[O + 6], c[O + 7]), VEC)


@triton.jit
def _span_triple(x_ptr, row_off, phase0, lo, hi, c2, ACC: tl.constexpr, VEC: tl.constexpr,
                 BLOCK_V: tl.constexpr, ALIGNED: tl.constexpr, FAST: tl.constexpr):
    """(m, s, t) of the columns [lo, hi) of one row (lo a multiple of BLOCK_V), grouped in the row's index
    space: group g is the columns [g·VEC, (g+1)·VEC), whatever the row's address, so the summation order and
    a row's bits do not depend on where it lies (batch invariance). A row on a 16-byte boundary reads each
    group with one 128-bit load; with ALIGNED (every row is: the host checked the base and the strides) that
    is the only path, otherwise a row o elements past a boundary reads each group from the two aligned packs
    it straddles (_straddle); the ragged last chunk is a masked load."""
    G: tl.constexpr = BLOCK_V // VEC
    tile = tl.arange(0, G)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    m = tl.full([G], _lowest(ACC), ACC)
    s = tl.zeros([G], ACC)
    t = tl.zeros([G], ACC)
    c2v = tl.full([G], 0.0, ACC) + c2
    end = lo + ((hi - lo) // BLOCK_V) * BLOCK_V
    if ALIGNED or ((phase0 + row_off) % VEC == 0):
        # == x_ptr + row_off here, written so the compiler sees a multiple of VEC elements (16 bytes)
        base = x_ptr + (((phase0 + row_off) // VEC) * VEC - phase0)
        for start in range(lo, end, BLOCK_V):
            x = tl.load(base + start + tile).to(ACC)
            m, s, t = _accumulate(x, m, s, t, c2, FAST)
    else:
        # a row o = 1..VEC-1 elements past a boundary: group g straddles the aligned packs g and g+1 (from column
        # g·VEC - o); both are loaded (ptxas keeps the words the group uses; the second pack is the next group's
        # first: no extra DRAM traffic; each holds a column of the row, so neither load leaves the row's pages)
        # and the group is cut out in registers at the compile-time offset O, one loop per O: the same tile, in
        # the same register layout, as the aligned path's load, so the same bits
        o = (phase0 + row_off) % VEC
        base = x_ptr + (((phase0 + row_off) // VEC) * VEC - phase0)  # == x_ptr + row_off - o
        for O in tl.static_range(1, VEC):
            if o == O:
                for start in range(lo, end, BLOCK_V):
                    x = _straddle(tl.load(base + start + tile), tl.load(base + start + VEC + tile), O, VEC)
                    m, s, t = _accumulate(x.to(ACC), m, s, t, c2, FAST)
    c = end + tile  # the ragged last chunk, masked with -inf
    x = tl.load(x_ptr + row_off + c, mask=c < hi, other=float("-inf")).to(ACC)
    m, s, t = _accumulate(x, m, s, t, c2, FAST)
    m, s, t, _ = tl.reduce((m, s, t, c2v), 0, _merge_triples)
    return m, s, t


@triton.jit
def _row_triple(x_ptr, row, row_off, phase0, V, c2, part_ptr, count_ptr, ACC: tl.constexpr, VEC: tl.constexpr,
                BLOCK_V: tl.constexpr, SPAN: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                ALIGNED: tl.constexpr, FAST: tl.constexpr):
    """(done, m, s, t) of a whole row, the row split over SPLIT programs (axis 1 of the grid) of SPAN columns.

    SPLIT is a function of V alone, so a row's bits never depend on N. Each program writes its partial triple
    to part_ptr[row, k]; the last to finish (a per-row atomic counter decides who, not in what order) merges
    the SPLIT triples in the fixed order k = 0, 1, ... and gets done = True; the others get done = False."""
    if SPLIT == 1:
        m, s, t = _span_triple(x_ptr, row_off, phase0, 0, V, c2, ACC, VEC, BLOCK_V, ALIGNED, FAST)
        done = tl.program_id(1) == 0  # always (a grid of one program per row): a bool like the split's
    else:
        k = tl.program_id(1)
        lo = k * SPAN
        hi = tl.minimum(lo + SPAN, V)
        m, s, t = _span_triple(x_ptr, row_off, phase0, lo, hi, c2, ACC, VEC, BLOCK_V, ALIGNED, FAST)
        p = part_ptr + (row * SPLIT + k) * 3
        tl.store(p, m)
        tl.store(p + 1, s)
        tl.store(p + 2, t)
        tl.debug_barrier()  # every thread's stores happen before the release below
        done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel") == SPLIT - 1
        if done:
            ks = tl.arange(0, SPLIT_P2)
            q = part_ptr + (row * SPLIT + ks) * 3
            ok = ks < SPLIT
            pm = tl.load(q, mask=ok, other=_lowest(ACC), volatile=True)
            ps = tl.load(q + 1, mask=ok, other=0.0, volatile=True)
            pt = tl.load(q + 2, mask=ok, other=0.0, volatile=True)
            m, s, t, _ = tl.reduce((pm, ps, pt, tl.zeros_like(ps) + c2), 0, _merge_triples)
    return done, m, s, t


@triton.jit
def _logprobs_fwd_kernel(x_ptr, T, s0, s1, phase0, labels_ptr, logp_ptr, ent_ptr, lse_ptr, part_ptr, count_ptr, V,
                         ignore_index, inv_t_hi, inv_t_lo, c2_hi, c2_lo, ACC: tl.constexpr, VEC: tl.constexpr,
                         BLOCK_V: tl.constexpr, SPAN: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                         ALIGNED: tl.constexpr, FAST: tl.constexpr):
    # grid (N, SPLIT): program (row, k) reads the columns [k·SPAN, (k+1)·SPAN) of its row
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:  # not read at all
        if tl.program_id(1) == 0:
            tl.store(logp_ptr + row, tl.zeros([], ACC))
            tl.store(ent_ptr + row, tl.zeros([], ACC))
            tl.store(lse_ptr + row, tl.zeros([], ACC))
    elif (label < 0) | (label >= V):  # out of range (no host check ran): the row is NaN, nothing is read
        if tl.program_id(1) == 0:
            nan = tl.full([], float("nan"), ACC)
            tl.store(logp_ptr + row, nan)
            tl.store(ent_ptr + row, nan)
            tl.store(lse_ptr + row, nan)
    else:
        # 1/T and log2(e)/T as fp32 pairs: exact enough for fp64 rows (float kernel arguments are fp32)
        inv_t = (tl.zeros([], ACC) + inv_t_hi) + inv_t_lo
        c2 = (tl.zeros([], ACC) + c2_hi) + c2_lo
        row_off = _row_offset(row, T, s0, s1)
        done, m, s, t = _row_triple(x_ptr, row, row_off, phase0, V, c2, part_ptr, count_ptr, ACC, VEC, BLOCK_V,
                                    SPAN, SPLIT, SPLIT_P2, ALIGNED, FAST)
        if done:
            x_label = tl.load(x_ptr + row_off + label).to(ACC)  # once, outside the loop
            log_s = tl.log(s)
            tl.store(logp_ptr + row, (x_label - m) * inv_t - log_s)
            tl.store(ent_ptr + row, log_s - (t * inv_t) / s)
            tl.store(lse_ptr + row, m * inv_t + log_s)


@triton.jit
def _grad_elems(x, m, log_s, scale, a, b, h, TWO_PART: tl.constexpr, FAST: tl.constexpr):
    """-p·(a + b·(w + h)), w = log p in one of two forms:
    TWO_PART: w = (x - m)·scale - log_s in log2 units (scale = log2(e)/T, log_s = log2 Σ, h and b converted by
    the caller), so p = 2^w needs no extra product; else w = x·scale - log_s natural (scale = 1/T, log_s = lse)."""
    if TWO_PART:
        w = (x - m) * scale - log_s
        p = _exp2(w, FAST)
    else:
        w = x * scale - log_s
        p = _exp2(w * tl.full([], 1.4426950408889634, w.dtype), FAST)  # tl.full: an fp64 constant stays fp64
    # log p below -1e4 has p = 0 exactly: the clamp keeps b·(w + h) finite at -inf, so 0·(...) is 0
    return -p * (a + b * (tl.maximum(w, -1.0e4) + h))


@triton.jit
def _grad_row(x_ptr, x_off, o_ptr, o_off, phase0, V, label, m, log_s, inv_t, a, b, h, ACC: tl.constexpr,
              VEC: tl.constexpr, BLOCK_V: tl.constexpr, SPAN: tl.constexpr, SPLIT: tl.constexpr,
              SAME: tl.constexpr, TWO_PART: tl.constexpr, FAST: tl.constexpr):
    """grad of one row (elementwise given the row statistics), written to o: an aligned body of 128-bit
    loads and stores from `head`, the first column on a 16-byte boundary, and a masked head and tail, for
    any V and row stride. The body is split over SPLIT programs (axis 1 of the grid) of SPAN columns.
    SAME: o has x's strides and 16-byte phase (the host checked), so o's body is aligned too. The label's
    column is fixed after the loop by the program whose span holds it (it read x[label] first: in place)."""
    k = tl.program_id(1)
    head = tl.minimum((VEC - (phase0 + x_off) % VEC) % VEC, V)
    n_body = V - head
    lo = k * SPAN
    hi = tl.maximum(tl.minimum(lo + SPAN, n_body), lo)
    end = lo + ((hi - lo) // BLOCK_V) * BLOCK_V
    owner = tl.where(label >= head, (label - head) // SPAN, 0)
    x_lab = tl.load(x_ptr + x_off + label).to(ACC)  # before any store: o may be x
    g_lab = a + _grad_elems(x_lab, m, log_s, inv_t, a, b, h, TWO_PART, FAST)
    al = ((phase0 + x_off + VEC - 1) // VEC) * VEC - phase0  # == x_off + head, visibly a multiple of VEC
    xb = x_ptr + al
    if SAME:
        ob = o_ptr + al
    else:
        ob = o_ptr + o_off + head
    cols = tl.arange(0, BLOCK_V)
    for start in range(lo, end, BLOCK_V):
        c = start + cols
        x = tl.load(xb + c).to(ACC)
        tl.store(ob + c, _grad_elems(x, m, log_s, inv_t, a, b, h, TWO_PART, FAST).to(o_ptr.dtype.element_ty))
    c = end + cols  # the ragged end of this program's span
    x = tl.load(xb + c, mask=c < hi, other=0.0).to(ACC)
    tl.store(ob + c, _grad_elems(x, m, log_s, inv_t, a, b, h, TWO_PART, FAST).to(o_ptr.dtype.element_ty),
             mask=c < hi)
    if k == 0:  # the head: columns [0, head)
        x = tl.load(x_ptr + x_off + cols, mask=cols < head, other=0.0).to(ACC)
        tl.store(o_ptr + o_off + cols,
                 _grad_elems(x, m, log_s, inv_t, a, b, h, TWO_PART, FAST).to(o_ptr.dtype.element_ty),
                 mask=cols < head)
    if owner == k:
        tl.debug_barrier()  # after every thread's store of this span, so the fixed value is the one that stays
        tl.store(o_ptr + o_off + label, g_lab.to(o_ptr.dtype.element_ty))


@triton.jit
def _fill_row(o_ptr, o_off, V, value, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    if tl.program_id(1) == 0:
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            tl.store(o_ptr + o_off + c, (tl.zeros([BLOCK_V], ACC) + value).to(o_ptr.dtype.element_ty), mask=c < V)


@triton.jit
def _logprobs_bwd_kernel(x_ptr, T, s0, s1, g_ptr, g0, g1, phase0, labels_ptr, glp_ptr, gent_ptr, lse_ptr, ent_ptr,
                         V, ignore_index, inv_t_hi, inv_t_lo, HAS_GENT: tl.constexpr, ACC: tl.constexpr,
                         VEC: tl.constexpr, BLOCK_V: tl.constexpr, SPAN: tl.constexpr, SPLIT: tl.constexpr,
                         SAME: tl.constexpr, FAST: tl.constexpr):
    # g_ptr may be x_ptr (in-place): each element is read before it is written, by the same program
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    g_off = _row_offset(row, T, g0, g1)
    if label == ignore_index:
        _fill_row(g_ptr, g_off, V, 0.0, ACC, BLOCK_V)
    elif (label < 0) | (label >= V):  # out-of-range label: a NaN row, the logits not read
        _fill_row(g_ptr, g_off, V, float("nan"), ACC, BLOCK_V)
    else:
        inv_t = (tl.zeros([], ACC) + inv_t_hi) + inv_t_lo
        a = tl.load(glp_ptr + row).to(ACC) * inv_t
        b = tl.zeros([], ACC)
        if HAS_GENT:
            b = tl.load(gent_ptr + row).to(ACC) * inv_t
        lse = tl.load(lse_ptr + row).to(ACC)
        h = tl.load(ent_ptr + row).to(ACC)
        _grad_row(x_ptr, _row_offset(row, T, s0, s1), g_ptr, g_off, phase0, V, label, tl.zeros([], ACC), lse,
                  inv_t, a, b, h, ACC, VEC, BLOCK_V, SPAN, SPLIT, SAME, False, FAST)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]  # rounded to fp32 on the host: no tensor, no sync


def _split(inv_t: float) -> tuple[float, float]:
    hi = _f32(inv_t)
    return hi, _f32(inv_t - hi)


def row_launch(V: int, x: torch.Tensor, max_block: int) -> dict:
    """Launch constants of the logits-row kernels for a [B, T, V] view x: VEC elements per 128-bit load,
    BLOCK_V columns per chunk (VEC per lane, two loads in flight for 4 warps at max_block), SPAN columns per
    program and SPLIT = cdiv(V, SPAN) programs per row: a function of V and the dtype only (never of N), so a
    row's bits do not depend on the batch; phase0 the base pointer's 16-byte phase in elements."""
    VEC = 16 // x.element_size()
    block = max(VEC, min(max_block * VEC // 8, triton.next_power_of_2(max(V, 1))))
    span = _CHUNKS_PER_PROGRAM * block
    split = max(1, triton.cdiv(V, span))
    return dict(VEC=VEC, BLOCK_V=block, SPAN=span, SPLIT=split, phase0=(x.data_ptr() // x.element_size()) % VEC,
                FAST=x.device.type != "cpu" and x.dtype != torch.float64, num_warps=4)


def _aligned_rows(x: torch.Tensor, phase0: int, VEC: int) -> bool:
    """Every row of the [B, T, V] view x starts on a 16-byte boundary."""
    return phase0 == 0 and all(s % VEC == 0 or n == 1 for s, n in zip(x.stride()[:2], x.shape[:2]))


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
        c2_hi, c2_lo = _split(inv_temperature * _LOG2E)
        kw = row_launch(V, x, _MAX_BLOCK_V)
        split = kw["SPLIT"]
        part = torch.empty(N * split * 3 if split > 1 else 1, dtype=dt, device=x.device)  # partial triples
        count = torch.zeros(N if split > 1 else 1, dtype=torch.int32, device=x.device)
        with _backend.device_guard(x.device):
            _logprobs_fwd_kernel[(N, split)](x, T, x.stride(0), x.stride(1), kw.pop("phase0"),
                                             labels.reshape(-1).contiguous(), logp, ent, lse, part, count, V,
                                             ignore_index, hi, lo, c2_hi, c2_lo,
                                             ACC=tl.float64 if dt == torch.float64 else tl.float32,
                                             SPLIT_P2=triton.next_power_of_2(split),
                                             ALIGNED=_aligned_rows(x, (x.data_ptr() // x.element_size()) % kw["VEC"],
                                                                   kw["VEC"]), **kw)
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
        kw = row_launch(V, x, _MAX_BLOCK_V)
        phase0 = kw.pop("phase0")
        same = o.stride()[:2] == x.stride()[:2] and (o.data_ptr() - x.data_ptr()) % 16 == 0
        with _backend.device_guard(x.device):
            _logprobs_bwd_kernel[(N, kw["SPLIT"])](x, T, x.stride(0), x.stride(1), o, o.stride(0), o.stride(1), phase0,
                                                   labels.reshape(-1).contiguous(), glp, gent, lse, entropy, V,
                                                   ignore_index, hi, lo, HAS_GENT=grad_entropy is not None,
                                                   ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
                                                   SAME=same, **kw)
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
