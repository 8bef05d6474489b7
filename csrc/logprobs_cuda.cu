// logprobs on CUDA, the math of logprobs_cpu.cpp (logits [N, V] or [B, T, V], any leading strides:
// logits_layout.h). Forward: one block per row (or per span of a row, for long rows: row_split, so that a
// small N still fills the GPU; grid-stride over the items, 1-D grid), one read of the row with
// 128-bit loads for any V and row stride (8 bf16/fp16, 4 fp32, 2 fp64 per thread), each thread keeping
// a running (max, sum-exp, Σ e·(x - max)) triple over 16-byte groups of the row's columns, merged by warp
// shuffles and then across warps in a fixed order (deterministic, batch invariant); the label's logit is
// read once. Backward: one read and one write per element, p recomputed from the saved logsumexp,
// optionally into the logits buffer. Per-thread work: row_math.cuh; block merges: logprobs_row_cuda.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "logprobs_row_cuda.cuh"

namespace rlhf_fast {
namespace {

// Items (row r, span k) over a 1-D grid; a row of `split` spans is merged by its last block (split_merge).
template <typename scalar_t>
__global__ void logprobs_fwd_kernel(const scalar_t* __restrict__ x, RowLayout L, const int64_t* __restrict__ labels,
                                    acc_type<scalar_t>* __restrict__ logp, acc_type<scalar_t>* __restrict__ entropy,
                                    acc_type<scalar_t>* __restrict__ lse, acc_type<scalar_t> inv_t,
                                    int64_t ignore_index, int split, acc_type<scalar_t>* part, unsigned* count) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t sm[32], ss[32], stt[32];
  const acc_t c = inv_t * acc_t(row::kLog2e);
  for (int64_t item = blockIdx.x; item < L.N * split; item += gridDim.x) {
    const int64_t r = item / split;
    const int k = static_cast<int>(item % split);
    const int64_t label = labels[r];
    // both skips are uniform over the block: no barrier is skipped by part of it
    if (label == ignore_index) {
      if (threadIdx.x == 0 && k == 0) logp[r] = entropy[r] = lse[r] = acc_t(0);
      continue;
    }
    if (!label_in_row(label, L.V)) {  // out of range (no host check ran): NaN, the row not read
      if (threadIdx.x == 0 && k == 0) logp[r] = entropy[r] = lse[r] = std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    const scalar_t* row = x + L.offset(r);
    Triple<acc_t> st = block_row_triple(row, L.V, c, k, split, sm, ss, stt);
    if (split_merge(st, part + r * split * 3, count + r, k, split, c, sm, ss, stt) && threadIdx.x == 0) {
      const row::RowOut<acc_t> o = row::row_outputs(st, static_cast<acc_t>(row[label]), inv_t);  // label read once
      logp[r] = o.logp;
      entropy[r] = o.entropy;
      lse[r] = o.lse(inv_t);
    }
  }
}

// `out` may alias `x` (in-place backward): every element is read before it is written, by one thread.
// Items (row r, span k) as in the forward.
template <typename scalar_t>
__global__ void __launch_bounds__(512, kBwdBlocksPerSm<scalar_t>) logprobs_bwd_kernel(const scalar_t* x, RowLayout L, scalar_t* out, RowLayout OL,
                                    const int64_t* __restrict__ labels, const acc_type<scalar_t>* __restrict__ g_lp,
                                    const acc_type<scalar_t>* __restrict__ g_ent,
                                    const acc_type<scalar_t>* __restrict__ lse,
                                    const acc_type<scalar_t>* __restrict__ entropy, acc_type<scalar_t> inv_t,
                                    int64_t ignore_index, int split) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t item = blockIdx.x; item < L.N * split; item += gridDim.x) {
    const int64_t r = item / split;
    const int k = static_cast<int>(item % split);
    const int64_t label = labels[r];
    const bool skip = label == ignore_index || !label_in_row(label, L.V);  // 0 or NaN rows, not read
    const acc_t a = skip ? acc_t(0) : g_lp[r] * inv_t, b = skip || !g_ent ? acc_t(0) : g_ent[r] * inv_t;
    const acc_t l = skip ? acc_t(0) : lse[r], h = skip ? acc_t(0) : entropy[r];
    row::thread_row_grad<false>(x + L.offset(r), out + OL.offset(r), L.V, label, label == ignore_index,
                                row::grad_row(a, b, acc_t(0), l, h, inv_t), a, k, split, threadIdx.x, blockDim.x);
  }
}

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda() && labels.device() == logits.device(), "logprobs: expected CUDA tensors on one device");
  const RowLayout L = row_layout(logits, "logits");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == L.N && labels.scalar_type() == at::kLong,
              "labels must be int64 [N] (one per logits row)");
  TORCH_CHECK(L.N == 0 || L.V > 0, "logits must have V >= 1");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                                  double inv_temperature, int64_t ignore_index) {
  check_logits_labels(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowLayout L = row_layout(logits, "logits");
  const int64_t N = L.N, V = L.V;
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(out_dtype);
  at::Tensor logp = at::empty({N}, opts), entropy = at::empty({N}, opts), lse = at::empty({N}, opts);
  if (N == 0) return {logp, entropy, lse};
  const at::Tensor lab = labels.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    SplitScratch sc = split_scratch<scalar_t>(logits, N, V);
    const unsigned grid = blocks_for_rows(N, sc.split);
    logprobs_fwd_kernel<scalar_t><<<grid, threads_for(V), 0, stream>>>(
        logits.data_ptr<scalar_t>(), L, lab.data_ptr<int64_t>(), logp.data_ptr<acc_t>(), entropy.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), static_cast<acc_t>(inv_temperature), ignore_index, sc.split, sc.part.data_ptr<acc_t>(),
        sc.counts());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logp, entropy, lse};
}

// Writes the gradient into `grad` (the logits' shape, any leading strides; may be `logits` itself).
void logprobs_bwd_into_cuda(const at::Tensor& grad, const at::Tensor& grad_logp,
                            const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                            const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                            double inv_temperature, int64_t ignore_index) {
  check_logits_labels(logits, labels);
  TORCH_CHECK(grad.is_cuda() && grad.device() == logits.device() && grad.sizes() == logits.sizes(),
              "grad logits must have the logits' shape and device");
  const RowLayout L = row_layout(logits, "logits"), OL = row_layout(grad, "grad logits");
  const int64_t N = L.N, V = L.V;
  if (N == 0) return;
  const at::Tensor lab = labels.contiguous(), glp = grad_logp.contiguous(), ls = lse.contiguous(),
                   ent = entropy.contiguous();
  const bool has_gent = grad_entropy.has_value() && grad_entropy->defined();
  const at::Tensor gent = has_gent ? grad_entropy->contiguous() : at::Tensor();
  for (const at::Tensor* t : {&glp, &ls, &ent})
    TORCH_CHECK(t->device() == logits.device() && t->dim() == 1 && t->size(0) == N, "logprobs_bwd: expected [N] tensors on ",
                logits.device());
  TORCH_CHECK(!has_gent || (gent.device() == logits.device() && gent.numel() == N), "grad_entropy must be [N]");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_bwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr auto acc_st = c10::CppTypeToScalarType<acc_t>::value;
    TORCH_CHECK(glp.scalar_type() == acc_st && ls.scalar_type() == acc_st && ent.scalar_type() == acc_st &&
                    (!has_gent || gent.scalar_type() == acc_st),
                "grad_logp, grad_entropy, lse, entropy must be ", acc_st, " for ", logits.scalar_type(), " logits");
    const int split = row::row_split<scalar_t>(V, threads_for(V));
    const unsigned grid = blocks_for_rows(N, split);
    logprobs_bwd_kernel<scalar_t><<<grid, threads_for(V), 0, stream>>>(
        logits.data_ptr<scalar_t>(), L, grad.data_ptr<scalar_t>(), OL, lab.data_ptr<int64_t>(), glp.data_ptr<acc_t>(),
        has_gent ? gent.data_ptr<acc_t>() : nullptr, ls.data_ptr<acc_t>(), ent.data_ptr<acc_t>(),
        static_cast<acc_t>(inv_temperature), ignore_index, split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                             const at::Tensor& entropy, double inv_temperature, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = grad_like(logits);  // the logits' strides: rows share their 16-byte phase
  logprobs_bwd_into_cuda(grad, grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index);
  return grad;
}

void logprobs_bwd_inplace_cuda(const at::Tensor& logits, const at::Tensor& grad_logp,
                               const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels,
                               const at::Tensor& lse, const at::Tensor& entropy, double inv_temperature,
                               int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  logprobs_bwd_into_cuda(logits, grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &logprobs_bwd_cuda);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cuda);
}

}  // namespace rlhf_fast
