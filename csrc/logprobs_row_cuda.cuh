// Device helpers of the log-prob row kernels, shared by logprobs_cuda.cu and ppo_from_logits_cuda.cu:
// the online softmax triple (max of the raw logits, Σ e^w, Σ e^w·w with w = (x - max)/T) with its warp
// and block merges, 16-byte packs, and the per-element backward. (x - max) is formed before the
// temperature product, so huge logits keep their precision, as in logprobs_row.h.
#pragma once
#include <c10/macros/Macros.h>

#include "logits_layout.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace rlhf_fast {
namespace {

constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // rows past it are covered by the grid-stride loop
constexpr unsigned kFull = 0xffffffffu;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// VEC elements in one 16-byte load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
// As cpu_math.h: keeps p·(z - m) at 0, not nan, where z is -inf (p is 0 there).
__device__ __forceinline__ float clamp_low(float x) { return x < -87.0f ? -87.0f : x; }
__device__ __forceinline__ double clamp_low(double x) { return x < -745.0 ? -745.0 : x; }

template <typename acc_t>
struct Triple {
  // m: running max of the raw logits x; s = Σ e^w, t = Σ e^w·w with w = (x - m)·inv_t;
  // m = -inf: nothing seen yet (s = t = 0)
  acc_t m, s, t;
};

template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> empty_triple() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
}

// Moves the reference point to m_new >= st.m (finite): s·e^{d}, (t + d·s)·e^{d} with d = (m - m_new)·inv_t.
template <typename acc_t>
__device__ __forceinline__ void rebase(Triple<acc_t>& st, acc_t m_new, acc_t inv_t) {
  if (st.m != -std::numeric_limits<acc_t>::infinity()) {
    const acc_t d = (st.m - m_new) * inv_t, e = d_exp(d);
    st.t = e * (st.t + d * st.s);
    st.s = e * st.s;
  }
  st.m = m_new;
}

// A NaN logit makes the triple NaN (m = s = t = NaN) and it stays NaN through accumulate and merge.
template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> nan_triple() {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  return {nan, nan, nan};
}

// Adds n raw logits z (n = VEC, or 1 for the tail): one rebase per group, as the CPU does per chunk.
// NaN: max() drops it, but beside a finite max its exp makes s NaN; a group whose max is -inf (or NaN,
// all NaN) is searched for it, as row_stats does per chunk on the CPU.
template <typename acc_t, int N>
__device__ __forceinline__ void accumulate(Triple<acc_t>& st, const acc_t (&z)[N], acc_t inv_t) {
  acc_t zmax = z[0];
#pragma unroll
  for (int k = 1; k < N; ++k) zmax = max(zmax, z[k]);
  if (!(zmax > -std::numeric_limits<acc_t>::infinity())) {  // all -inf: contributes nothing, unless NaN
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (z[k] != z[k]) st = nan_triple<acc_t>();
    return;
  }
  if (zmax > st.m) rebase(st, zmax, inv_t);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const acc_t w = (z[k] - st.m) * inv_t, e = d_exp(w);
    st.s += e;
    st.t += e * clamp_low(w);
  }
}

// (m1,s1,t1) ⊕ (m2,s2,t2) = (m, Σ e^{di}·si, Σ e^{di}·(ti + di·si)) with di = (mi - m)·inv_t; an empty
// side (m = -inf) adds nothing, so there is no inf - inf. A NaN side (m = NaN) gives NaN.
template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> merge(const Triple<acc_t>& a, const Triple<acc_t>& b, acc_t inv_t) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t m = max(a.m, b.m);                 // drops a NaN m unless both are NaN
  if (!(m > kNegInf)) return a.m != a.m ? a : b;  // both empty or NaN: the NaN one if any
  Triple<acc_t> r{m, acc_t(0), acc_t(0)};
  if (a.m != kNegInf) {
    const acc_t d = (a.m - m) * inv_t, e = d_exp(d);
    r.s += e * a.s;
    r.t += e * (a.t + d * a.s);
  }
  if (b.m != kNegInf) {
    const acc_t d = (b.m - m) * inv_t, e = d_exp(d);
    r.s += e * b.s;
    r.t += e * (b.t + d * b.s);
  }
  return r;
}

template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> warp_merge(Triple<acc_t> st, acc_t inv_t) {
  for (int off = 16; off > 0; off >>= 1) {
    const Triple<acc_t> o{__shfl_down_sync(kFull, st.m, off), __shfl_down_sync(kFull, st.s, off),
                          __shfl_down_sync(kFull, st.t, off)};
    st = merge(st, o, inv_t);  // lanes >= 32 - off merge garbage; only lane 0's result is used
  }
  return st;
}

// The block's triple, valid in thread 0; ends with a barrier so the shared arrays can be reused.
template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> block_merge(Triple<acc_t> st, acc_t* sm, acc_t* ss, acc_t* stt, acc_t inv_t) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  st = warp_merge(st, inv_t);
  if (lane == 0) sm[warp] = st.m, ss[warp] = st.s, stt[warp] = st.t;
  __syncthreads();
  if (warp == 0) {
    st = lane < n_warps ? Triple<acc_t>{sm[lane], ss[lane], stt[lane]} : empty_triple<acc_t>();
    st = warp_merge(st, inv_t);
  }
  __syncthreads();
  return st;
}

// Elements before the first 16-byte boundary of a row (vector loads start there).
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* p, int64_t V) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15) / static_cast<int64_t>(sizeof(T));
  return min(V, mis ? static_cast<int64_t>(16 / sizeof(T)) - mis : int64_t(0));
}

// One block's pass over a row: the triple of z = x·inv_t (relative to the raw max), merged over the
// block and valid in thread 0. Thread k takes the groups j ≡ k (mod blockDim) of VEC elements
// [j·VEC, (j+1)·VEC) of the row, then the scalar tail past the last whole group: the grouping and the
// merge order depend on the row's index space only, never on its address, so a row's bits do not
// depend on where it lies (batch invariance). A row starting on a 16-byte boundary reads each group
// with one 16-byte load; any other row (V·sizeof not a multiple of 16) reads the same groups with scalar
// loads. Ends with block_merge's barrier.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Triple<acc_t> block_row_triple(const scalar_t* row, int64_t V, acc_t inv_t, acc_t* sm,
                                                          acc_t* ss, acc_t* stt) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  Triple<acc_t> st = empty_triple<acc_t>();
  const int64_t n_vec = V / VEC, tail = n_vec * VEC;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const Pack<scalar_t, VEC>* vrow = reinterpret_cast<const Pack<scalar_t, VEC>*>(row);
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
      const Pack<scalar_t, VEC> p = vrow[j];
      acc_t z[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = static_cast<acc_t>(p.v[k]);
      accumulate(st, z, inv_t);
    }
  } else {
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
      acc_t z[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = static_cast<acc_t>(row[j * VEC + k]);
      accumulate(st, z, inv_t);
    }
  }
  for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x) {
    const acc_t z[1] = {static_cast<acc_t>(row[i])};
    accumulate(st, z, inv_t);
  }
  return block_merge(st, sm, ss, stt, inv_t);
}

// Sums N doubles over the block in a fixed order (warp tree, then warp 0 over the warps' sums), so
// results do not depend on scheduling; valid in thread 0. Ends with a barrier so that `smem`
// (32·N doubles) can be reused at once. blockDim.x: a multiple of 32, at most 1024.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
  for (int j = 0; j < N; ++j)
    for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_down_sync(kFull, v[j], off);
  if (lane == 0)
    for (int j = 0; j < N; ++j) smem[warp * N + j] = v[j];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      v[j] = lane < n_warps ? smem[lane * N + j] : 0.0;
      for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_down_sync(kFull, v[j], off);
    }
  }
  __syncthreads();
}

// grad_x = a·(onehot - p) - b·p·(log p + H) with a = g_lp/T, b = g_ent/T and log p = (x - shift)·inv_t - log_s
// (as row_grad in logprobs_row.h; shift = 0, log_s = lse for a one-part lse).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_entry(acc_t x, bool is_label, acc_t a, acc_t b, acc_t shift, acc_t log_s,
                                            acc_t h, acc_t inv_t) {
  const acc_t w = (x - shift) * inv_t - log_s, p = d_exp(w);
  const acc_t ent_term = b * p * (clamp_low(w) + h);
  return is_label ? a * (acc_t(1) - p) - ent_term : -a * p - ent_term;
}

// One block writes one row of grad logits, grad_entry of each element, with 16-byte loads and stores
// when `row` and `orow` share their offset from a 16-byte boundary (elementwise: the path taken does not
// change any value). An ignored row gets zeros, a row whose label is out of [0, V) NaN; neither is read.
// `orow` may be `row` (in-place backward): each element is read before it is written, by one thread.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_row_grad(const scalar_t* row, scalar_t* orow, int64_t V, int64_t label,
                                               bool ignored, acc_t a, acc_t b, acc_t shift, acc_t log_s, acc_t h,
                                               acc_t inv_t) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, VEC>;
  const bool same_phase = ((reinterpret_cast<uintptr_t>(row) ^ reinterpret_cast<uintptr_t>(orow)) & 15) == 0;
  const int64_t head = same_phase ? head_len(orow, V) : V;
  const int64_t n_vec = (V - head) / VEC, tail = head + n_vec * VEC;
  if (ignored || !label_in_row(label, V)) {
    const scalar_t v = ignored ? scalar_t(0) : static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    const int64_t ohead = head_len(orow, V), on_vec = (V - ohead) / VEC, otail = ohead + on_vec * VEC;
    for (int64_t i = threadIdx.x; i < ohead; i += blockDim.x) orow[i] = v;
    P fill;
#pragma unroll
    for (int k = 0; k < VEC; ++k) fill.v[k] = v;
    for (int64_t j = threadIdx.x; j < on_vec; j += blockDim.x) reinterpret_cast<P*>(orow + ohead)[j] = fill;
    for (int64_t i = otail + threadIdx.x; i < V; i += blockDim.x) orow[i] = v;
    return;
  }
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x)
    orow[i] = static_cast<scalar_t>(grad_entry(static_cast<acc_t>(row[i]), i == label, a, b, shift, log_s, h, inv_t));
  for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
    const P p = reinterpret_cast<const P*>(row + head)[j];
    P q;
    const int64_t i0 = head + j * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      q.v[k] = static_cast<scalar_t>(
          grad_entry(static_cast<acc_t>(p.v[k]), i0 + k == label, a, b, shift, log_s, h, inv_t));
    reinterpret_cast<P*>(orow + head)[j] = q;
  }
  for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x)
    orow[i] = static_cast<scalar_t>(grad_entry(static_cast<acc_t>(row[i]), i == label, a, b, shift, log_s, h, inv_t));
}

// Threads per row: enough 16-byte loads in flight for long rows, few idle threads for short ones.
int threads_for(int64_t V) { return V >= 32768 ? 512 : (V >= 4096 ? 256 : 128); }
// (at least one block: a grid of 0 is a launch error; the grid-stride loops skip empty work)
unsigned blocks_for(int64_t N) { return static_cast<unsigned>(std::max<int64_t>(1, std::min(N, kMaxBlocks))); }

}  // namespace
}  // namespace rlhf_fast
