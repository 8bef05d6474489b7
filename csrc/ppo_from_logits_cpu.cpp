// ppo_loss_from_logits on the CPU. Forward: one read of each logits row (row_stats of logprobs_row.h:
// logp, entropy and the two-part lse), then the per-token PPO / KL / entropy terms and their
// aggregation (ppo_from_logits_math.h) in double, per segment and then over segments in order, so the
// result does not depend on the thread count. Backward: one read + one write of each row (row_grad of
// logprobs_row.h with the saved per-row coefficients). No [N, V] temporary besides grad_logits.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "logprobs_row.h"
#include "ppo_from_logits_math.h"

namespace rlhf_fast {
namespace {

constexpr int64_t kIgnore = -100;

// -> loss [], stats [pg_loss, clipfrac, approx_kl, dual_clipfrac, entropy, kl], saved [N, kFlCols]
// (all in the dtype of old_logp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_from_logits_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp, double kl_coef, c10::string_view kl_estimator,
    double entropy_coef, double inv_temperature, double clip_low, double clip_high, std::optional<double> dual_clip,
    c10::string_view agg_name) {
  check_fl_inputs(logits, labels, old_logp, advantages, mask, ref_logp);
  const int agg = parse_agg(agg_name);
  const auto [seg_len, nseg] = loss_segments("ppo_from_logits", agg, old_logp);
  const bool has_ref = ref_logp.has_value() && ref_logp->defined();
  const FlConfig cfg = parse_fl(dual_clip, has_ref, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high);
  const RowLayout L = row_layout(logits, "ppo_from_logits: logits");
  const int64_t N = L.N, V = L.V;
  const at::Tensor lab = labels.contiguous(), old = old_logp.contiguous(), adv = advantages.contiguous(),
                   m = mask.contiguous(), ref = has_ref ? ref_logp->contiguous() : old;
  const auto opts = old.options();
  at::Tensor saved = at::empty({N, kFlCols}, opts), loss = at::empty({}, opts), stats = at::empty({kFlStats}, opts);
  const int64_t* y = lab.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(old.scalar_type(), "ppo_from_logits_fwd_cpu", [&] {
    using T = scalar_t;
    T* sv = saved.data_ptr<T>();
    // 1. the row pass: logp (in col 0 until the token pass), m, log_s, H
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_from_logits_rows", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const scalar_t* x = logits.data_ptr<scalar_t>();
      const acc_t inv_t = static_cast<acc_t>(inv_temperature);
      at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          T* col = sv + r * kFlCols;
          if (y[r] == kIgnore || !label_in_row(y[r], V)) {  // not read; NaN for an out-of-range label
            col[0] = col[2] = col[3] = col[4] = y[r] == kIgnore ? T(0) : std::numeric_limits<T>::quiet_NaN();
            continue;
          }
          const scalar_t* row = x + L.offset(r);
          const RowStats<acc_t> st = row_stats<scalar_t, acc_t>(row, V, inv_t);
          col[0] = static_cast<T>((static_cast<acc_t>(row[y[r]]) - st.m) * inv_t - st.log_s);
          col[2] = static_cast<T>(st.m);
          col[3] = static_cast<T>(st.log_s);
          col[4] = static_cast<T>(st.entropy);
        }
      });
    });
    // 2. the token pass, per segment: sums and unscaled gradients
    const T *po = old.data_ptr<T>(), *pa = adv.data_ptr<T>(), *pr = ref.data_ptr<T>();
    const bool is_bool = m.scalar_type() == at::kBool;  // (data_ptr is null for empty tensors)
    const bool* mb = is_bool ? m.data_ptr<bool>() : nullptr;
    const T* mw = is_bool ? nullptr : m.data_ptr<T>();
    std::vector<double> parts(static_cast<size_t>(nseg) * kFlParts, 0.0);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(seg_len, 1));
    at::parallel_for(0, nseg, grain, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        double acc[kFlParts] = {0, 0, 0, 0, 0, 0, 0};
        const int64_t e = std::min(N, (s + 1) * seg_len);
        for (int64_t i = s * seg_len; i < e; ++i) {
          T* col = sv + i * kFlCols;
          const double w = is_bool ? double(mb[i]) : double(mw[i]);
          double g_pol, g_kl, g_ent, g_adv;
          fl_token(col[0], col[4], po[i], pa[i], pr[i], w, cfg, acc, g_pol, g_kl, g_ent, g_adv);
          col[0] = static_cast<T>(g_pol);
          col[1] = static_cast<T>(g_ent);
          col[5] = static_cast<T>(g_kl);
          col[6] = static_cast<T>(g_adv);
        }
        std::copy(acc, acc + kFlParts, parts.begin() + s * kFlParts);
      }
    });
    // 3. totals in a fixed order, outputs, and each segment's scale applied to its tokens
    FlTotals tot;
    for (int64_t s = 0; s < nseg; ++s) fl_agg_add(agg, parts.data() + s * kFlParts, tot);
    double l, st[kFlStats];
    fl_outputs(agg, tot, cfg, &l, st);
    loss.data_ptr<T>()[0] = static_cast<T>(l);
    for (int j = 0; j < kFlStats; ++j) stats.data_ptr<T>()[j] = static_cast<T>(st[j]);
    at::parallel_for(0, nseg, grain, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const double k = agg_scale(agg, parts.data() + s * kFlParts, tot.pol);
        const int64_t e = std::min(N, (s + 1) * seg_len);
        for (int64_t i = s * seg_len; i < e; ++i) fl_scale<T>(sv + i * kFlCols, k, y[i] == kIgnore);
      }
    });
  });
  return {loss, stats, saved};
}

// grad_logits [N, V] (logits dtype) = G·(g_lp·(onehot - p) - g_ent·p·(log p + H)) / T per row.
at::Tensor ppo_from_logits_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& saved, double inv_temperature) {
  const RowLayout L = row_layout(logits, "ppo_from_logits: logits");
  const int64_t N = L.N, V = L.V;
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N && labels.scalar_type() == at::kLong,
              "ppo_from_logits: labels must be int64 [N]");
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == N && saved.size(1) == kFlCols && grad_loss.numel() == 1 &&
                  grad_loss.scalar_type() == saved.scalar_type(),
              "ppo_from_logits_bwd: expected saved [N, ", kFlCols, "] and a one-element grad_loss of its dtype");
  at::Tensor grad = grad_like(logits);  // the logits' strides: input and gradient rows share their phase
  const RowLayout GL = row_layout(grad, "grad logits");
  const at::Tensor lab = labels.contiguous(), sv = saved.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(sv.scalar_type(), "ppo_from_logits_bwd_cpu", [&] {
    using T = scalar_t;
    const T* s = sv.data_ptr<T>();
    const double G = static_cast<double>(grad_loss.item<T>());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_from_logits_bwd_rows", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const scalar_t* x = logits.data_ptr<scalar_t>();
      scalar_t* gx = grad.data_ptr<scalar_t>();
      const acc_t inv_t = static_cast<acc_t>(inv_temperature);
      at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* out = gx + GL.offset(r);
          if (y[r] == kIgnore || !label_in_row(y[r], V)) {  // not read: 0, or NaN for an out-of-range label
            std::fill(out, out + V, y[r] == kIgnore ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN());
            continue;
          }
          const T* col = s + r * kFlCols;
          row_grad<scalar_t, acc_t>(x + L.offset(r), out, V, y[r], static_cast<acc_t>(G * col[0] * inv_temperature),
                                    static_cast<acc_t>(G * col[1] * inv_temperature), static_cast<acc_t>(col[2]),
                                    static_cast<acc_t>(col[3]), static_cast<acc_t>(col[4]), inv_t);
        }
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("ppo_from_logits_fwd", &ppo_from_logits_fwd_cpu);
  m.impl("ppo_from_logits_bwd", &ppo_from_logits_bwd_cpu);
}

}  // namespace rlhf_fast
