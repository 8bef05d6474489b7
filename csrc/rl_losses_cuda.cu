// Elementwise RL losses on CUDA: KL estimators, PPO policy and value losses, with d loss / d input
// written in the forward. Per-token math: rl_losses_math.h (the same code the CPU kernels run).
// Aggregated losses take three small launches, all deterministic (fixed reduction orders, no atomics):
//   1. one block per segment (row for the seq-mean modes, 4096-token chunk for token-mean): the per-token
//      loss and gradient (times the mask weight), and the segment's kParts sums in double;
//   2. one block: the totals over segments, the loss and statistics, and each segment's d loss / d token;
//   3. one block per segment: the gradients scaled by their segment's factor.
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

#include "logprobs_row_cuda.cuh"  // block_sum

#include "rl_losses_math.h"

namespace rlhf_fast {
namespace {

constexpr int kThreads = 256;  // multiple of 32, at most 1024 (block_sum)

template <typename T>
__global__ void kl_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                          T* __restrict__ grad, int64_t n, int est, bool plus, bool has_clamp, T clamp) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    kl_token<T>(a[i], b[i], est, plus, has_clamp, clamp, out[i], grad[i]);
}

template <typename T, typename M>
struct PolicyFn {
  const T *logp, *old_logp, *adv, *seq_lr;
  const M* mask;
  T *g_logp, *g_adv;
  double lo, hi, dual;
  bool has_dual;
  int loss;
  __device__ __forceinline__ void operator()(int64_t i, double* acc) const {
    const double w = static_cast<double>(mask[i]);
    const PolicyToken<double> t = policy_token<double>(logp[i], old_logp[i], adv[i], lo, hi, has_dual, dual, loss,
                                                       seq_lr[i]);
    g_logp[i] = static_cast<T>(w * t.d_logp);
    g_adv[i] = static_cast<T>(w * t.d_adv);
    acc[0] += t.pg * w;
    acc[1] += w;
    acc[2] += t.clipped * w;
    acc[3] += t.neg_log_ratio * w;
    acc[4] += t.dual * w;
  }
};

template <typename T, typename M>
struct ValueFn {
  const T *v, *old_v, *ret;
  const M* mask;
  T *g_v, *g_old;
  double clip;
  bool has_clip;
  __device__ __forceinline__ void operator()(int64_t i, double* acc) const {
    const double w = static_cast<double>(mask[i]);
    const ValueToken<double> t = value_token<double>(v[i], old_v[i], ret[i], has_clip, clip);
    g_v[i] = static_cast<T>(w * t.d_v);
    g_old[i] = static_cast<T>(w * t.d_old);
    acc[0] += t.vl * w;
    acc[1] += w;
    acc[2] += t.clipped * w;
  }
};

template <typename Fn>
__global__ void segments_kernel(Fn fn, int64_t numel, int64_t seg_len, int64_t nseg, double* __restrict__ parts) {
  __shared__ double smem[32 * kParts];
  for (int64_t s = blockIdx.x; s < nseg; s += gridDim.x) {
    double acc[kParts] = {0, 0, 0, 0, 0};
    const int64_t begin = s * seg_len, end = min(numel, begin + seg_len);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) fn(i, acc);
    block_sum<kParts>(acc, smem);
    if (threadIdx.x == 0)
      for (int j = 0; j < kParts; ++j) parts[s * kParts + j] = acc[j];
  }
}

// One block: totals over the segments, loss and statistics, and each segment's scale.
template <typename T>
__global__ void finalize_kernel(const double* __restrict__ parts, int64_t nseg, int agg, T* __restrict__ loss,
                                T* __restrict__ stats, int n_stats, double* __restrict__ scale) {
  __shared__ double smem[32 * 6];
  __shared__ double total[6];
  AggTotals t;
  for (int64_t s = threadIdx.x; s < nseg; s += blockDim.x) agg_add(agg, parts + s * kParts, t);
  double v[6] = {t.loss_num, t.w, t.s0, t.s1, t.s2, t.n_seq};
  block_sum<6>(v, smem);
  if (threadIdx.x == 0)
    for (int j = 0; j < 6; ++j) total[j] = v[j];
  __syncthreads();
  AggTotals tot;
  tot.loss_num = total[0], tot.w = total[1], tot.s0 = total[2], tot.s1 = total[3], tot.s2 = total[4],
  tot.n_seq = total[5];
  for (int64_t s = threadIdx.x; s < nseg; s += blockDim.x) scale[s] = agg_scale(agg, parts + s * kParts, tot);
  if (threadIdx.x == 0) {
    double out4[4];
    agg_outputs(agg, tot, out4);
    loss[0] = static_cast<T>(out4[0]);
    for (int j = 0; j < n_stats; ++j) stats[j] = static_cast<T>(out4[1 + j]);
  }
}

template <typename T>
__global__ void scale_kernel(T* __restrict__ g1, T* __restrict__ g2, const double* __restrict__ scale, int64_t numel,
                             int64_t seg_len, int64_t nseg) {
  for (int64_t s = blockIdx.x; s < nseg; s += gridDim.x) {
    const T k = static_cast<T>(scale[s]);
    const int64_t begin = s * seg_len, end = min(numel, begin + seg_len);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      g1[i] *= k;
      g2[i] *= k;
    }
  }
}

// Launches the three kernels for one token functor; returns (loss, stats).
template <typename T, typename Fn>
std::tuple<at::Tensor, at::Tensor> run_segmented(const Fn& fn, int agg, int64_t numel, int64_t seg_len, int64_t nseg,
                                                 T* g1, T* g2, const at::TensorOptions& opts, int n_stats) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss = at::empty({}, opts), stats = at::empty({n_stats}, opts);
  const auto dopts = opts.dtype(at::kDouble);
  at::Tensor parts = at::empty({std::max<int64_t>(nseg, 1) * kParts}, dopts),
             scale = at::empty({std::max<int64_t>(nseg, 1)}, dopts);
  if (nseg > 0) {
    segments_kernel<Fn><<<blocks_for(nseg), kThreads, 0, stream>>>(fn, numel, seg_len, nseg, parts.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_kernel<T><<<1, kThreads, 0, stream>>>(parts.data_ptr<double>(), nseg, agg, loss.data_ptr<T>(),
                                                 stats.data_ptr<T>(), n_stats, scale.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (numel > 0) {
    scale_kernel<T><<<blocks_for(nseg), kThreads, 0, stream>>>(g1, g2, scale.data_ptr<double>(), numel, seg_len, nseg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kl_fwd_cuda(const at::Tensor& logp, const at::Tensor& ref_logp,
                                               c10::string_view estimator, std::optional<double> clamp) {
  check_loss_inputs("kl", logp, ref_logp, ref_logp, nullptr);
  TORCH_CHECK(logp.is_cuda(), "kl: expected CUDA tensors");
  const KlConfig cfg = parse_kl(estimator, clamp);
  const c10::cuda::CUDAGuard guard(logp.device());
  const at::Tensor a = logp.contiguous(), b = ref_logp.contiguous();
  at::Tensor out = at::empty_like(a), grad = at::empty_like(a);
  const int64_t n = a.numel();
  if (n == 0) return {out, grad};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "kl_fwd_cuda", [&] {
    kl_kernel<scalar_t><<<blocks_for((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), n,
        cfg.estimator, cfg.plus, cfg.has_clamp, static_cast<scalar_t>(cfg.clamp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_cuda(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    double clip_low, double clip_high, std::optional<double> dual_clip, c10::string_view agg_name, int64_t loss_type,
    const std::optional<at::Tensor>& seq_log_ratio) {
  check_loss_inputs("ppo_policy_loss", logp, old_logp, advantages, &mask);
  TORCH_CHECK(logp.is_cuda(), "ppo_policy_loss: expected CUDA tensors");
  const int agg = parse_agg(agg_name), ltype = parse_loss_type(loss_type);
  const auto [seg_len, nseg] = loss_segments("ppo_policy_loss", agg, logp);
  const bool has_seq = seq_log_ratio.has_value() && seq_log_ratio->defined();
  TORCH_CHECK(ltype != kGspo || has_seq, "ppo_policy_loss: loss_type gspo needs seq_log_ratio");
  if (has_seq) check_loss_inputs("ppo_policy_loss", logp, old_logp, *seq_log_ratio, nullptr);
  const c10::cuda::CUDAGuard guard(logp.device());
  const at::Tensor lp = logp.contiguous(), old = old_logp.contiguous(), adv = advantages.contiguous(),
                   m = mask.contiguous(), sq = has_seq ? seq_log_ratio->contiguous() : lp;
  at::Tensor g_lp = at::empty_like(lp), g_adv = at::empty_like(lp), loss, stats;
  AT_DISPATCH_FLOATING_TYPES(lp.scalar_type(), "ppo_policy_loss_fwd_cuda", [&] {
    using T = scalar_t;
    auto launch = [&](auto* mask_ptr) {
      using M = std::remove_const_t<std::remove_pointer_t<decltype(mask_ptr)>>;
      const PolicyFn<T, M> fn{lp.data_ptr<T>(), old.data_ptr<T>(), adv.data_ptr<T>(), sq.data_ptr<T>(), mask_ptr,
                              g_lp.data_ptr<T>(), g_adv.data_ptr<T>(), 1.0 - clip_low, 1.0 + clip_high,
                              dual_clip.value_or(0.0), dual_clip.has_value(), ltype};
      std::tie(loss, stats) = run_segmented<T>(fn, agg, lp.numel(), seg_len, nseg, fn.g_logp, fn.g_adv,
                                               lp.options(), 3);
    };
    if (m.scalar_type() == at::kBool) launch(static_cast<const bool*>(m.data_ptr<bool>()));
    else launch(static_cast<const T*>(m.data_ptr<T>()));
  });
  return {loss, stats, g_lp, g_adv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd_cuda(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
    std::optional<double> clip, c10::string_view agg_name) {
  check_loss_inputs("ppo_value_loss", values, old_values, returns, &mask);
  TORCH_CHECK(values.is_cuda(), "ppo_value_loss: expected CUDA tensors");
  const int agg = parse_agg(agg_name);
  const auto [seg_len, nseg] = loss_segments("ppo_value_loss", agg, values);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous(), old = old_values.contiguous(), ret = returns.contiguous(),
                   m = mask.contiguous();
  at::Tensor g_v = at::empty_like(v), g_old = at::empty_like(v), loss, stats;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ppo_value_loss_fwd_cuda", [&] {
    using T = scalar_t;
    auto launch = [&](auto* mask_ptr) {
      using M = std::remove_const_t<std::remove_pointer_t<decltype(mask_ptr)>>;
      const ValueFn<T, M> fn{v.data_ptr<T>(), old.data_ptr<T>(), ret.data_ptr<T>(), mask_ptr,
                             g_v.data_ptr<T>(), g_old.data_ptr<T>(), clip.value_or(0.0), clip.has_value()};
      std::tie(loss, stats) = run_segmented<T>(fn, agg, v.numel(), seg_len, nseg, fn.g_v, fn.g_old, v.options(), 1);
    };
    if (m.scalar_type() == at::kBool) launch(static_cast<const bool*>(m.data_ptr<bool>()));
    else launch(static_cast<const T*>(m.data_ptr<T>()));
  });
  return {loss, stats, g_v, g_old};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("kl_fwd", &kl_fwd_cuda);
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd_cuda);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd_cuda);
}

}  // namespace rlhf_fast
