// Device side of the log-prob row kernels, shared by logprobs_cuda.cu and ppo_from_logits_cuda.cu: the
// block's merge of the threads' triples (warp shuffles, then warp 0 over the warps through shared memory,
// a fixed order: deterministic), a fixed-order block sum, and the launch shapes. The per-thread work
// (one pass over a row, the elementwise backward) is row_math.cuh, shared with the CPU emulator.
#pragma once
#include <c10/macros/Macros.h>

#include <ATen/ops/zeros.h>

#include "logits_layout.h"
#include "row_math.cuh"

#include <algorithm>
#include <cstdint>

namespace rlhf_fast {
namespace {

using row::acc_type;
using row::Triple;

constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // rows past it are covered by the grid-stride loop
constexpr unsigned kFull = 0xffffffffu;

// Lane 0 ends with the merge of the warp's 32 triples, in the tree lane i ⊕= lane i + off, off = 16, 8, .., 1
// (the order tests/csrc/row_math_emulator.cpp replays). Lanes >= 32 - off merge garbage that lane 0 never uses.
template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> warp_merge(Triple<acc_t> st, acc_t c) {
  for (int off = 16; off > 0; off >>= 1) {
    const Triple<acc_t> o{__shfl_down_sync(kFull, st.m, off), __shfl_down_sync(kFull, st.s, off),
                          __shfl_down_sync(kFull, st.t, off)};
    st = row::merge(st, o, c);
  }
  return st;
}

// The block's triple, valid in thread 0; ends with a barrier so the shared arrays can be reused.
template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> block_merge(Triple<acc_t> st, acc_t* sm, acc_t* ss, acc_t* stt, acc_t c) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  st = warp_merge(st, c);
  if (lane == 0) sm[warp] = st.m, ss[warp] = st.s, stt[warp] = st.t;
  __syncthreads();
  if (warp == 0) {
    st = lane < n_warps ? Triple<acc_t>{sm[lane], ss[lane], stt[lane]} : row::empty_triple<acc_t>();
    st = warp_merge(st, c);
  }
  __syncthreads();
  return st;
}

// The merged triple of span k of a row (c = log2(e)/T), valid in thread 0. Ends with block_merge's barrier.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Triple<acc_t> block_row_triple(const scalar_t* row, int64_t V, acc_t c, int k, int split,
                                                          acc_t* sm, acc_t* ss, acc_t* stt) {
  return block_merge(row::thread_row_triple(row, V, c, k, split, threadIdx.x, blockDim.x), sm, ss, stt, c);
}

// A row split over `split` blocks (row_math.cuh, row_split): block k publishes its triple `st` (valid in thread
// 0) to part[k]; the last of the row's blocks to arrive (a per-row counter, zeroed by the host, decides which —
// not the order) merges part[0], part[1], .. in that order into st. Returns, uniformly over the block, whether
// this block is that one (then st in thread 0 is the row's triple). With split == 1: true, st unchanged.
// sm/ss/stt: block_merge's shared arrays (split <= kMaxSplit = 32 entries), free again here.
template <typename acc_t>
__device__ __forceinline__ bool split_merge(Triple<acc_t>& st, acc_t* part, unsigned* count, int k, int split,
                                            acc_t c, acc_t* sm, acc_t* ss, acc_t* stt) {
  if (split == 1) return true;
  __shared__ bool am_last;
  if (threadIdx.x == 0) {
    part[3 * k] = st.m, part[3 * k + 1] = st.s, part[3 * k + 2] = st.t;
    __threadfence();  // the partial is visible device-wide before the count says so
    am_last = atomicAdd(count, 1u) == static_cast<unsigned>(split - 1);
  }
  __syncthreads();
  if (!am_last) return false;
  __threadfence();
  if (threadIdx.x < split) {  // one partial per thread, read past this SM's L1 (written by other blocks)
    const volatile acc_t* p = part + 3 * threadIdx.x;
    sm[threadIdx.x] = p[0], ss[threadIdx.x] = p[1], stt[threadIdx.x] = p[2];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    st = Triple<acc_t>{sm[0], ss[0], stt[0]};
    for (int j = 1; j < split; ++j) st = row::merge(st, Triple<acc_t>{sm[j], ss[j], stt[j]}, c);
  }
  __syncthreads();  // sm/ss/stt are reused by the next row's block_merge
  return true;
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

// Blocks of 512 threads the backward row kernels are compiled to fit per SM (register cap 65536 / (n·512)):
// 3 (<= 40 registers, 75% occupancy) holds without spills for 2- and 4-byte logits; fp64 is left uncapped.
template <typename scalar_t>
constexpr int kBwdBlocksPerSm = sizeof(scalar_t) == 8 ? 1 : 3;

// Blocks (row, span) for N rows of `split` spans: the grid-stride loops cover the rest.
unsigned blocks_for_rows(int64_t N, int split) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(N * split, kMaxBlocks)));
}

// Threads per row: enough 16-byte loads in flight for long rows, few idle threads for short ones.
int threads_for(int64_t V) { return V >= 32768 ? 512 : (V >= 4096 ? 256 : 128); }
// (at least one block: a grid of 0 is a launch error; the grid-stride loops skip empty work)
unsigned blocks_for(int64_t N) { return static_cast<unsigned>(std::max<int64_t>(1, std::min(N, kMaxBlocks))); }

// The scratch of rows split over blocks (split_merge): each span's partial triple and a per-row arrival count
// (zeroed); both empty when a row is one block (split == 1).
struct SplitScratch {
  int split;
  at::Tensor part, count;
  unsigned* counts() { return reinterpret_cast<unsigned*>(count.data_ptr<int32_t>()); }
};

template <typename scalar_t>
SplitScratch split_scratch(const at::Tensor& logits, int64_t N, int64_t V) {
  const int split = row::row_split<scalar_t>(V, threads_for(V));
  const auto acc = c10::CppTypeToScalarType<acc_type<scalar_t>>::value;
  return {split, at::empty({split > 1 ? N * split * 3 : 0}, logits.options().dtype(acc)),
          at::zeros({split > 1 ? N : 0}, logits.options().dtype(at::kInt))};
}

}  // namespace
}  // namespace rlhf_fast
