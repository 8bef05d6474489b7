// How the logits kernels (CPU and CUDA) see their input, host side: logits [N, V] or [B, T, V] with any
// strides over the leading dims and unit stride over V, row r at (r / T)·s0 + (r % T)·s1, so a time
// slice logits[:, :-1] is read where it lies (Python twin: rlhf_fast/_layout.py). Gradients take the
// logits' own strides when those do not overlap (grad_like), so input and gradient rows share their
// 16-byte phase; the fake impls in rlhf_fast/_compiled.py allocate the same.
//
// Labels: one per row; a label that is neither ignore_index nor in [0, V) (no host check ran) makes
// its row NaN and the row is never read (label_in_row).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#define RLHF_FAST_HD __host__ __device__ __forceinline__
#else
#define RLHF_FAST_HD inline
#endif

namespace rlhf_fast {

struct RowLayout {
  int64_t N, T, V, s0, s1;
  RLHF_FAST_HD int64_t offset(int64_t r) const { return (r / T) * s0 + (r % T) * s1; }
};

RLHF_FAST_HD bool label_in_row(int64_t label, int64_t V) { return label >= 0 && label < V; }

// The layout of `x` ([N, V] is [1, N, V]); checks the unit stride over V.
inline RowLayout row_layout(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, what, " must be [N, V] or [B, T, V], got ", x.dim(), " dims");
  const int64_t V = x.size(-1);
  TORCH_CHECK(V <= 1 || x.numel() == 0 || x.stride(-1) == 1, what, " must have unit stride over V");
  if (x.dim() == 2) return {x.size(0), std::max<int64_t>(x.size(0), 1), V, 0, x.stride(0)};
  return {x.size(0) * x.size(1), std::max<int64_t>(x.size(1), 1), V, x.stride(0), x.stride(1)};
}

// True when no two elements of x share memory (gaps allowed), as rlhf_fast._layout.non_overlapping.
inline bool non_overlapping(const at::Tensor& x) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) > 1) dims.emplace_back(x.stride(d), x.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;
  for (const auto& [stride, size] : dims) {
    if (stride < extent) return false;
    extent += (size - 1) * stride;
  }
  return true;
}

// Uninitialised gradient for logits x: x's strides when they do not overlap, else contiguous.
inline at::Tensor grad_like(const at::Tensor& x) {
  return non_overlapping(x) ? at::empty_strided(x.sizes(), x.strides(), x.options()) : at::empty(x.sizes(), x.options());
}

}  // namespace rlhf_fast
