// The CUDA logits-row kernels' per-thread code (csrc/row_math.cuh) run on the CPU, thread by thread, with the
// kernels' merge order (logprobs_row_cuda.cuh: a shuffle tree per warp, then the same tree over the warps), so
// tests/test_cuda_row_emulation.py checks that code against the float64 reference without a GPU. What it
// cannot see: ex2.approx itself (the host takes exp2, or with -DEMULATE_EX2_APPROX exp2 with its error bound and
// flush to zero), the ld.global.nc asm (memcpy here) and scheduling.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Built with -DEMULATE_EX2_APPROX: the kernels' 2^u gets what ex2.approx.ftz.f32 may do on a GPU — a relative error
// (here +-2^-21, the sign from the argument's bits, so deterministic) and results below 2^-126 flushed to 0.
#if defined(EMULATE_EX2_APPROX)
inline float ex2_approx_ftz(float x) {
  float y = std::exp2(x);
  if (!(y >= 0x1p-126f)) return y != y ? y : 0.0f;  // NaN stays NaN; subnormal and 0 results flush to 0
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return y * ((u * 2654435761u) >> 31 ? 1.0f + 0x1p-21f : 1.0f - 0x1p-21f);
}
#define RLHF_FAST_HOST_EX2 ex2_approx_ftz
#endif

#include "row_math.cuh"

namespace {
using namespace rlhf_fast::row;

// bfloat16 as the kernels see it: 16 bits, upcast exactly, rounded to nearest even on the way down.
struct bf16 {
  uint16_t bits;
  bf16() = default;
  bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(bf16) == 2);

template <typename acc_t>
Triple<acc_t> tree32(std::vector<Triple<acc_t>> lanes, acc_t c) {  // lane 0 of warp_merge
  lanes.resize(32, empty_triple<acc_t>());
  for (int off = 16; off > 0; off >>= 1)
    for (int i = 0; i + off < 32; ++i) lanes[i] = merge(lanes[i], lanes[i + off], c);
  return lanes[0];
}

template <typename scalar_t>
void fwd(const void* row_v, int64_t V, int64_t label, int nthreads, double inv_t_d, double* out) {
  using acc_t = acc_type<scalar_t>;
  const auto* row = static_cast<const scalar_t*>(row_v);
  const acc_t inv_t = static_cast<acc_t>(inv_t_d), c = inv_t * acc_t(kLog2e);
  const int split = row_split<scalar_t>(V, nthreads);
  std::vector<Triple<acc_t>> parts;  // one block per span of the row
  for (int k = 0; k < split; ++k) {
    std::vector<Triple<acc_t>> warps;
    for (int w = 0; w < nthreads / 32; ++w) {
      std::vector<Triple<acc_t>> lanes;
      for (int l = 0; l < 32; ++l) lanes.push_back(thread_row_triple(row, V, c, k, split, w * 32 + l, nthreads));
      warps.push_back(tree32(lanes, c));
    }
    parts.push_back(tree32(warps, c));
  }
  Triple<acc_t> st = parts[0];  // split_merge: the spans in the order k = 0, 1, ..
  for (int k = 1; k < split; ++k) st = merge(st, parts[k], c);
  const RowOut<acc_t> o = row_outputs(st, static_cast<acc_t>(row[label]), inv_t);
  out[0] = o.logp, out[1] = o.entropy, out[2] = o.lse(inv_t), out[3] = o.m, out[4] = o.log_s;
}

template <typename scalar_t>
void bwd(int two_part, const void* row, void* orow, int64_t V, int64_t label, int ignored, int nthreads, double a,
         double b, double shift, double log_s, double h, double inv_t) {
  using acc_t = acc_type<scalar_t>;
  const GradRow<acc_t> g = grad_row<acc_t>(acc_t(a), acc_t(b), acc_t(shift), acc_t(log_s), acc_t(h), acc_t(inv_t));
  const int split = row_split<scalar_t>(V, nthreads);
  for (int k = 0; k < split; ++k)  // each thread touches only its own elements: any order is the GPU's
    for (int tid = 0; tid < nthreads; ++tid) {
      if (two_part)
        thread_row_grad<true>(static_cast<const scalar_t*>(row), static_cast<scalar_t*>(orow), V, label, ignored != 0,
                              g, acc_t(a), k, split, tid, nthreads);
      else
        thread_row_grad<false>(static_cast<const scalar_t*>(row), static_cast<scalar_t*>(orow), V, label,
                               ignored != 0, g, acc_t(a), k, split, tid, nthreads);
    }
}
}  // namespace

// dtype: 0 float32, 1 float64, 2 bfloat16. out: logp, entropy, lse, m, log_s.
extern "C" void rf_emu_fwd(int dtype, const void* row, int64_t V, int64_t label, int nthreads, double inv_t,
                           double* out) {
  if (dtype == 0) fwd<float>(row, V, label, nthreads, inv_t, out);
  if (dtype == 1) fwd<double>(row, V, label, nthreads, inv_t, out);
  if (dtype == 2) fwd<bf16>(row, V, label, nthreads, inv_t, out);
}

extern "C" void rf_emu_bwd(int dtype, int two_part, const void* row, void* orow, int64_t V, int64_t label, int ignored,
                           int nthreads, double a, double b, double shift, double log_s, double h, double inv_t) {
  if (dtype == 0) bwd<float>(two_part, row, orow, V, label, ignored, nthreads, a, b, shift, log_s, h, inv_t);
  if (dtype == 1) bwd<double>(two_part, row, orow, V, label, ignored, nthreads, a, b, shift, log_s, h, inv_t);
  if (dtype == 2) bwd<bf16>(two_part, row, orow, V, label, ignored, nthreads, a, b, shift, log_s, h, inv_t);
}

// Blocks a row of V logits is split over at `nthreads` threads per block (as the kernels launch).
extern "C" int rf_emu_split(int dtype, int64_t V, int nthreads) {
  if (dtype == 0) return row_split<float>(V, nthreads);
  if (dtype == 1) return row_split<double>(V, nthreads);
  return row_split<bf16>(V, nthreads);
}
