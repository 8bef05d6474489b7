// Small helpers shared by the C++ CPU kernels.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

// Hot row loops are compiled twice, for x86-64-v3 (AVX2, FMA) and the x86-64 baseline, picked at load
// time by CPU features (GCC function multiversioning; "arch=haswell" would test the CPU model and
// miss AMD): about 3x on the exp-bound loops, still portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RLHF_FAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RLHF_FAST_SIMD_CLONES
#endif

// always_inline: GCC does not inline these into the target_clones copies by itself, which would
// leave a call per element in the AVX2 loops.
#define RLHF_FAST_INLINE inline __attribute__((always_inline))

namespace rlhf_fast {

// exp(x) for x <= 0 in float, branch-free so `#pragma omp simd` loops vectorise (std::exp does not
// without -ffast-math, which would break -inf handling). Cody-Waite reduction + degree-7 polynomial:
// relative error ~1e-7. Inputs below -87 (and -inf) give exactly 0.
static RLHF_FAST_INLINE float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  // round to nearest by the 1.5·2^23 trick (vectorises on plain SSE2, unlike nearbyint)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // bit_cast, not memcpy: GCC does not vectorise loops containing the memcpy
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

static RLHF_FAST_INLINE double exp_nonpos(double x) { return std::exp(x); }

// The clamp used beside exp_nonpos so that p·(z - m) is 0, not nan, where z is -inf.
static RLHF_FAST_INLINE float clamp_low(float x) { return x < -87.0f ? -87.0f : x; }
static RLHF_FAST_INLINE double clamp_low(double x) { return x < -745.0 ? -745.0 : x; }

}  // namespace rlhf_fast
