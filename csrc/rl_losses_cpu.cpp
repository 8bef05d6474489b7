// Elementwise RL losses on the CPU: KL estimators, PPO policy and value losses. The forward writes
// d loss / d input beside the loss (the gradient is elementwise), so the autograd backward is a scale
// by the upstream gradient. Per-token math: rl_losses_math.h (shared with the CUDA kernels).
// The PPO losses compute each token in double whatever the input dtype: their mean is a small
// difference of O(1) terms, whose fp32 rounding alone would cost ~1e-5 relative accuracy. Reductions:
// per segment (row, or fixed chunk for token-mean) in double, then over segments in order, so the
// result does not depend on the thread count.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "rl_losses_math.h"

namespace rlhf_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_fwd_cpu(const at::Tensor& logp, const at::Tensor& ref_logp,
                                              c10::string_view estimator, std::optional<double> clamp) {
  check_loss_inputs("kl", logp, ref_logp, ref_logp, nullptr);
  const KlConfig cfg = parse_kl(estimator, clamp);
  const at::Tensor a = logp.contiguous(), b = ref_logp.contiguous();
  at::Tensor out = at::empty_like(a), grad = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "kl_fwd_cpu", [&] {
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>();
    scalar_t *po = out.data_ptr<scalar_t>(), *pg = grad.data_ptr<scalar_t>();
    const scalar_t c = static_cast<scalar_t>(cfg.clamp);
    at::parallel_for(0, a.numel(), 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        kl_token<scalar_t>(pa[i], pb[i], cfg.estimator, cfg.plus, cfg.has_clamp, c, po[i], pg[i]);
    });
  });
  return {out, grad};
}

// Runs token(i, acc) over every segment (acc: kParts double sums), then scales the per-token
// gradients g1, g2 (already multiplied by the mask weight) by d loss / d token of their segment.
// Returns (loss, stats[3]) in the dtype of g1.
template <typename scalar_t, typename TokenFn>
std::tuple<at::Tensor, at::Tensor> segmented_loss(int agg, int64_t numel, int64_t seg_len, int64_t nseg,
                                                  scalar_t* g1, scalar_t* g2, const at::TensorOptions& opts,
                                                  int64_t n_stats, TokenFn token) {
  std::vector<double> parts(static_cast<size_t>(nseg) * kParts, 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(seg_len, 1));
  at::parallel_for(0, nseg, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      double acc[kParts] = {0, 0, 0, 0, 0};
      const int64_t e = std::min(numel, (s + 1) * seg_len);
      for (int64_t i = s * seg_len; i < e; ++i) token(i, acc);
      std::copy(acc, acc + kParts, parts.begin() + s * kParts);
    }
  });
  AggTotals tot;
  for (int64_t s = 0; s < nseg; ++s) agg_add(agg, parts.data() + s * kParts, tot);
  at::parallel_for(0, nseg, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const scalar_t k = static_cast<scalar_t>(agg_scale(agg, parts.data() + s * kParts, tot));
      const int64_t e = std::min(numel, (s + 1) * seg_len);
      for (int64_t i = s * seg_len; i < e; ++i) {
        g1[i] *= k;
        g2[i] *= k;
      }
    }
  });
  double out4[4];
  agg_outputs(agg, tot, out4);
  at::Tensor loss = at::empty({}, opts), stats = at::empty({n_stats}, opts);
  loss.data_ptr<scalar_t>()[0] = static_cast<scalar_t>(out4[0]);
  for (int64_t j = 0; j < n_stats; ++j) stats.data_ptr<scalar_t>()[j] = static_cast<scalar_t>(out4[1 + j]);
  return {loss, stats};
}

// -> loss [], stats [clipfrac, approx_kl, dual_clipfrac], d loss/d logp, d loss/d advantages
// (d loss / d old_logp = -d loss / d logp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    double clip_low, double clip_high, std::optional<double> dual_clip, c10::string_view agg_name, int64_t loss_type,
    const std::optional<at::Tensor>& seq_log_ratio) {
  check_loss_inputs("ppo_policy_loss", logp, old_logp, advantages, &mask);
  const int agg = parse_agg(agg_name), ltype = parse_loss_type(loss_type);
  const auto [seg_len, nseg] = loss_segments("ppo_policy_loss", agg, logp);
  const bool has_seq = seq_log_ratio.has_value() && seq_log_ratio->defined();
  TORCH_CHECK(ltype != kGspo || has_seq, "ppo_policy_loss: loss_type gspo needs seq_log_ratio");
  if (has_seq) check_loss_inputs("ppo_policy_loss", logp, old_logp, *seq_log_ratio, nullptr);
  const at::Tensor lp = logp.contiguous(), old = old_logp.contiguous(), adv = advantages.contiguous(),
                   m = mask.contiguous(), sq = has_seq ? seq_log_ratio->contiguous() : lp;
  at::Tensor g_lp = at::empty_like(lp), g_adv = at::empty_like(lp), loss, stats;
  const PolicyConfig cfg{1.0 - clip_low, 1.0 + clip_high, dual_clip.has_value(), dual_clip.value_or(0.0)};
  AT_DISPATCH_FLOATING_TYPES(lp.scalar_type(), "ppo_policy_loss_fwd_cpu", [&] {
    using T = scalar_t;
    const T *plp = lp.data_ptr<T>(), *pold = old.data_ptr<T>(), *padv = adv.data_ptr<T>(), *psq = sq.data_ptr<T>();
    const bool is_bool = m.scalar_type() == at::kBool;  // (data_ptr is null for empty tensors)
    const bool* mb = is_bool ? m.data_ptr<bool>() : nullptr;
    const T* mw = is_bool ? nullptr : m.data_ptr<T>();
    T *pg = g_lp.data_ptr<T>(), *pga = g_adv.data_ptr<T>();
    std::tie(loss, stats) = segmented_loss<T>(
        agg, lp.numel(), seg_len, nseg, pg, pga, lp.options(), 3, [&](int64_t i, double* acc) {
          const double w = is_bool ? double(mb[i]) : double(mw[i]);
          const PolicyToken<double> t = policy_token<double>(plp[i], pold[i], padv[i], cfg.lo, cfg.hi, cfg.has_dual,
                                                             cfg.dual, ltype, psq[i]);
          pg[i] = static_cast<T>(w * t.d_logp);
          pga[i] = static_cast<T>(w * t.d_adv);
          acc[0] += t.pg * w;
          acc[1] += w;
          acc[2] += t.clipped * w;
          acc[3] += t.neg_log_ratio * w;
          acc[4] += t.dual * w;
        });
  });
  return {loss, stats, g_lp, g_adv};
}

// -> loss [], stats [vf_clipfrac], d loss/d values, d loss/d old_values
// (d loss / d returns = -(d values + d old_values)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
    std::optional<double> clip, c10::string_view agg_name) {
  check_loss_inputs("ppo_value_loss", values, old_values, returns, &mask);
  const int agg = parse_agg(agg_name);
  const auto [seg_len, nseg] = loss_segments("ppo_value_loss", agg, values);
  const at::Tensor v = values.contiguous(), old = old_values.contiguous(), ret = returns.contiguous(),
                   m = mask.contiguous();
  at::Tensor g_v = at::empty_like(v), g_old = at::empty_like(v), loss, stats;
  const bool has_clip = clip.has_value();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ppo_value_loss_fwd_cpu", [&] {
    using T = scalar_t;
    const T *pv = v.data_ptr<T>(), *pold = old.data_ptr<T>(), *pret = ret.data_ptr<T>();
    const bool is_bool = m.scalar_type() == at::kBool;  // (data_ptr is null for empty tensors)
    const bool* mb = is_bool ? m.data_ptr<bool>() : nullptr;
    const T* mw = is_bool ? nullptr : m.data_ptr<T>();
    T *pgv = g_v.data_ptr<T>(), *pgo = g_old.data_ptr<T>();
    const double c = clip.value_or(0.0);
    std::tie(loss, stats) = segmented_loss<T>(
        agg, v.numel(), seg_len, nseg, pgv, pgo, v.options(), 1, [&](int64_t i, double* acc) {
          const double w = is_bool ? double(mb[i]) : double(mw[i]);
          const ValueToken<double> t = value_token<double>(pv[i], pold[i], pret[i], has_clip, c);
          pgv[i] = static_cast<T>(w * t.d_v);
          pgo[i] = static_cast<T>(w * t.d_old);
          acc[0] += t.vl * w;
          acc[1] += w;
          acc[2] += t.clipped * w;
        });
  });
  return {loss, stats, g_v, g_old};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("kl_fwd", &kl_fwd_cpu);
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd_cpu);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd_cpu);
}

}  // namespace rlhf_fast
