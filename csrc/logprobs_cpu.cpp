// logprobs on the CPU: one pass over each row in the forward (online max / sum-exp / Σp·z), one
// read + one write in the backward (p recomputed from the saved logsumexp). Row loops: logprobs_row.h.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "logprobs_row.h"

namespace rlhf_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits,
                                                                 const at::Tensor& labels,
                                                                 double inv_temperature,
                                                                 int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [N, V] with unit column stride");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong,
              "labels must be int64 [N]");
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) > 0, "logits must have V >= 1");
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(out_dtype);
  at::Tensor logp = at::empty({N}, opts), entropy = at::empty({N}, opts), lse = at::empty({N}, opts);
  const at::Tensor lab = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* y = lab.data_ptr<int64_t>();
    acc_t *lp = logp.data_ptr<acc_t>(), *ent = entropy.data_ptr<acc_t>(), *ls = lse.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (y[r] == ignore_index) {
          lp[r] = ent[r] = ls[r] = 0;
          continue;
        }
        const scalar_t* row = x + r * row_stride;
        const RowStats<acc_t> st = row_stats<scalar_t, acc_t>(row, V, inv_t);
        lp[r] = (static_cast<acc_t>(row[y[r]]) - st.m) * inv_t - st.log_s;
        ent[r] = st.entropy;
        ls[r] = st.m * inv_t + st.log_s;
      }
    });
  });
  return {logp, entropy, lse};
}

// grad_z = g_lp·(onehot - p) - g_ent·p·(z - lse + H), grad_x = grad_z·inv_t, written to `grad`
// (row stride free; `grad` may be `logits` itself).
void logprobs_bwd_into(const at::Tensor& grad, const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                       const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                       const at::Tensor& entropy, double inv_temperature, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [N, V] with unit column stride");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong,
              "labels must be int64 [N]");
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0),
                out_stride = grad.stride(0);
  const at::Tensor lab = labels.contiguous(), glp = grad_logp.contiguous(), ls = lse.contiguous(),
                   ent = entropy.contiguous();
  const bool has_gent = grad_entropy.has_value() && grad_entropy->defined();
  const at::Tensor gent = has_gent ? grad_entropy->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    TORCH_CHECK(glp.scalar_type() == acc_type && ls.scalar_type() == acc_type && ent.scalar_type() == acc_type &&
                    (!has_gent || gent.scalar_type() == acc_type),
                "grad_logp, grad_entropy, lse, entropy must be ", acc_type, " for ", logits.scalar_type(), " logits");
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* gx = grad.data_ptr<scalar_t>();
    const int64_t* y = lab.data_ptr<int64_t>();
    const acc_t *g_lp = glp.data_ptr<acc_t>(), *l = ls.data_ptr<acc_t>(), *h = ent.data_ptr<acc_t>();
    const acc_t* g_ent = has_gent ? gent.data_ptr<acc_t>() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(inv_temperature);
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* out = gx + r * out_stride;
        if (y[r] == ignore_index) {
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        row_grad<scalar_t, acc_t>(x + r * row_stride, out, V, y[r], g_lp[r] * inv_t,
                                  (g_ent ? g_ent[r] : acc_t(0)) * inv_t, acc_t(0), l[r], h[r], inv_t);
      }
    });
  });
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                            const at::Tensor& entropy, double inv_temperature, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, V]");
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  logprobs_bwd_into(grad, grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index);
  return grad;
}

void logprobs_bwd_inplace_cpu(const at::Tensor& logits, const at::Tensor& grad_logp,
                              const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels,
                              const at::Tensor& lse, const at::Tensor& entropy, double inv_temperature,
                              int64_t ignore_index) {
  logprobs_bwd_into(logits, grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cpu);
}

}  // namespace rlhf_fast
