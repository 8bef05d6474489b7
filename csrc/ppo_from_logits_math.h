// Per-token math and aggregation of ppo_loss_from_logits, shared by the CPU and CUDA kernels, on top
// of rl_losses_math.h (policy_token, kl_token, agg_add / agg_scale): the PPO terms see the logp and
// entropy that the row pass (logprobs_row.h / logprobs_row_cuda.cuh) computed from the logits.
//
// Per token the forward saves kCols values (math dtype), the backward's only inputs besides the logits:
//   0 g_lp  = d loss / d logp   (policy + KL, 0 for an ignored label, whose logp is the constant 0)
//   1 g_ent = d loss / d entropy (0 for an ignored label)
//   2 m, 3 log_s: lse = m/T + log_s in two parts (m the raw row max), 4 the entropy H
//   5 d loss / d old_logp, 6 d loss / d advantages, 7 d loss / d ref_logp
// all already scaled by the aggregation weight of the token.
#pragma once
#include "logits_layout.h"
#include "rl_losses_math.h"

namespace rlhf_fast {

constexpr int kFlCols = 8;
// Segment sums: [Σ pg·w, Σ w, Σ clipped·w, Σ -log_ratio·w, Σ dual·w, Σ H·w, Σ kl·w].
constexpr int kFlParts = 7;
// Outputs: loss, then stats [pg_loss, clipfrac, approx_kl, dual_clipfrac, entropy, kl].
constexpr int kFlStats = 6;

struct FlConfig {
  double lo, hi, dual, kl_coef, ent_coef;
  bool has_dual, has_ref, use_kl, plus;
  int est;
};

// One token: adds its segment sums to acc and returns the unscaled gradients (times the mask weight w).
RLHF_HD void fl_token(double logp, double h, double old, double adv, double ref, double w, const FlConfig& c,
                      double* acc, double& g_pol, double& g_kl, double& g_ent, double& g_adv) {
  const PolicyToken<double> t = policy_token<double>(logp, old, adv, c.lo, c.hi, c.has_dual, c.dual);
  double k = 0, dk = 0;
  if (c.has_ref) kl_token<double>(logp, ref, c.est, c.plus, false, 0.0, k, dk);
  g_pol = w * t.d_logp;
  g_adv = w * t.d_adv;
  g_kl = c.use_kl ? w * c.kl_coef * dk : 0.0;  // reference: the KL term is only added when kl_coef != 0
  g_ent = -w * c.ent_coef;
  acc[0] += t.pg * w;
  acc[1] += w;
  acc[2] += t.clipped * w;
  acc[3] += t.neg_log_ratio * w;
  acc[4] += t.dual * w;
  acc[5] += h * w;
  acc[6] += k * w;
}

// Totals over segments of the three aggregated terms (policy with its statistics, entropy, KL): the
// entropy and KL terms share the weights and so the denominators of the policy term.
struct FlTotals {
  AggTotals pol;
  double ent = 0, kl = 0;
};

RLHF_HD void fl_agg_add(int agg, const double* part, FlTotals& t) {
  agg_add(agg, part, t.pol);
  const double e[kParts] = {part[5], part[1], 0, 0, 0}, k[kParts] = {part[6], part[1], 0, 0, 0};
  AggTotals te, tk;
  agg_add(agg, e, te);
  agg_add(agg, k, tk);
  t.ent += te.loss_num;
  t.kl += tk.loss_num;
}

// loss = pg - ent_coef·H + kl_coef·kl (in the reference's order), then the kFlStats statistics.
RLHF_HD void fl_outputs(int agg, const FlTotals& t, const FlConfig& c, double* loss, double* stats) {
  double out4[4];
  agg_outputs(agg, t.pol, out4);
  const double den = agg_den(agg, t.pol), ent = t.ent / den, kl = t.kl / den;
  double l = out4[0];
  if (c.ent_coef != 0) l = l - c.ent_coef * ent;
  if (c.use_kl) l = l + c.kl_coef * kl;
  *loss = l;
  stats[0] = out4[0];
  stats[1] = out4[1];
  stats[2] = out4[2];
  stats[3] = out4[3];
  stats[4] = ent;
  stats[5] = c.has_ref ? kl : 0.0;
}

// Writes the saved gradients of one token from the unscaled ones (cols 0, 1, 5, 6 as left by the
// token pass: g_pol, g_ent, g_kl, g_adv), k = d loss / d (token value·w) of its segment.
template <typename T>
RLHF_HD void fl_scale(T* col, double k, bool ignored) {
  const double g_pol = col[0], g_kl = col[5];
  col[0] = ignored ? T(0) : static_cast<T>(k * (g_pol + g_kl));
  col[1] = ignored ? T(0) : static_cast<T>(k * static_cast<double>(col[1]));
  col[5] = static_cast<T>(-k * g_pol);
  col[6] = static_cast<T>(k * static_cast<double>(col[6]));
  col[7] = static_cast<T>(-k * g_kl);
}

inline FlConfig parse_fl(std::optional<double> dual_clip, bool has_ref, double kl_coef, c10::string_view est,
                         double entropy_coef, double clip_low, double clip_high) {
  const KlConfig kc = parse_kl(est, std::nullopt);
  FlConfig c;
  c.lo = 1.0 - clip_low;
  c.hi = 1.0 + clip_high;
  c.dual = dual_clip.value_or(0.0);
  c.has_dual = dual_clip.has_value();
  c.has_ref = has_ref;
  c.use_kl = has_ref && kl_coef != 0;
  c.kl_coef = kl_coef;
  c.ent_coef = entropy_coef;
  c.plus = kc.plus;
  c.est = kc.estimator;
  return c;
}

// Host checks of the forward's per-token inputs (the Python wrapper casts them to one math dtype).
inline void check_fl_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
                            const at::Tensor& advantages, const at::Tensor& mask,
                            const std::optional<at::Tensor>& ref_logp) {
  const int64_t N = row_layout(logits, "ppo_from_logits: logits").N;  // [N, V] or [B, T, V], unit stride over V
  TORCH_CHECK(N == 0 || logits.size(-1) > 0, "ppo_from_logits: logits must have V >= 1");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N && labels.scalar_type() == at::kLong,
              "ppo_from_logits: labels must be int64 [N]");
  const at::Tensor& ref = ref_logp.has_value() ? *ref_logp : old_logp;
  check_loss_inputs("ppo_from_logits", old_logp, advantages, ref, &mask);
  TORCH_CHECK(old_logp.numel() == N, "ppo_from_logits: old_logp must have N = ", N, " elements");
  TORCH_CHECK(labels.device() == logits.device() && old_logp.device() == logits.device(),
              "ppo_from_logits: inputs must share one device");
}

}  // namespace rlhf_fast
