// The per-row loops of the log-prob kernels on the CPU, shared by logprobs_cpu.cpp and
// ppo_from_logits_cpu.cpp: one read of a row gives its softmax statistics (forward), one read and
// one write give d loss / d logits for per-row coefficients (backward). No [N, V] temporary: each row
// is converted to the math type chunk by chunk in a small stack buffer.
//
// The max is taken over the raw logits x and z - max formed as (x - max)·(1/T): the subtraction is
// exact near the max, so huge logits (|x| ~ 1e4) lose nothing to the temperature product, and the
// backward takes lse in two parts (shift, log_s) for the same reason.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_math.h"

namespace rlhf_fast {
// Internal linkage on purpose: target_clones functions get one resolver per translation unit.
namespace {

constexpr int64_t kRowChunk = 1024;

template <typename acc_t>
struct RowStats {
  acc_t m, log_s, entropy;  // lse = m·inv_t + log_s, m the max of the raw row
};

// Online statistics over one row: m (running max of x), s = Σ exp(w), t = Σ exp(w)·w with
// w = (x - m)·inv_t. When the max moves from m to m', s and t are rescaled by exp(d), d = (m - m')·inv_t
// (and t shifted by d·s). At the end log_s = log s and H = log s - t / s. A NaN logit makes log_s and H
// NaN: beside a finite max its exp is NaN; in a chunk whose max is -inf (or NaN) it is looked for.
template <typename scalar_t, typename acc_t>
RLHF_FAST_SIMD_CLONES RowStats<acc_t> row_stats(const scalar_t* x, int64_t V, acc_t inv_t) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t m = neg_inf, s = 0, t = 0;
  acc_t buf[kRowChunk];
  for (int64_t c0 = 0; c0 < V; c0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, V - c0);
    acc_t cmax = neg_inf;
#pragma omp simd reduction(max : cmax)
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = static_cast<acc_t>(x[c0 + i]);
      cmax = std::max(cmax, buf[i]);
    }
    if (!(cmax > neg_inf)) {  // all -inf (contributes nothing), or NaN that the max reduction dropped
      for (int64_t i = 0; i < n; ++i)
        if (std::isnan(buf[i])) return {buf[i], buf[i], buf[i]};  // a NaN logit: the whole row is NaN
      continue;
    }
    if (cmax > m) {
      if (m != neg_inf) {
        const acc_t d = (m - cmax) * inv_t, scale = exp_nonpos(d);
        t = scale * (t + d * s);
        s = scale * s;
      }
      m = cmax;
    }
    acc_t cs = 0, ct = 0;
#pragma omp simd reduction(+ : cs, ct)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t w = (buf[i] - m) * inv_t;
      const acc_t e = exp_nonpos(w);
      cs += e;
      ct += e * clamp_low(w);
    }
    s += cs;
    t += ct;
  }
  const acc_t log_s = std::log(s);
  return {m, log_s, log_s - t / s};
}

// One row of the backward: grad_x = a·(onehot - p) - b·p·(log p + H), with a = g_lp/T, b = g_ent/T and
// log p = (x - shift)·inv_t - log_s (shift = 0, log_s = lse for a one-part lse).
// `out` may be `row` itself (in-place backward): each entry is read before it is written.
template <typename scalar_t, typename acc_t>
RLHF_FAST_SIMD_CLONES void row_grad(const scalar_t* row, scalar_t* out, int64_t V, int64_t label, acc_t a, acc_t b,
                                    acc_t shift, acc_t log_s, acc_t h, acc_t inv_t) {
  const acc_t x_label = static_cast<acc_t>(row[label]);  // before an in-place loop overwrites it
  // chunked through a buffer of the math type so the exp loop vectorises whatever scalar_t is
  acc_t buf[kRowChunk], grad[kRowChunk];
  for (int64_t c0 = 0; c0 < V; c0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, V - c0);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = (static_cast<acc_t>(row[c0 + i]) - shift) * inv_t - log_s;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t w = buf[i];
      const acc_t p = exp_nonpos(w);
      grad[i] = -p * (a + b * (clamp_low(w) + h));
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[c0 + i] = static_cast<scalar_t>(grad[i]);
  }
  // the label's entry, recomputed so that half outputs are rounded once
  const acc_t w = (x_label - shift) * inv_t - log_s, p = exp_nonpos(w);
  out[label] = static_cast<scalar_t>(a * (1 - p) - b * p * (clamp_low(w) + h));
}

}  // namespace
}  // namespace rlhf_fast
