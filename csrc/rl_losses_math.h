// Per-token math of the elementwise RL losses (KL estimators, PPO policy and value losses) and their
// aggregation, shared verbatim by the CPU (rl_losses_cpu.cpp) and CUDA (rl_losses_cuda.cu) kernels, so
// the CPU tests check the very expressions the GPU runs. Every branch mirrors rlhf_fast/reference.py,
// including its conventions at the kinks (written there with torch.where, not taken from torch): a
// clamp passes the gradient on the closed interval (at its exact ends the input passes), a max / min
// of the PPO losses takes its second branch only where strictly larger / smaller (a tie keeps the
// unclipped branch), abs has gradient sign(x) (0 at 0). NaN propagates through all of them: no
// std::max / fmax (they drop NaN); the selects test for NaN explicitly.
#pragma once
#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(__CUDACC__)
#define RLHF_HD __host__ __device__ __forceinline__
#else
#define RLHF_HD inline
#endif

namespace rlhf_fast {

RLHF_HD float m_exp(float x) { return expf(x); }
RLHF_HD double m_exp(double x) { return exp(x); }
RLHF_HD float m_expm1(float x) { return expm1f(x); }
RLHF_HD double m_expm1(double x) { return expm1(x); }
// where reference._max(a, b) takes b: b strictly larger, or NaN (a tie keeps a)
template <typename T>
RLHF_HD bool m_second_wins(T a, T b) { return b > a || b != b; }
// reference._clip: the value of clamp (NaN passes) and its gradient, 1 unless strictly outside [lo, hi]
template <typename T>
RLHF_HD T m_clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
template <typename T>
RLHF_HD T m_in(T x, T lo, T hi) { return (x < lo || x > hi) ? T(0) : T(1); }

// ------------------------------------------------------------------------------------------ KL
enum KlEstimator : int { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3 };

struct KlConfig {
  int estimator;
  bool plus;         // "k3+": this estimator's value, k2's gradient
  bool has_clamp;
  double clamp;
};

inline KlConfig parse_kl(std::string_view name, std::optional<double> clamp) {
  KlConfig c{kK1, false, clamp.has_value(), clamp.value_or(0.0)};
  if (!name.empty() && name.back() == '+') {
    c.plus = true;
    name.remove_suffix(1);
  }
  if (name == "k1") c.estimator = kK1;
  else if (name == "k2") c.estimator = kK2;
  else if (name == "k3") c.estimator = kK3;
  else if (name == "abs") c.estimator = kAbs;
  else TORCH_CHECK(false, "kl: unknown estimator '", name, "'");
  return c;
}

// out = estimator(d), d = logp - ref_logp; grad = d out / d logp (d out / d ref_logp = -grad).
template <typename T>
RLHF_HD void kl_token(T logp, T ref_logp, int est, bool plus, bool has_clamp, T clamp, T& out, T& grad) {
  T d = logp - ref_logp;
  // reference.kl: under a clamp k3 is evaluated at max(d, -K3_FLOOR) (exp's last finite argument, less 1):
  // below it k3 > 1e38 is clamped anyway, and the clamp's zero gradient never meets an infinite one (0·inf)
  const T k3_floor = sizeof(T) == sizeof(float) ? T(88) : T(709);
  if (has_clamp && est == kK3 && d < -k3_floor) d = -k3_floor;
  T v, g;
  if (est == kK1) {
    v = d;
    g = T(1);
  } else if (est == kK2) {
    v = T(0.5) * d * d;
    g = d;
  } else if (est == kK3) {
    const T em = m_expm1(-d);  // exp(-d) - 1 without cancellation
    v = em + d;
    g = -em;
  } else {
    v = d < T(0) ? -d : d;
    g = T((d > T(0)) - (d < T(0)));
  }
  if (plus) {  // k2 + (v - k2).detach(): rounded exactly as the reference rounds it
    const T k2 = T(0.5) * d * d;
    v = k2 + (v - k2);
    g = d;
  }
  if (has_clamp) {
    g *= m_in(v, -clamp, clamp);
    v = m_clamp(v, -clamp, clamp);
  }
  out = v;
  grad = g;
}

// ------------------------------------------------------------------------------------------ aggregation
enum Agg : int { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2 };

inline int parse_agg(std::string_view agg) {
  if (agg == "token-mean") return kTokenMean;
  if (agg == "seq-mean-token-sum") return kSeqMeanTokenSum;
  if (agg == "seq-mean-token-mean") return kSeqMeanTokenMean;
  TORCH_CHECK(false, "unknown agg '", agg, "'");
  return kTokenMean;
}

// Segments: rows of T for the seq-mean modes; fixed chunks of the flat tensor for token-mean (any
// shape, rows do not matter). Each segment reduces, in double and in a fixed order, kParts sums:
// [Σ loss·w, Σ w, Σ stat0·w, Σ stat1·w, Σ stat2·w], w the mask weight.
constexpr int kParts = 5;
constexpr int64_t kTokenMeanSegment = 4096;

struct AggTotals {
  double loss_num = 0, w = 0, s0 = 0, s1 = 0, s2 = 0, n_seq = 0;
};

// Adds one segment's contribution (mirrors reference.aggregate: per-sequence terms of empty rows are
// multiplied by 0, not skipped, as masked_mean does).
RLHF_HD void agg_add(int agg, const double* part, AggTotals& t) {
  t.w += part[1];
  t.s0 += part[2];
  t.s1 += part[3];
  t.s2 += part[4];
  if (agg == kTokenMean) {
    t.loss_num += part[0];
  } else {
    const double n = part[1], valid = n > 0 ? 1.0 : 0.0;
    const double per_seq = agg == kSeqMeanTokenMean ? part[0] / (n < 1 ? 1.0 : n) : part[0];
    t.loss_num += per_seq * valid;
    t.n_seq += valid;
  }
}

RLHF_HD void agg_merge(AggTotals& a, const AggTotals& b) {
  a.loss_num += b.loss_num;
  a.w += b.w;
  a.s0 += b.s0;
  a.s1 += b.s1;
  a.s2 += b.s2;
  a.n_seq += b.n_seq;
}

RLHF_HD double agg_den(int agg, const AggTotals& t) {
  const double d = agg == kTokenMean ? t.w : t.n_seq;
  return d > 0 ? d : 1.0;  // masked_mean: 0, not nan, when nothing is selected
}

// d loss / d (per-token loss·w) for the tokens of one segment.
RLHF_HD double agg_scale(int agg, const double* part, const AggTotals& t) {
  const double den = agg_den(agg, t);
  if (agg == kTokenMean) return 1.0 / den;
  const double n = part[1], valid = n > 0 ? 1.0 : 0.0;
  return agg == kSeqMeanTokenMean ? valid / den / (n < 1 ? 1.0 : n) : valid / den;
}

// loss, then the token-level masked means of the three statistics.
RLHF_HD void agg_outputs(int agg, const AggTotals& t, double* out4) {
  const double wd = t.w > 0 ? t.w : 1.0;
  out4[0] = t.loss_num / agg_den(agg, t);
  out4[1] = t.s0 / wd;
  out4[2] = t.s1 / wd;
  out4[3] = t.s2 / wd;
}

// ------------------------------------------------------------------------------------------ PPO policy
struct PolicyConfig {
  double lo, hi;       // ratio clip range [1 - clip_low, 1 + clip_high]
  bool has_dual;
  double dual;
};

// Per-token clipped surrogate and its derivatives. stats: clipped (pg2 > pg1), -log_ratio, dual-clipped.
template <typename T>
struct PolicyToken {
  T pg, d_logp, d_adv, clipped, neg_log_ratio, dual;
};

// Loss types of reference.policy_token_loss: ppo, gspo (sequence ratio, GSPO-token), cispo.
enum LossType : int { kPpo = 0, kGspo = 1, kCispo = 2 };

inline int parse_loss_type(int64_t code) {
  TORCH_CHECK(code >= kPpo && code <= kCispo, "unknown loss_type code ", code, " (0 ppo, 1 gspo, 2 cispo)");
  return static_cast<int>(code);
}

// d loss / d old_logp is -d_logp for ppo and 0 for gspo and cispo (their ratio is detached).
// seq_lr: gspo's sequence log-ratio of the token (unused by the others).
template <typename T>
RLHF_HD PolicyToken<T> policy_token(T logp, T old_logp, T adv, T lo, T hi, bool has_dual, T dual_c, int loss = kPpo,
                                    T seq_lr = T(0)) {
  const T na = -adv;
  if (loss == kCispo) {  // -sg(clip(r))·A·logp, r as ppo
    const T x = logp - old_logp;
    const T lr = m_clamp(x, T(-20), T(20));
    const T r = m_exp(lr);
    const T rc = m_clamp(r, lo, hi);
    return {na * rc * logp, na * rc, -rc * logp, (r < lo || r > hi) ? T(1) : T(0), -lr, T(0)};
  }
  // ppo: log r = clip(logp - old, ±20); gspo: log r = min(seq_lr, 10) (value), d log r / d logp = 1 inside
  const T x = loss == kGspo ? seq_lr : logp - old_logp;
  const T lr_lo = loss == kGspo ? T(-INFINITY) : T(-20), lr_hi = loss == kGspo ? T(10) : T(20);
  const T lr = m_clamp(x, lr_lo, lr_hi), d_lr = m_in(x, lr_lo, lr_hi);
  const T r = m_exp(lr);
  const T rc = m_clamp(r, lo, hi), d_rc = m_in(r, lo, hi);
  const T pg1 = na * r, pg2 = na * rc;
  // reference._max(pg1, pg2): the clipped branch only where strictly larger (or NaN); a tie keeps pg1.
  // g = d pg / d r, ga = d pg / d adv.
  const bool take2 = m_second_wins(pg1, pg2);
  T pg = take2 ? pg2 : pg1, g = take2 ? na * d_rc : na, ga = take2 ? -rc : -r;
  T dual = 0;
  if (has_dual && adv < T(0)) {  // where(A < 0, _min(pg, -A·c), pg): the cap only where strictly smaller
    const T cap = na * dual_c;
    if (pg > cap) {
      dual = T(1);
      pg = cap, g = T(0), ga = -dual_c;
    }
  }
  return {pg, g * r * d_lr, ga, pg2 > pg1 ? T(1) : T(0), loss == kGspo ? old_logp - logp : -lr, dual};
}

// ------------------------------------------------------------------------------------------ PPO value
template <typename T>
struct ValueToken {
  T vl, d_v, d_old, clipped;  // d loss / d returns = -(d_v + d_old)
};

template <typename T>
RLHF_HD ValueToken<T> value_token(T v, T old_v, T ret, bool has_clip, T clip) {
  const T e1 = v - ret, l1 = e1 * e1;
  if (!has_clip) return {T(0.5) * l1, e1, T(0), T(0)};
  const T dv = v - old_v;
  const T in = m_in(dv, -clip, clip);
  const T e2 = old_v + m_clamp(dv, -clip, clip) - ret, l2 = e2 * e2;
  // reference._max(l1, l2): a tie keeps the unclipped loss; a NaN l2 (old_v NaN) is taken
  if (m_second_wins(l1, l2)) return {T(0.5) * l2, e2 * in, e2 * (T(1) - in), l2 > l1 ? T(1) - in : T(0)};
  return {T(0.5) * l1, e1, T(0), T(0)};
}

// ------------------------------------------------------------------------------------------ host checks
// The Python wrappers cast the float inputs to one math dtype (fp32 or fp64); the mask is bool or
// that dtype (its values are weights, as in reference.masked_mean).
inline void check_loss_inputs(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                              const at::Tensor* mask) {
  const auto dt = a.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": inputs must be float32 or float64, got ", dt);
  TORCH_CHECK(b.scalar_type() == dt && c.scalar_type() == dt, op, ": inputs must share one dtype");
  TORCH_CHECK(a.sizes() == b.sizes() && a.sizes() == c.sizes(), op, ": inputs must share one shape");
  TORCH_CHECK(a.device() == b.device() && a.device() == c.device(), op, ": inputs must share one device");
  if (mask) {
    TORCH_CHECK(mask->sizes() == a.sizes() && mask->device() == a.device(), op, ": mask must match the inputs");
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == dt, op,
                ": mask must be bool or the inputs' dtype, got ", mask->scalar_type());
  }
}

// Segment length and count for an aggregation over a tensor shaped like `x`.
inline std::pair<int64_t, int64_t> loss_segments(const char* op, int agg, const at::Tensor& x) {
  if (agg == kTokenMean) {
    const int64_t n = x.numel();
    return {kTokenMeanSegment, (n + kTokenMeanSegment - 1) / kTokenMeanSegment};
  }
  TORCH_CHECK(x.dim() == 2, op, ": the seq-mean aggregations need [B, T] inputs");
  return {x.size(1), x.size(0)};
}

}  // namespace rlhf_fast
