// logprobs on the CPU: one pass over each row in the forward (online max / sum-exp / Σp·z), one
// read + one write in the backward (p recomputed from the saved logsumexp). Row loops: logprobs_row.h;
// logits [N, V] or [B, T, V] with any leading strides: logits_layout.h.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "logits_layout.h"
#include "logprobs_row.h"

namespace rlhf_fast {
namespace {

void check_labels(const at::Tensor& labels, int64_t N) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N && labels.scalar_type() == at::kLong,
              "labels must be int64 [N] (one per logits row)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits,
                                                                 const at::Tensor& labels,
                                                                 double inv_temperature,
                                                                 int64_t ignore_index) {
  const RowLayout L = row_layout(logits, "logits");
  check_labels(labels, L.N);
  TORCH_CHECK(L.N == 0 || L.V > 0, "logits must have V >= 1");
  const int64_t N = L.N, V = L.V;
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
        if (!label_in_row(y[r], V)) {  // out of range (no host check ran): NaN, the row not read
          lp[r] = ent[r] = ls[r] = std::numeric_limits<acc_t>::quiet_NaN();
          continue;
        }
        const scalar_t* row = x + L.offset(r);
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
// (the shape of logits, any leading strides; `grad` may be `logits` itself). Ignored rows get 0,
// rows with an out-of-range label NaN, neither is read.
void logprobs_bwd_into(const at::Tensor& grad, const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                       const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                       const at::Tensor& entropy, double inv_temperature, int64_t ignore_index) {
  const RowLayout L = row_layout(logits, "logits"), G = row_layout(grad, "grad logits");
  check_labels(labels, L.N);
  TORCH_CHECK(grad.sizes() == logits.sizes(), "grad logits must have the logits' shape");
  const int64_t N = L.N, V = L.V;
  const at::Tensor lab = labels.contiguous(), glp = grad_logp.contiguous(), ls = lse.contiguous(),
                   ent = entropy.contiguous();
  const bool has_gent = grad_entropy.has_value() && grad_entropy->defined();
  const at::Tensor gent = has_gent ? grad_entropy->contiguous() : at::Tensor();
  TORCH_CHECK(glp.numel() == N && ls.numel() == N && ent.numel() == N && (!has_gent || gent.numel() == N),
              "grad_logp, grad_entropy, lse, entropy must have N = ", N, " elements");
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
        scalar_t* out = gx + G.offset(r);
        if (y[r] == ignore_index || !label_in_row(y[r], V)) {
          std::fill(out, out + V, y[r] == ignore_index ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN());
          continue;
        }
        row_grad<scalar_t, acc_t>(x + L.offset(r), out, V, y[r], g_lp[r] * inv_t,
                                  (g_ent ? g_ent[r] : acc_t(0)) * inv_t, acc_t(0), l[r], h[r], inv_t);
      }
    });
  });
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                            const at::Tensor& entropy, double inv_temperature, int64_t ignore_index) {
  at::Tensor grad = grad_like(logits);
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
