// GAE on CUDA: one warp per row, T walked in chunks of 32·K (K = 16 bytes / element: 4 fp32, 2 fp64),
// each lane owning K consecutive positions (one 16-byte load per input when the row is aligned, so
// a warp reads 512 contiguous bytes). Within a chunk two warp scans replace the sequential loop of
// gae_cpu.cpp:
//   1. a reverse "next valid value" scan: V_next of each position (the value of the first valid
//      position after it; the carry from later chunks, 0 past the end);
//   2. a reverse scan of the affine maps x -> a·x + b (valid t: a = γλ, b = δ_t; masked t: identity)
//      that gives every A_t from the running advantage carried in from the later chunk.
// Masked positions are the identity of both scans, which is the skip semantics of reference.gae.
// The backward (the adjoint recursion u_t = gA_t + gR_t + γλ·u_prev over valid t) is the same affine
// scan run forwards in time. Scan orders are fixed: results are deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace rlhf_fast {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // rows past it are covered by the grid-stride loop

template <typename T, int K>
struct alignas(sizeof(T) * K) Pack {
  T v[K];
};

// K consecutive elements at p, of which n_left (possibly <= 0) are in the row; the rest read as 0.
template <typename T, int K>
__device__ __forceinline__ void load_k(const T* p, int64_t n_left, bool vec, T (&out)[K]) {
  if (vec && n_left >= K) {
    const Pack<T, K> pk = *reinterpret_cast<const Pack<T, K>*>(p);
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = pk.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = k < n_left ? p[k] : T(0);
  }
}

template <typename T, int K>
__device__ __forceinline__ void store_k(T* p, int64_t n_left, bool vec, const T (&in)[K]) {
  if (vec && n_left >= K) {
    Pack<T, K> pk;
#pragma unroll
    for (int k = 0; k < K; ++k) pk.v[k] = in[k];
    *reinterpret_cast<Pack<T, K>*>(p) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < n_left) p[k] = in[k];
  }
}

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

template <typename scalar_t>
__global__ void gae_fwd_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ v,
                               const bool* __restrict__ m, scalar_t* __restrict__ adv, scalar_t* __restrict__ ret,
                               int64_t B, int64_t T, scalar_t g, scalar_t gl) {
  constexpr int K = 16 / sizeof(scalar_t);
  constexpr int64_t kChunk = 32 * K;
  const int lane = threadIdx.x & 31;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t b = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); b < B; b += row_step) {
    const int64_t o = b * T;  // the whole warp shares b: the shuffles below see all 32 lanes
    const bool vec = aligned16(r + o) && aligned16(v + o) && aligned16(adv + o) && aligned16(ret + o) &&
                     (reinterpret_cast<uintptr_t>(m + o) % K) == 0;
    scalar_t carry_v = 0;  // value of the first valid position after this chunk (0 past the end)
    scalar_t carry_a = 0;  // advantage at that position (the running advantage)
    for (int64_t c = (T + kChunk - 1) / kChunk - 1; c >= 0; --c) {
      const int64_t t0 = c * kChunk + lane * K, n_left = T - t0;
      scalar_t rr[K], vv[K];
      bool mm[K];
      load_k<scalar_t, K>(r + o + t0, n_left, vec, rr);
      load_k<scalar_t, K>(v + o + t0, n_left, vec, vv);
      load_k<bool, K>(m + o + t0, n_left, vec, mm);

      // 1. next valid value. Lane summary: the value of its first valid position, if any.
      int has = 0;
      scalar_t first = 0;
#pragma unroll
      for (int k = K - 1; k >= 0; --k)
        if (mm[k]) has = 1, first = vv[k];
      // inclusive suffix scan over lanes (the left operand wins when it has a valid position)
      for (int off = 1; off < 32; off <<= 1) {
        const int h2 = __shfl_down_sync(kFull, has, off);
        const scalar_t f2 = __shfl_down_sync(kFull, first, off);
        if (lane + off < 32 && !has) has = h2, first = f2;
      }
      int has_after = __shfl_down_sync(kFull, has, 1);  // exclusive: lanes after this one
      const scalar_t first_after = __shfl_down_sync(kFull, first, 1);
      if (lane == 31) has_after = 0;
      const int chunk_has = __shfl_sync(kFull, has, 0);
      const scalar_t chunk_first = __shfl_sync(kFull, first, 0);
      scalar_t next_v = has_after ? first_after : carry_v;
      scalar_t delta[K];
#pragma unroll
      for (int k = K - 1; k >= 0; --k) {
        delta[k] = 0;
        if (mm[k]) {
          delta[k] = rr[k] + g * next_v - vv[k];
          next_v = vv[k];
        }
      }

      // 2. affine maps. Lane summary f_0 ∘ ... ∘ f_{K-1} as x -> a·x + s.
      scalar_t a = 1, s = 0;
#pragma unroll
      for (int k = K - 1; k >= 0; --k)
        if (mm[k]) a = gl * a, s = gl * s + delta[k];
      // inclusive suffix scan: (a, s) ∘ (a2, s2) = (a·a2, a·s2 + s)
      for (int off = 1; off < 32; off <<= 1) {
        const scalar_t a2 = __shfl_down_sync(kFull, a, off), s2 = __shfl_down_sync(kFull, s, off);
        if (lane + off < 32) s = a * s2 + s, a = a * a2;
      }
      scalar_t a_after = __shfl_down_sync(kFull, a, 1), s_after = __shfl_down_sync(kFull, s, 1);
      if (lane == 31) a_after = 1, s_after = 0;
      const scalar_t a_chunk = __shfl_sync(kFull, a, 0), s_chunk = __shfl_sync(kFull, s, 0);
      scalar_t running = a_after * carry_a + s_after;
      scalar_t out_a[K], out_r[K];
#pragma unroll
      for (int k = K - 1; k >= 0; --k) {
        out_a[k] = out_r[k] = 0;
        if (mm[k]) {
          running = delta[k] + gl * running;
          out_a[k] = running;
          out_r[k] = running + vv[k];
        }
      }
      store_k<scalar_t, K>(adv + o + t0, n_left, vec, out_a);
      store_k<scalar_t, K>(ret + o + t0, n_left, vec, out_r);
      carry_a = a_chunk * carry_a + s_chunk;
      if (chunk_has) carry_v = chunk_first;
    }
  }
}

// Adjoint over valid t in increasing order: u_t = gA_t + gR_t + γλ·u_prev; dr_t = u_t,
// dV_t = -u_t + gR_t + γ·u_prev.
template <typename scalar_t>
__global__ void gae_bwd_kernel(const scalar_t* __restrict__ ga, const scalar_t* __restrict__ gr,
                               const bool* __restrict__ m, scalar_t* __restrict__ d_rew,
                               scalar_t* __restrict__ d_val, int64_t B, int64_t T, scalar_t g, scalar_t gl) {
  constexpr int K = 16 / sizeof(scalar_t);
  constexpr int64_t kChunk = 32 * K;
  const int lane = threadIdx.x & 31;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t b = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); b < B; b += row_step) {
    const int64_t o = b * T;
    const bool vec = aligned16(ga + o) && aligned16(gr + o) && aligned16(d_rew + o) && aligned16(d_val + o) &&
                     (reinterpret_cast<uintptr_t>(m + o) % K) == 0;
    scalar_t carry_u = 0;  // u at the last valid position before this chunk
    const int64_t n_chunks = (T + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t t0 = c * kChunk + lane * K, n_left = T - t0;
      scalar_t gaa[K], grr[K];
      bool mm[K];
      load_k<scalar_t, K>(ga + o + t0, n_left, vec, gaa);
      load_k<scalar_t, K>(gr + o + t0, n_left, vec, grr);
      load_k<bool, K>(m + o + t0, n_left, vec, mm);
      // lane summary f_{K-1} ∘ ... ∘ f_0, f_k(x) = γλ·x + gA_k + gR_k on valid positions
      scalar_t a = 1, s = 0;
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (mm[k]) a = gl * a, s = gaa[k] + grr[k] + gl * s;
      // inclusive prefix scan: later ∘ earlier = (a·a2, a·s2 + s)
      for (int off = 1; off < 32; off <<= 1) {
        const scalar_t a2 = __shfl_up_sync(kFull, a, off), s2 = __shfl_up_sync(kFull, s, off);
        if (lane >= off) s = a * s2 + s, a = a * a2;
      }
      scalar_t a_before = __shfl_up_sync(kFull, a, 1), s_before = __shfl_up_sync(kFull, s, 1);
      if (lane == 0) a_before = 1, s_before = 0;
      const scalar_t a_chunk = __shfl_sync(kFull, a, 31), s_chunk = __shfl_sync(kFull, s, 31);
      scalar_t u_prev = a_before * carry_u + s_before;
      scalar_t out_r[K], out_v[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        out_r[k] = out_v[k] = 0;
        if (mm[k]) {
          const scalar_t u = gaa[k] + grr[k] + gl * u_prev;
          out_r[k] = u;
          out_v[k] = -u + grr[k] + g * u_prev;
          u_prev = u;
        }
      }
      store_k<scalar_t, K>(d_rew + o + t0, n_left, vec, out_r);
      store_k<scalar_t, K>(d_val + o + t0, n_left, vec, out_v);
      carry_u = a_chunk * carry_u + s_chunk;
    }
  }
}

void check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask) {
  TORCH_CHECK(a.is_cuda() && b.device() == a.device() && mask.device() == a.device(),
              "gae: expected CUDA tensors on one device");
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes() && a.sizes() == mask.sizes(), "gae: expected [B, T] inputs of one shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "gae: inputs must share a dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae: mask must be bool");
}

unsigned blocks_for(int64_t B) {
  return static_cast<unsigned>(std::min((B + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
}

std::tuple<at::Tensor, at::Tensor> gae_fwd_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                const at::Tensor& mask, double gamma, double lam) {
  check_inputs(rewards, values, mask);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const at::Tensor r = rewards.contiguous(), v = values.contiguous(), m = mask.contiguous();
  at::Tensor adv = at::empty_like(r, at::MemoryFormat::Contiguous), ret = at::empty_like(r, at::MemoryFormat::Contiguous);
  const int64_t B = r.size(0), T = r.size(1);
  if (B == 0 || T == 0) return {adv, ret};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "gae_fwd_cuda", [&] {
    gae_fwd_kernel<scalar_t><<<blocks_for(B), 32 * kWarpsPerBlock, 0, stream>>>(
        r.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m.data_ptr<bool>(), adv.data_ptr<scalar_t>(),
        ret.data_ptr<scalar_t>(), B, T, static_cast<scalar_t>(gamma), static_cast<scalar_t>(gamma * lam));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> gae_bwd_cuda(const at::Tensor& grad_adv, const at::Tensor& grad_ret,
                                                const at::Tensor& mask, double gamma, double lam) {
  check_inputs(grad_adv, grad_ret, mask);
  const c10::cuda::CUDAGuard guard(grad_adv.device());
  const at::Tensor ga = grad_adv.contiguous(), gr = grad_ret.contiguous(), m = mask.contiguous();
  at::Tensor d_rew = at::empty_like(ga, at::MemoryFormat::Contiguous),
             d_val = at::empty_like(ga, at::MemoryFormat::Contiguous);
  const int64_t B = ga.size(0), T = ga.size(1);
  if (B == 0 || T == 0) return {d_rew, d_val};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(ga.scalar_type(), "gae_bwd_cuda", [&] {
    gae_bwd_kernel<scalar_t><<<blocks_for(B), 32 * kWarpsPerBlock, 0, stream>>>(
        ga.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), m.data_ptr<bool>(), d_rew.data_ptr<scalar_t>(),
        d_val.data_ptr<scalar_t>(), B, T, static_cast<scalar_t>(gamma), static_cast<scalar_t>(gamma * lam));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d_rew, d_val};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("gae_fwd", &gae_fwd_cuda);
  m.impl("gae_bwd", &gae_bwd_cuda);
}

}  // namespace rlhf_fast
