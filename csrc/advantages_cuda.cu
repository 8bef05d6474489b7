// Group advantages (GRPO, RLOO) and KL-penalised token rewards on CUDA.
// Groups: one warp per group, lanes striding over its elements, sums by a fixed-order warp all-reduce
// (deterministic); the group math is advantages_math.h, the code the CPU kernels run.
// Shaped rewards: one block per row; each thread writes its tokens' rewards and d reward / d logp and
// keeps its largest valid position; a block max gives the row's last valid position, and the thread
// that wrote it adds the score (re-reading its own store). Backward: one elementwise launch that also
// gathers d score = g[b, last_b].
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "advantages_math.h"

namespace rlhf_fast {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;
constexpr int kRowThreads = 256;                   // shaped rewards: threads per row (at most)
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

unsigned blocks_for(int64_t units) { return static_cast<unsigned>(std::max<int64_t>(1, std::min(units, kMaxBlocks))); }

struct WarpSum2 {  // butterfly all-reduce: every lane gets both sums, in the same order
  template <typename T>
  __device__ __forceinline__ void operator()(T& a, T& b) const {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_xor_sync(kFull, a, off);
      b += __shfl_xor_sync(kFull, b, off);
    }
  }
};

template <typename T>
__global__ void group_kernel(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ out, int64_t G,
                             int64_t n, int mode, T eps) {
  const int lane = threadIdx.x & 31;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t k = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); k < G; k += step)
    group_advantages<T>(x + k * n, g + k * n, out + k * n, n, mode, eps, lane, 32, WarpSum2{});
}

void check_groups(const char* op, const at::Tensor& x, int64_t n) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 1, op, ": scores must be a 1-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": scores must be float32 or float64");
  TORCH_CHECK(n >= 1 && x.size(0) % n == 0, op, ": group_size must be >= 1 and divide len(scores)");
}

at::Tensor run_groups(const at::Tensor& x_in, const at::Tensor* g_in, int64_t n, int mode, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), g = g_in ? g_in->contiguous() : x;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t G = x.numel() / n;
  if (G == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_advantages_cuda", [&] {
    group_kernel<scalar_t><<<blocks_for((G + kWarpsPerBlock - 1) / kWarpsPerBlock), 32 * kWarpsPerBlock, 0,
                             c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), G, n, mode,
        static_cast<scalar_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor grpo_fwd_cuda(const at::Tensor& scores, int64_t group_size, bool normalize_std, double eps) {
  check_groups("grpo_advantages", scores, group_size);
  return run_groups(scores, nullptr, group_size, normalize_std ? kGrpoFwd : kCenter, eps);
}

at::Tensor grpo_bwd_cuda(const at::Tensor& grad, const at::Tensor& scores, int64_t group_size, bool normalize_std,
                         double eps) {
  check_groups("grpo_advantages", scores, group_size);
  TORCH_CHECK(grad.sizes() == scores.sizes() && grad.scalar_type() == scores.scalar_type() &&
                  grad.device() == scores.device(),
              "grpo_advantages: grad must match scores");
  if (!normalize_std) return run_groups(grad, nullptr, group_size, kCenter, eps);  // self-adjoint
  return run_groups(scores, &grad, group_size, kGrpoBwd, eps);
}

at::Tensor rloo_fwd_cuda(const at::Tensor& scores, int64_t group_size) {
  check_groups("rloo_advantages", scores, group_size);
  return run_groups(scores, nullptr, group_size, kRloo, 0.0);
}

// ------------------------------------------------------------------------------------------ shaped rewards
template <typename T>
__global__ void kl_rewards_fwd_kernel(const T* __restrict__ score, const T* __restrict__ logp,
                                      const T* __restrict__ ref_logp, const bool* __restrict__ mask,
                                      T* __restrict__ out, T* __restrict__ grad, int64_t* __restrict__ last,
                                      int64_t B, int64_t T_len, T neg_beta, int est, bool plus) {
  __shared__ long long smax[kRowThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t o = b * T_len;
    long long mine = -1;  // this thread's largest valid position
    for (int64_t t = threadIdx.x; t < T_len; t += blockDim.x) {
      T r = 0, d = 0;
      if (mask[o + t]) {
        kl_reward_token<T>(logp[o + t], ref_logp[o + t], neg_beta, est, plus, r, d);
        mine = t;
      }
      out[o + t] = r;
      grad[o + t] = d;
    }
    long long m = mine;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(kFull, m, off));
    if (lane == 0) smax[warp] = m;
    __syncthreads();
    m = -1;
    for (int w = 0; w < n_warps; ++w) m = max(m, smax[w]);
    if (m >= 0 && mine == m) out[o + m] = out[o + m] + score[b];  // the owner re-reads its own store
    if (threadIdx.x == 0) last[b] = m;
    __syncthreads();  // smax is reused by the next row
  }
}

template <typename T>
__global__ void kl_rewards_bwd_kernel(const T* __restrict__ g, const T* __restrict__ d, const int64_t* __restrict__ last,
                                      T* __restrict__ g_lp, T* __restrict__ g_ref, T* __restrict__ g_score, int64_t B,
                                      int64_t T_len) {
  const int64_t n = std::max(B * T_len, B), step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += step) {
    if (i < B * T_len) {
      const T v = g[i] * d[i];
      g_lp[i] = v;
      g_ref[i] = -v;
    }
    if (i < B) {
      const int64_t l = last[i];
      g_score[i] = (l >= 0 && l < T_len) ? g[i * T_len + l] : T(0);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_rewards_fwd_cuda(const at::Tensor& score, const at::Tensor& logp,
                                                                   const at::Tensor& ref_logp, const at::Tensor& mask,
                                                                   double beta, c10::string_view estimator) {
  check_loss_inputs("kl_penalized_rewards", logp, ref_logp, ref_logp, &mask);
  TORCH_CHECK(logp.is_cuda() && logp.dim() == 2, "kl_penalized_rewards: logp must be a [B, T] CUDA tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "kl_penalized_rewards: mask must be bool");
  TORCH_CHECK(score.dim() == 1 && score.size(0) == logp.size(0) && score.scalar_type() == logp.scalar_type() &&
                  score.device() == logp.device(),
              "kl_penalized_rewards: score must be [B] of the logp dtype and device");
  const KlConfig cfg = parse_kl(estimator, std::nullopt);
  const c10::cuda::CUDAGuard guard(logp.device());
  const at::Tensor sc = score.contiguous(), lp = logp.contiguous(), rf = ref_logp.contiguous(), m = mask.contiguous();
  at::Tensor out = at::empty_like(lp, at::MemoryFormat::Contiguous), grad = at::empty_like(lp, at::MemoryFormat::Contiguous);
  const int64_t B = lp.size(0), T = lp.size(1);
  at::Tensor last = at::empty({B}, lp.options().dtype(at::kLong));
  if (B == 0) return {out, grad, last};
  const int threads = static_cast<int>(std::min<int64_t>(kRowThreads, std::max<int64_t>(32, (T + 31) / 32 * 32)));
  AT_DISPATCH_FLOATING_TYPES(lp.scalar_type(), "kl_penalized_rewards_fwd_cuda", [&] {
    kl_rewards_fwd_kernel<scalar_t><<<blocks_for(B), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        sc.data_ptr<scalar_t>(), lp.data_ptr<scalar_t>(), rf.data_ptr<scalar_t>(), m.data_ptr<bool>(),
        out.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), last.data_ptr<int64_t>(), B, T,
        static_cast<scalar_t>(-beta), cfg.estimator, cfg.plus);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, grad, last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_rewards_bwd_cuda(const at::Tensor& grad_rewards,
                                                                   const at::Tensor& d_logp, const at::Tensor& last) {
  TORCH_CHECK(grad_rewards.is_cuda() && grad_rewards.dim() == 2 && grad_rewards.sizes() == d_logp.sizes() &&
                  grad_rewards.scalar_type() == d_logp.scalar_type() && grad_rewards.device() == d_logp.device(),
              "kl_penalized_rewards: grad_rewards must match d_logp");
  TORCH_CHECK(last.dim() == 1 && last.size(0) == d_logp.size(0) && last.scalar_type() == at::kLong &&
                  last.device() == d_logp.device(),
              "kl_penalized_rewards: last must be [B] int64");
  const c10::cuda::CUDAGuard guard(d_logp.device());
  const at::Tensor g = grad_rewards.contiguous(), d = d_logp.contiguous(), l = last.contiguous();
  const int64_t B = d.size(0), T = d.size(1);
  at::Tensor g_lp = at::empty_like(d, at::MemoryFormat::Contiguous), g_ref = at::empty_like(d, at::MemoryFormat::Contiguous),
             g_score = at::empty({B}, d.options());
  const int64_t n = std::max(B * T, B);
  if (n == 0) return {g_score, g_lp, g_ref};
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "kl_penalized_rewards_bwd_cuda", [&] {
    kl_rewards_bwd_kernel<scalar_t><<<blocks_for((n + 255) / 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), l.data_ptr<int64_t>(), g_lp.data_ptr<scalar_t>(),
        g_ref.data_ptr<scalar_t>(), g_score.data_ptr<scalar_t>(), B, T);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_score, g_lp, g_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("grpo_advantages_fwd", &grpo_fwd_cuda);
  m.impl("grpo_advantages_bwd", &grpo_bwd_cuda);
  m.impl("rloo_advantages_fwd", &rloo_fwd_cuda);
  m.impl("kl_penalized_rewards_fwd", &kl_rewards_fwd_cuda);
  m.impl("kl_penalized_rewards_bwd", &kl_rewards_bwd_cuda);
}

}  // namespace rlhf_fast
