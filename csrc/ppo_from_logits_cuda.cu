// ppo_loss_from_logits on CUDA, the math of ppo_from_logits_cpu.cpp. Forward, all deterministic (fixed
// reduction orders, no atomics):
//   1. one block per row (or per span of a long row, merged by the row's last block: small N fills the GPU): one read of the logits with 16-byte loads for any V and row stride (the running
//      triple of row_math.cuh) -> logp, entropy and the two-part lse, per token;
//   2. one block per segment (row of T for the seq-mean aggs, 4096-token chunk for token-mean): the
//      PPO / KL / entropy terms (ppo_from_logits_math.h) and the segment's sums in double;
//   3. one block: totals, loss and statistics, and each segment's d loss / d token;
//   4. one block per segment: the saved per-token gradients scaled.
// Backward: one block per row, one read and one write per element, with the upstream gradient read on
// the device (no host sync).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "logprobs_row_cuda.cuh"
#include "ppo_from_logits_math.h"

namespace rlhf_fast {
namespace {

constexpr int kThreads = 256;  // token-pass kernels: multiple of 32, at most 1024 (block_sum)
constexpr int64_t kIgnore = -100;

// Items (row r, span k) over a 1-D grid; a row of `split` spans is merged by its last block (split_merge).
template <typename scalar_t, typename T>
__global__ void fl_rows_kernel(const scalar_t* __restrict__ x, RowLayout L, const int64_t* __restrict__ labels,
                               T* __restrict__ sv, acc_type<scalar_t> inv_t, int split, acc_type<scalar_t>* part,
                               unsigned* count) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t sm[32], ss[32], stt[32];
  const acc_t c = inv_t * acc_t(row::kLog2e);
  for (int64_t item = blockIdx.x; item < L.N * split; item += gridDim.x) {
    const int64_t r = item / split;
    const int k = static_cast<int>(item % split);
    T* col = sv + r * kFlCols;
    const int64_t label = labels[r];
    // uniform over the block: no barrier is skipped by part of it. Not read: ignored rows (0) and rows
    // whose label is out of range (NaN; no host check ran)
    if (label == kIgnore || !label_in_row(label, L.V)) {
      if (threadIdx.x == 0 && k == 0)
        col[0] = col[2] = col[3] = col[4] = label == kIgnore ? T(0) : std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    const scalar_t* row = x + L.offset(r);
    Triple<acc_t> st = block_row_triple(row, L.V, c, k, split, sm, ss, stt);
    if (split_merge(st, part + r * split * 3, count + r, k, split, c, sm, ss, stt) && threadIdx.x == 0) {
      const row::RowOut<acc_t> o = row::row_outputs(st, static_cast<acc_t>(row[label]), inv_t);  // label read once
      col[0] = static_cast<T>(o.logp);  // until pass 2
      col[2] = static_cast<T>(o.m);
      col[3] = static_cast<T>(o.log_s);
      col[4] = static_cast<T>(o.entropy);
    }
  }
}

template <typename T, typename M>
__global__ void fl_segments_kernel(T* __restrict__ sv, const T* __restrict__ old, const T* __restrict__ adv,
                                   const T* __restrict__ ref, const M* __restrict__ mask, FlConfig cfg, int64_t numel,
                                   int64_t seg_len, int64_t nseg, double* __restrict__ parts) {
  __shared__ double smem[32 * kFlParts];
  for (int64_t s = blockIdx.x; s < nseg; s += gridDim.x) {
    double acc[kFlParts] = {0, 0, 0, 0, 0, 0, 0};
    const int64_t begin = s * seg_len, end = min(numel, begin + seg_len);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      T* col = sv + i * kFlCols;
      double g_pol, g_kl, g_ent, g_adv;
      fl_token(col[0], col[4], old[i], adv[i], ref[i], static_cast<double>(mask[i]), cfg, acc, g_pol, g_kl, g_ent,
               g_adv);
      col[0] = static_cast<T>(g_pol);
      col[1] = static_cast<T>(g_ent);
      col[5] = static_cast<T>(g_kl);
      col[6] = static_cast<T>(g_adv);
    }
    block_sum<kFlParts>(acc, smem);
    if (threadIdx.x == 0)
      for (int j = 0; j < kFlParts; ++j) parts[s * kFlParts + j] = acc[j];
  }
}

template <typename T>
__global__ void fl_finalize_kernel(const double* __restrict__ parts, int64_t nseg, int agg, FlConfig cfg,
                                   T* __restrict__ loss, T* __restrict__ stats, double* __restrict__ scale) {
  constexpr int kTot = 8;
  __shared__ double smem[32 * kTot];
  __shared__ double total[kTot];
  FlTotals t;
  for (int64_t s = threadIdx.x; s < nseg; s += blockDim.x) fl_agg_add(agg, parts + s * kFlParts, t);
  double v[kTot] = {t.pol.loss_num, t.pol.w, t.pol.s0, t.pol.s1, t.pol.s2, t.pol.n_seq, t.ent, t.kl};
  block_sum<kTot>(v, smem);
  if (threadIdx.x == 0)
    for (int j = 0; j < kTot; ++j) total[j] = v[j];
  __syncthreads();
  FlTotals tot;
  tot.pol.loss_num = total[0], tot.pol.w = total[1], tot.pol.s0 = total[2], tot.pol.s1 = total[3],
  tot.pol.s2 = total[4], tot.pol.n_seq = total[5], tot.ent = total[6], tot.kl = total[7];
  for (int64_t s = threadIdx.x; s < nseg; s += blockDim.x) scale[s] = agg_scale(agg, parts + s * kFlParts, tot.pol);
  if (threadIdx.x == 0) {
    double l, st[kFlStats];
    fl_outputs(agg, tot, cfg, &l, st);
    loss[0] = static_cast<T>(l);
    for (int j = 0; j < kFlStats; ++j) stats[j] = static_cast<T>(st[j]);
  }
}

template <typename T>
__global__ void fl_scale_kernel(T* __restrict__ sv, const int64_t* __restrict__ labels,
                                const double* __restrict__ scale, int64_t numel, int64_t seg_len, int64_t nseg) {
  for (int64_t s = blockIdx.x; s < nseg; s += gridDim.x) {
    const double k = scale[s];
    const int64_t begin = s * seg_len, end = min(numel, begin + seg_len);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) fl_scale<T>(sv + i * kFlCols, k, labels[i] == kIgnore);
  }
}

// grad_logits = G·(g_lp·(onehot - p) - g_ent·p·(log p + H)) / T, `out` in the layout OL (grad_like).
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(512, kBwdBlocksPerSm<scalar_t>) fl_bwd_kernel(const scalar_t* __restrict__ x, RowLayout L, scalar_t* __restrict__ out, RowLayout OL,
                              const int64_t* __restrict__ labels, const T* __restrict__ sv,
                              const T* __restrict__ grad_loss, acc_type<scalar_t> inv_t, int split) {
  using acc_t = acc_type<scalar_t>;
  const double G = static_cast<double>(grad_loss[0]);
  for (int64_t item = blockIdx.x; item < L.N * split; item += gridDim.x) {
    const int64_t r = item / split;
    const int k = static_cast<int>(item % split);
    const int64_t label = labels[r];
    const T* col = sv + r * kFlCols;  // zeros for ignored rows, whose coefficients are not used
    const acc_t a = static_cast<acc_t>(G * static_cast<double>(col[0]) * static_cast<double>(inv_t)),
                b = static_cast<acc_t>(G * static_cast<double>(col[1]) * static_cast<double>(inv_t)),
                shift = static_cast<acc_t>(col[2]), log_s = static_cast<acc_t>(col[3]), h = static_cast<acc_t>(col[4]);
    row::thread_row_grad<true>(x + L.offset(r), out + OL.offset(r), L.V, label, label == kIgnore,
                               row::grad_row(a, b, shift, log_s, h, inv_t), a, k, split, threadIdx.x, blockDim.x);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_from_logits_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp, double kl_coef, c10::string_view kl_estimator,
    double entropy_coef, double inv_temperature, double clip_low, double clip_high, std::optional<double> dual_clip,
    c10::string_view agg_name) {
  check_fl_inputs(logits, labels, old_logp, advantages, mask, ref_logp);
  TORCH_CHECK(logits.is_cuda(), "ppo_from_logits: expected CUDA tensors");
  const int agg = parse_agg(agg_name);
  const auto [seg_len, nseg] = loss_segments("ppo_from_logits", agg, old_logp);
  const bool has_ref = ref_logp.has_value() && ref_logp->defined();
  const FlConfig cfg = parse_fl(dual_clip, has_ref, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high);
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowLayout L = row_layout(logits, "ppo_from_logits: logits");
  const int64_t N = L.N, V = L.V;
  const at::Tensor lab = labels.contiguous(), old = old_logp.contiguous(), adv = advantages.contiguous(),
                   m = mask.contiguous(), ref = has_ref ? ref_logp->contiguous() : old;
  const auto opts = old.options();
  at::Tensor saved = at::empty({N, kFlCols}, opts), loss = at::empty({}, opts), stats = at::empty({kFlStats}, opts);
  const auto dopts = opts.dtype(at::kDouble);
  at::Tensor parts = at::empty({std::max<int64_t>(nseg, 1) * kFlParts}, dopts),
             scale = at::empty({std::max<int64_t>(nseg, 1)}, dopts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(old.scalar_type(), "ppo_from_logits_fwd_cuda", [&] {
    using T = scalar_t;
    T* sv = saved.data_ptr<T>();
    if (N > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_from_logits_rows", [&] {
        using acc_t = acc_type<scalar_t>;
        SplitScratch sc = split_scratch<scalar_t>(logits, N, V);
        const unsigned grid = blocks_for_rows(N, sc.split);
        fl_rows_kernel<scalar_t, T><<<grid, threads_for(V), 0, stream>>>(
            logits.data_ptr<scalar_t>(), L, lab.data_ptr<int64_t>(), sv, static_cast<acc_t>(inv_temperature), sc.split,
            sc.part.data_ptr<acc_t>(), sc.counts());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      auto launch = [&](auto* mask_ptr) {
        using M = std::remove_const_t<std::remove_pointer_t<decltype(mask_ptr)>>;
        fl_segments_kernel<T, M><<<blocks_for(nseg), kThreads, 0, stream>>>(
            sv, old.data_ptr<T>(), adv.data_ptr<T>(), ref.data_ptr<T>(), mask_ptr, cfg, N, seg_len, nseg,
            parts.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (m.scalar_type() == at::kBool) launch(static_cast<const bool*>(m.data_ptr<bool>()));
      else launch(static_cast<const T*>(m.data_ptr<T>()));
    }
    fl_finalize_kernel<T><<<1, kThreads, 0, stream>>>(parts.data_ptr<double>(), N > 0 ? nseg : 0, agg, cfg,
                                                      loss.data_ptr<T>(), stats.data_ptr<T>(),
                                                      scale.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (N > 0) {
      fl_scale_kernel<T><<<blocks_for(nseg), kThreads, 0, stream>>>(sv, lab.data_ptr<int64_t>(),
                                                                    scale.data_ptr<double>(), N, seg_len, nseg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, stats, saved};
}

at::Tensor ppo_from_logits_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                    const at::Tensor& saved, double inv_temperature) {
  TORCH_CHECK(logits.is_cuda() && labels.device() == logits.device() && saved.device() == logits.device() &&
                  grad_loss.device() == logits.device(),
              "ppo_from_logits_bwd: expected CUDA tensors on one device");
  const RowLayout L = row_layout(logits, "ppo_from_logits: logits");
  const int64_t N = L.N, V = L.V;
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N && labels.scalar_type() == at::kLong,
              "ppo_from_logits: labels must be int64 [N]");
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == N && saved.size(1) == kFlCols && grad_loss.numel() == 1 &&
                  grad_loss.scalar_type() == saved.scalar_type(),
              "ppo_from_logits_bwd: expected saved [N, ", kFlCols, "] and a one-element grad_loss of its dtype");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = grad_like(logits);  // the logits' strides: rows share their 16-byte phase
  const RowLayout OL = row_layout(grad, "grad logits");
  if (N == 0) return grad;
  const at::Tensor lab = labels.contiguous(), sv = saved.contiguous(), g = grad_loss.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(sv.scalar_type(), "ppo_from_logits_bwd_cuda", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_from_logits_bwd_rows", [&] {
      using acc_t = acc_type<scalar_t>;
      const int split = row::row_split<scalar_t>(V, threads_for(V));
      const unsigned grid = blocks_for_rows(N, split);
      fl_bwd_kernel<scalar_t, T><<<grid, threads_for(V), 0, stream>>>(
          logits.data_ptr<scalar_t>(), L, grad.data_ptr<scalar_t>(), OL, lab.data_ptr<int64_t>(), sv.data_ptr<T>(),
          g.data_ptr<T>(), static_cast<acc_t>(inv_temperature), split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("ppo_from_logits_fwd", &ppo_from_logits_fwd_cuda);
  m.impl("ppo_from_logits_bwd", &ppo_from_logits_bwd_cuda);
}

}  // namespace rlhf_fast
