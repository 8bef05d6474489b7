// Group advantages (GRPO, RLOO) for one group, shared verbatim by the CPU (advantages_cpu.cpp: one
// thread, lanes = 1) and CUDA (advantages_cuda.cu: one warp, lanes = 32, `sum2` a warp all-reduce)
// kernels. Mirrors rlhf_fast/reference.py: mean = Σs/n, y = s - mean, σ = sqrt(Σy²/(n-1)) (unbiased),
// GRPO out = y / (σ + eps), RLOO out = s - (Σs - s)/(n-1).
// Backward: centering and RLOO are symmetric linear maps (their own adjoints); GRPO with std, with
// D = σ + eps:  d s_j = (g_j - mean(g)) / D - y_j · Σ_i g_i·y_i / (D²·(n-1)·σ).
// For a constant group (σ = 0) the σ term is dropped, as torch's std backward does (it is 0 at σ = 0):
// the gradient is (g - mean(g)) / eps, as in the reference.
#pragma once
#include <cstdint>

#include "rl_losses_math.h"

namespace rlhf_fast {

RLHF_HD float m_sqrt(float x) { return sqrtf(x); }
RLHF_HD double m_sqrt(double x) { return sqrt(x); }

enum GroupMode : int { kCenter = 0, kGrpoFwd = 1, kGrpoBwd = 2, kRloo = 3 };

// One group of n at x (and g, the upstream gradient, for kGrpoBwd) -> out. This lane handles the
// elements lane, lane + lanes, ...; sum2(a, b) sums a and b over the lanes (every lane gets the sums).
template <typename T, typename Sum2>
RLHF_HD void group_advantages(const T* x, const T* g, T* out, int64_t n, int mode, T eps, int lane, int lanes,
                              Sum2 sum2) {
  const T nf = static_cast<T>(n);
  T sx = 0, sg = 0;
  for (int64_t i = lane; i < n; i += lanes) {
    sx += x[i];
    if (mode == kGrpoBwd) sg += g[i];
  }
  sum2(sx, sg);
  if (mode == kRloo) {
    for (int64_t i = lane; i < n; i += lanes) out[i] = x[i] - (sx - x[i]) / (nf - T(1));
    return;
  }
  const T mean = sx / nf;
  if (mode == kCenter) {
    for (int64_t i = lane; i < n; i += lanes) out[i] = x[i] - mean;
    return;
  }
  T yy = 0, gy = 0;
  for (int64_t i = lane; i < n; i += lanes) {
    const T y = x[i] - mean;
    yy += y * y;
    if (mode == kGrpoBwd) gy += g[i] * y;
  }
  sum2(yy, gy);
  const T sigma = m_sqrt(yy / (nf - T(1))), d = sigma + eps;
  if (mode == kGrpoFwd) {
    for (int64_t i = lane; i < n; i += lanes) out[i] = (x[i] - mean) / d;
    return;
  }
  const T g_mean = sg / nf;
  const T coef = sigma > T(0) ? gy / (d * d * (nf - T(1)) * sigma) : T(0);
  for (int64_t i = lane; i < n; i += lanes) out[i] = (g[i] - g_mean) / d - coef * (x[i] - mean);
}

// kl_penalized_rewards at one valid token: reward -β·kl and d reward / d logp = -β·d kl / d logp
// (the "+" estimators take k2's gradient; no clamp). d / d ref_logp is its negation.
template <typename T>
RLHF_HD void kl_reward_token(T logp, T ref_logp, T neg_beta, int est, bool plus, T& reward, T& grad) {
  T k, dk;
  kl_token<T>(logp, ref_logp, est, plus, false, T(0), k, dk);
  reward = neg_beta * k;
  grad = neg_beta * dk;
}

}  // namespace rlhf_fast
