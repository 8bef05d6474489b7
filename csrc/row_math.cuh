// The per-thread work of the CUDA logits-row kernels (logprobs_cuda.cu, ppo_from_logits_cuda.cu), written
// once for the device and the host: the kernels call it per thread, and tests/csrc/row_math_emulator.cpp runs
// the same source on the CPU thread by thread (with the kernels' merge order), which is how it is tested
// on machines without a GPU. No torch headers: the emulator compiles in seconds.
//
// Forward, one pass over a row. Thread k of a block of n takes the 16-byte groups j ≡ k (mod n), group j
// being the columns [j·VEC, (j+1)·VEC) of the row (VEC = 16 / sizeof(scalar_t)), then the scalar tail
// past the last whole group. It keeps a running triple over raw logits x, with c = log2(e)/T:
//   m = max x,   s = Σ 2^((x - m)·c) = Σ e^((x - m)/T),   t = Σ 2^((x - m)·c)·(x - m),
// rebased once per group (m only grows): s·α, t·α + α·dm·s with dm = m_old - m_new, α = 2^(dm·c).
// (x - m) is formed exactly before the product by c, so huge logits (|x| ~ 1e4) keep their precision;
// 2^u is one ex2.approx.ftz on the GPU (MUFU.EX2; 2^-inf = 0, NaN stays NaN, results under 2^-126 flush to
// 0, far below any probability that matters). m starts at the lowest finite value, not -inf, so every
// difference is finite or -inf (inf - inf only beside a +inf logit, whose row is NaN as in the reference;
// the rebase's m_old - m_new is clamped finite, as it overflows when m jumps from the lowest value to ~3e38):
// a -inf logit adds 2^-inf = 0 to s and, through the clamp of (x - m) to the lowest finite value, 0 to t;
// a NaN logit is dropped by fmax but its 2^NaN makes s and t NaN, so the row's outputs are NaN. The groups
// are fixed by column index, never by address, so a row's bits do not depend on where it lies (batch
// invariance): a row that starts O elements past a 16-byte boundary reads each group as the two aligned 16-byte
// packs that straddle it (the second is the next thread's first, an L1 hit, no extra DRAM traffic) and picks its
// VEC elements with compile-time indices, one copy of the loop per O. Either pack of a whole group holds an
// element of the row, so neither load leaves the row's pages. A long row is split over several blocks
// (row_split), each taking a span of groups.
//
// Backward, elementwise given the row statistics: grad_x = a·(onehot - p) - b·p·(log p + H) with a = g_lp/T,
// b = g_ent/T, written as -p·(a + b·H + b·ln2·w2) with w2 = log2 p, p = 2^w2, and the label's column fixed
// by the thread that owns it after its loop (a + the same expression; it read x[label] first, so the
// backward may run in place).
#pragma once
#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <algorithm>

#if defined(__CUDACC__)
#define RLHF_FAST_RD __host__ __device__ __forceinline__
#else
#define RLHF_FAST_RD inline
#endif

namespace rlhf_fast {
namespace row {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// VEC elements in one 16-byte load or store.
template <typename T, int VEC>
struct alignas(16) Pack {
  T v[VEC];
};

template <typename acc_t>
RLHF_FAST_RD acc_t lowest() {
  return -std::numeric_limits<acc_t>::max();
}

// The C math functions below are callable from the host and the device alike (CUDA declares them both).
// max that drops a NaN operand (FMNMX)
RLHF_FAST_RD float vmax(float a, float b) { return fmaxf(a, b); }
RLHF_FAST_RD double vmax(double a, double b) { return fmax(a, b); }

// 2^x in the hot loops: ex2.approx.ftz for fp32 on the GPU; the host (emulator) and fp64 take exp2, or on the
// host the emulator's stand-in for ex2.approx.ftz (RLHF_FAST_HOST_EX2: an error and a flush to zero like it).
RLHF_FAST_RD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#elif defined(RLHF_FAST_HOST_EX2)
  return RLHF_FAST_HOST_EX2(x);
#else
  return exp2f(x);
#endif
}
RLHF_FAST_RD double fast_exp2(double x) { return exp2(x); }
// once per merge: the accurate one
RLHF_FAST_RD float exact_exp2(float x) { return exp2f(x); }
RLHF_FAST_RD double exact_exp2(double x) { return exp2(x); }
RLHF_FAST_RD float log_of(float x) { return logf(x); }
RLHF_FAST_RD double log_of(double x) { return log(x); }

template <typename acc_t>
struct Triple {
  acc_t m, s, t;  // see the file comment; (lowest, 0, 0): nothing seen yet
};

template <typename acc_t>
RLHF_FAST_RD Triple<acc_t> empty_triple() {
  return {lowest<acc_t>(), acc_t(0), acc_t(0)};
}

// Folds n raw logits z into st: one rebase, then per element a sub, a product, one 2^u, a clamp and two adds.
template <typename acc_t, int N>
RLHF_FAST_RD void accumulate(Triple<acc_t>& st, const acc_t (&z)[N], acc_t c) {
  acc_t zmax = z[0];
#pragma unroll
  for (int k = 1; k < N; ++k) zmax = vmax(zmax, z[k]);
  const acc_t m = vmax(st.m, zmax);
  const acc_t dm = vmax(st.m - m, lowest<acc_t>());  // -inf when m = +inf: clamped, so alpha·dm is 0, not NaN
  const acc_t alpha = fast_exp2(dm * c);
  acc_t gs = 0, gt = 0;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const acc_t u = z[k] - m, e = fast_exp2(u * c);
    gs += e;
    gt += e * vmax(u, lowest<acc_t>());  // e·(x - m) = 0 at x = -inf
  }
  st.t = alpha * st.t + (alpha * dm) * st.s + gt;
  st.s = alpha * st.s + gs;
  st.m = m;
}

// (m1,s1,t1) ⊕ (m2,s2,t2) = (m, Σ αi·si, Σ αi·ti + αi·di·si), di = mi - m clamped finite, αi = 2^(di·c).
template <typename acc_t>
RLHF_FAST_RD Triple<acc_t> merge(const Triple<acc_t>& a, const Triple<acc_t>& b, acc_t c) {
  const acc_t m = vmax(a.m, b.m);
  const acc_t d1 = vmax(a.m - m, lowest<acc_t>()), d2 = vmax(b.m - m, lowest<acc_t>());
  const acc_t a1 = exact_exp2(d1 * c), a2 = exact_exp2(d2 * c);
  return {m, a1 * a.s + a2 * b.s, a1 * a.t + (a1 * d1) * a.s + (a2 * b.t + (a2 * d2) * b.s)};
}

// One 16-byte read-only load as four words (the forward never writes the logits): ld.global.nc.v4 on the GPU
// (through the read-only path; ptxas still trims it to the words used).
RLHF_FAST_RD void load16(const void* __restrict__ p, unsigned (&w)[4]) {
#if defined(__CUDA_ARCH__)
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
#else
  std::memcpy(w, p, 16);
#endif
}

// Group j of a row whose element 0 lies O elements past the 16-byte boundary `al`: pack j, and off the boundary
// pack j + 1 too. ptxas trims each 16-byte load to the words the group uses (e.g. 128 + 32 bits, or 64 + 64), so
// a group costs two load instructions that stay inside two aligned packs; making the unused words look used to
// keep both loads 128-bit would only add instructions.
template <int O, typename scalar_t, typename acc_t, int VEC>
RLHF_FAST_RD void load_group(const Pack<scalar_t, VEC>* __restrict__ al, int64_t j, acc_t (&z)[VEC]) {
  using P = Pack<scalar_t, VEC>;
  unsigned pw[4];
  load16(al + j, pw);
  P p;
  std::memcpy(&p, pw, 16);
  if constexpr (O == 0) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = static_cast<acc_t>(p.v[k]);
  } else {
    unsigned qw[4];
    load16(al + j + 1, qw);
    P q;
    std::memcpy(&q, qw, 16);
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = static_cast<acc_t>(k + O < VEC ? p.v[k + O] : q.v[k + O - VEC]);
  }
}

template <int O, typename scalar_t, typename acc_t, int VEC>
RLHF_FAST_RD void groups_at(Triple<acc_t>& st, const Pack<scalar_t, VEC>* __restrict__ al, int64_t g0, int64_t g1,
                            acc_t c, int tid, int nthreads) {
  for (int64_t j = g0 + tid; j < g1; j += nthreads) {
    acc_t z[VEC];
    load_group<O>(al, j, z);
    accumulate(st, z, c);
  }
}

// The whole groups of a row, dispatched on its offset o from a 16-byte boundary (uniform over a block).
template <typename scalar_t, typename acc_t, int VEC, int O = 0>
RLHF_FAST_RD void groups(Triple<acc_t>& st, const Pack<scalar_t, VEC>* __restrict__ al, int o, int64_t g0, int64_t g1,
                         acc_t c, int tid, int nthreads) {
  if constexpr (O < VEC) {
    if (o == O)
      groups_at<O>(st, al, g0, g1, c, tid, nthreads);
    else
      groups<scalar_t, acc_t, VEC, O + 1>(st, al, o, g0, g1, c, tid, nthreads);
  }
}

// Small N: a row is split over `split` blocks, block k taking the groups [k·S, (k+1)·S) (and the last block the
// rest and the scalar tail), S = row_span, so that few rows still fill the GPU: about nthreads·16 groups per
// block, at most kMaxSplit blocks. split and S depend on V and the block size only (threads_for(V)), never on
// N, so a row's bits do not depend on the batch; the blocks' triples are merged in the order k = 0, 1, ..
// (logprobs_row_cuda.cuh, split_merge).
constexpr int kGroupsPerThread = 16;
constexpr int kMaxSplit = 32;  // split_merge stages the partials in 32-entry shared arrays

template <typename scalar_t>
RLHF_FAST_RD int64_t row_groups(int64_t V) {
  return V / (16 / int64_t(sizeof(scalar_t)));
}

template <typename scalar_t>
RLHF_FAST_RD int row_split(int64_t V, int nthreads) {
  const int64_t g = int64_t(nthreads) * kGroupsPerThread, n = row_groups<scalar_t>(V);
  if (n <= g) return 1;
  const int64_t k = (n + g - 1) / g;
  return static_cast<int>(k < kMaxSplit ? k : kMaxSplit);
}

// Groups per span: the row's groups shared evenly, rounded up to whole rounds of the block's threads.
template <typename scalar_t>
RLHF_FAST_RD int64_t row_span(int64_t V, int split, int nthreads) {
  const int64_t per = (row_groups<scalar_t>(V) + split - 1) / split;
  return (per + nthreads - 1) / nthreads * nthreads;
}

// Thread tid's triple of span k of one row (c = log2(e)/T). The block merges its threads' triples in a fixed
// order.
template <typename scalar_t, typename acc_t>
RLHF_FAST_RD Triple<acc_t> thread_row_triple(const scalar_t* __restrict__ row, int64_t V, acc_t c, int k, int split,
                                             int tid, int nthreads) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, VEC>;
  Triple<acc_t> st = empty_triple<acc_t>();
  const int o = static_cast<int>((reinterpret_cast<uintptr_t>(row) & 15) / sizeof(scalar_t));
  const int64_t n_vec = V / VEC, span = split == 1 ? n_vec : row_span<scalar_t>(V, split, nthreads);
  const int64_t g0 = k * span, g1 = k == split - 1 ? n_vec : (k + 1) * span;
  groups<scalar_t, acc_t, VEC>(st, reinterpret_cast<const P*>(row - o), o, g0, g1, c, tid, nthreads);
  if (k == split - 1) {
    for (int64_t i = n_vec * VEC + tid; i < V; i += nthreads) {
      const acc_t z[1] = {static_cast<acc_t>(row[i])};
      accumulate(st, z, c);
    }
  }
  return st;
}

// A row's outputs from its merged triple: log p(label), entropy, and lse in two parts (m, log s).
template <typename acc_t>
struct RowOut {
  acc_t logp, entropy, m, log_s;
  RLHF_FAST_RD acc_t lse(acc_t inv_t) const { return m * inv_t + log_s; }
};

template <typename acc_t>
RLHF_FAST_RD RowOut<acc_t> row_outputs(const Triple<acc_t>& st, acc_t x_label, acc_t inv_t) {
  const acc_t log_s = log_of(st.s);
  return {(x_label - st.m) * inv_t - log_s, log_s - (st.t * inv_t) / st.s, st.m, log_s};
}

// The backward's per-row constants: p = 2^w2, w2 = (x - shift)·c - log_s·log2(e) (TWO_PART) or
// x·c - log_s·log2(e) (one-part lse: shift unused), c = log2(e)/T; grad = -p·(k0 + k1·max(w2, -1e4)).
template <typename acc_t>
struct GradRow {
  acc_t shift, c, log_s2, k0, k1;
};

template <typename acc_t>
RLHF_FAST_RD GradRow<acc_t> grad_row(acc_t a, acc_t b, acc_t shift, acc_t log_s, acc_t h, acc_t inv_t) {
  return {shift, static_cast<acc_t>(inv_t * acc_t(kLog2e)), static_cast<acc_t>(log_s * acc_t(kLog2e)), a + b * h,
          static_cast<acc_t>(b * acc_t(kLn2))};
}

template <bool TWO_PART, typename acc_t>
RLHF_FAST_RD acc_t grad_value(acc_t x, const GradRow<acc_t>& g) {
  const acc_t w2 = TWO_PART ? (x - g.shift) * g.c - g.log_s2 : x * g.c - g.log_s2;
  const acc_t p = fast_exp2(w2);
  // log p below -1e4 has p = 0 exactly: the clamp keeps k1·w2 finite at -inf, so p·(...) is 0, not NaN
  return -p * (g.k0 + g.k1 * vmax(w2, acc_t(-1.0e4)));
}

// Thread tid's share of span k (of `split`, as the forward's) of one row of grad logits, written to orow (which
// may be row: in place). An ignored row gets zeros, a row whose label is out of [0, V) NaN; neither is read.
// With `same_phase` (row and orow equally far from a 16-byte boundary, as grad_like makes them) the body from
// the first boundary is read and written 16 bytes at a time, groups [k·S, (k+1)·S) in block k; the head (block
// 0), the tail past the last whole group (the last block), and every element of a row whose phases differ
// (block 0) go one element at a time. The element written does not depend on the path.
template <bool TWO_PART, typename scalar_t, typename acc_t>
RLHF_FAST_RD void thread_row_grad(const scalar_t* row, scalar_t* orow, int64_t V, int64_t label, bool ignored,
                                  const GradRow<acc_t>& g, acc_t a, int k, int split, int tid, int nthreads) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, VEC>;
  const int64_t span = split == 1 ? 0 : row_span<scalar_t>(V, split, nthreads);
  const bool first = k == 0, last = k == split - 1;
  auto head_len = [V](const void* p) {
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15) / static_cast<int64_t>(sizeof(scalar_t));
    const int64_t h = mis ? VEC - mis : 0;
    return h < V ? h : V;
  };
  auto body = [&](int64_t n_vec) {  // this block's groups of the body
    const int64_t g0 = k * span, g1 = last ? n_vec : (k + 1) * span;
    return std::pair<int64_t, int64_t>{g0 < n_vec ? g0 : n_vec, g1 < n_vec ? g1 : n_vec};
  };
  if (ignored || label < 0 || label >= V) {
    const scalar_t v = ignored ? scalar_t(0) : static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    const int64_t head = head_len(orow), n_vec = (V - head) / VEC, tail = head + n_vec * VEC;
    if (first)
      for (int64_t i = tid; i < head; i += nthreads) orow[i] = v;
    P fill;
#pragma unroll
    for (int e = 0; e < VEC; ++e) fill.v[e] = v;
    const auto [g0, g1] = body(n_vec);
    for (int64_t j = g0 + tid; j < g1; j += nthreads) reinterpret_cast<P*>(orow + head)[j] = fill;
    if (last)
      for (int64_t i = tail + tid; i < V; i += nthreads) orow[i] = v;
    return;
  }
  const bool same_phase = ((reinterpret_cast<uintptr_t>(row) ^ reinterpret_cast<uintptr_t>(orow)) & 15) == 0;
  const int64_t head = same_phase ? head_len(orow) : V;
  const int64_t n_vec = (V - head) / VEC, tail = head + n_vec * VEC;
  // the thread that writes column `label` in the loops below fixes it afterwards
  const bool owns = label < head   ? first && label % nthreads == tid
                    : label < tail ? (split == 1 ? 0 : std::min<int64_t>((label - head) / VEC / span, split - 1)) == k &&
                                         ((label - head) / VEC) % nthreads == tid
                                   : last && (label - tail) % nthreads == tid;
  const acc_t x_label = owns ? static_cast<acc_t>(row[label]) : acc_t(0);  // before this thread's stores
  if (first)
    for (int64_t i = tid; i < head; i += nthreads)
      orow[i] = static_cast<scalar_t>(grad_value<TWO_PART>(static_cast<acc_t>(row[i]), g));
  const P* vin = reinterpret_cast<const P*>(row + head);
  P* vout = reinterpret_cast<P*>(orow + head);
  const auto [g0, g1] = body(n_vec);
  for (int64_t j = g0 + tid; j < g1; j += nthreads) {
    const P p = vin[j];
    P q;
#pragma unroll
    for (int e = 0; e < VEC; ++e) q.v[e] = static_cast<scalar_t>(grad_value<TWO_PART>(static_cast<acc_t>(p.v[e]), g));
    vout[j] = q;
  }
  if (last)
    for (int64_t i = tail + tid; i < V; i += nthreads)
      orow[i] = static_cast<scalar_t>(grad_value<TWO_PART>(static_cast<acc_t>(row[i]), g));
  if (owns) orow[label] = static_cast<scalar_t>(a + grad_value<TWO_PART>(x_label, g));
}

}  // namespace row
}  // namespace rlhf_fast
