// logprobs on CUDA, the math of logprobs_cpu.cpp. Forward: one block per row (grid-stride over rows,
// 1-D grid), one read of the row with 128-bit loads (8 bf16/fp16, 4 fp32, 2 fp64 per thread), each
// thread keeping an online (max m, s = Σ e^{z-m}, t = Σ e^{z-m}(z-m)) triple, merged by warp shuffles
// and then across warps through shared memory in a fixed order (deterministic). Backward: one read and
// one write per element, p recomputed from the saved logsumexp; optionally into the logits buffer.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace rlhf_fast {
namespace {

constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // rows past it are covered by the grid-stride loop
constexpr unsigned kFull = 0xffffffffu;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// VEC elements in one 16-byte load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
// As cpu_math.h: keeps p·(z - m) at 0, not nan, where z is -inf (p is 0 there).
__device__ __forceinline__ float clamp_low(float x) { return x < -87.0f ? -87.0f : x; }
__device__ __forceinline__ double clamp_low(double x) { return x < -745.0 ? -745.0 : x; }

template <typename acc_t>
struct Triple {
  acc_t m, s, t;  // running max, Σ e^{z-m}, Σ e^{z-m}·(z-m); m = -inf: nothing seen yet (s = t = 0)
};

template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> empty_triple() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
}

// Moves the reference point to m_new >= st.m (finite): s·e^{d}, (t + d·s)·e^{d} with d = m - m_new.
template <typename acc_t>
__device__ __forceinline__ void rebase(Triple<acc_t>& st, acc_t m_new) {
  if (st.m != -std::numeric_limits<acc_t>::infinity()) {
    const acc_t d = st.m - m_new, e = d_exp(d);
    st.t = e * (st.t + d * st.s);
    st.s = e * st.s;
  }
  st.m = m_new;
}

// Adds n values z (n = VEC, or 1 for the head and tail): one rebase per group, as the CPU does per chunk.
template <typename acc_t, int N>
__device__ __forceinline__ void accumulate(Triple<acc_t>& st, const acc_t (&z)[N]) {
  acc_t zmax = z[0];
#pragma unroll
  for (int k = 1; k < N; ++k) zmax = max(zmax, z[k]);
  if (zmax == -std::numeric_limits<acc_t>::infinity()) return;  // all -inf: contributes nothing
  if (zmax > st.m) rebase(st, zmax);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const acc_t w = z[k] - st.m, e = d_exp(w);
    st.s += e;
    st.t += e * clamp_low(w);
  }
}

// (m1,s1,t1) ⊕ (m2,s2,t2) = (m, s1·e^{m1-m} + s2·e^{m2-m}, Σ e^{mi-m}·(ti + (mi-m)·si)); an empty side
// (m = -inf) adds nothing, so there is no inf - inf.
template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> merge(const Triple<acc_t>& a, const Triple<acc_t>& b) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t m = max(a.m, b.m);
  if (m == kNegInf) return a;
  Triple<acc_t> r{m, acc_t(0), acc_t(0)};
  if (a.m != kNegInf) {
    const acc_t d = a.m - m, e = d_exp(d);
    r.s += e * a.s;
    r.t += e * (a.t + d * a.s);
  }
  if (b.m != kNegInf) {
    const acc_t d = b.m - m, e = d_exp(d);
    r.s += e * b.s;
    r.t += e * (b.t + d * b.s);
  }
  return r;
}

template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> warp_merge(Triple<acc_t> st) {
  for (int off = 16; off > 0; off >>= 1) {
    const Triple<acc_t> o{__shfl_down_sync(kFull, st.m, off), __shfl_down_sync(kFull, st.s, off),
                          __shfl_down_sync(kFull, st.t, off)};
    st = merge(st, o);  // lanes >= 32 - off merge garbage; only lane 0's result is used
  }
  return st;
}

// The block's triple, valid in thread 0; ends with a barrier so the shared arrays can be reused.
template <typename acc_t>
__device__ __forceinline__ Triple<acc_t> block_merge(Triple<acc_t> st, acc_t* sm, acc_t* ss, acc_t* stt) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  st = warp_merge(st);
  if (lane == 0) sm[warp] = st.m, ss[warp] = st.s, stt[warp] = st.t;
  __syncthreads();
  if (warp == 0) {
    st = lane < n_warps ? Triple<acc_t>{sm[lane], ss[lane], stt[lane]} : empty_triple<acc_t>();
    st = warp_merge(st);
  }
  __syncthreads();
  return st;
}

// Elements before the first 16-byte boundary of a row (vector loads start there).
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* p, int64_t V) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15) / static_cast<int64_t>(sizeof(T));
  return min(V, mis ? static_cast<int64_t>(16 / sizeof(T)) - mis : int64_t(0));
}

template <typename scalar_t>
__global__ void logprobs_fwd_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                    acc_type<scalar_t>* __restrict__ logp, acc_type<scalar_t>* __restrict__ entropy,
                                    acc_type<scalar_t>* __restrict__ lse, int64_t N, int64_t V, int64_t row_stride,
                                    acc_type<scalar_t> inv_t, int64_t ignore_index) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  __shared__ acc_t sm[32], ss[32], stt[32];
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const int64_t label = labels[r];
    if (label == ignore_index) {  // uniform over the block: no barrier is skipped by part of it
      if (threadIdx.x == 0) logp[r] = entropy[r] = lse[r] = acc_t(0);
      continue;
    }
    const scalar_t* row = x + r * row_stride;
    Triple<acc_t> st = empty_triple<acc_t>();
    const int64_t head = head_len(row, V), n_vec = (V - head) / VEC, tail = head + n_vec * VEC;
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
      const acc_t z[1] = {static_cast<acc_t>(row[i]) * inv_t};
      accumulate(st, z);
    }
    const Pack<scalar_t, VEC>* vrow = reinterpret_cast<const Pack<scalar_t, VEC>*>(row + head);
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
      const Pack<scalar_t, VEC> p = vrow[j];
      acc_t z[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = static_cast<acc_t>(p.v[k]) * inv_t;
      accumulate(st, z);
    }
    for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x) {
      const acc_t z[1] = {static_cast<acc_t>(row[i]) * inv_t};
      accumulate(st, z);
    }
    st = block_merge(st, sm, ss, stt);
    if (threadIdx.x == 0) {
      const acc_t log_s = d_log(st.s), l = st.m + log_s;
      logp[r] = static_cast<acc_t>(row[label]) * inv_t - l;
      entropy[r] = log_s - st.t / st.s;
      lse[r] = l;
    }
  }
}

// grad_x = a·(onehot - p) - b·p·(z - lse + H) with a = g_lp/T, b = g_ent/T (as row_grad in logprobs_cpu.cpp).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_entry(acc_t x, bool is_label, acc_t a, acc_t b, acc_t lse, acc_t h,
                                            acc_t inv_t) {
  const acc_t w = x * inv_t - lse, p = d_exp(w);
  const acc_t ent_term = b * p * (clamp_low(w) + h);
  return is_label ? a * (acc_t(1) - p) - ent_term : -a * p - ent_term;
}

// `out` may alias `x` (in-place backward): every element is read before it is written, by one thread.
template <typename scalar_t>
__global__ void logprobs_bwd_kernel(const scalar_t* x, int64_t x_stride, scalar_t* out, int64_t out_stride,
                                    const int64_t* __restrict__ labels, const acc_type<scalar_t>* __restrict__ g_lp,
                                    const acc_type<scalar_t>* __restrict__ g_ent,
                                    const acc_type<scalar_t>* __restrict__ lse,
                                    const acc_type<scalar_t>* __restrict__ entropy, int64_t N, int64_t V,
                                    acc_type<scalar_t> inv_t, int64_t ignore_index) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, VEC>;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const scalar_t* row = x + r * x_stride;
    scalar_t* orow = out + r * out_stride;
    const int64_t label = labels[r];
    // vector loads and stores need x and out to share their offset from a 16-byte boundary
    const bool same_phase = ((reinterpret_cast<uintptr_t>(row) ^ reinterpret_cast<uintptr_t>(orow)) & 15) == 0;
    const int64_t head = same_phase ? head_len(row, V) : V;
    const int64_t n_vec = (V - head) / VEC, tail = head + n_vec * VEC;
    if (label == ignore_index) {
      for (int64_t i = threadIdx.x; i < head; i += blockDim.x) orow[i] = scalar_t(0);
      P zero;
#pragma unroll
      for (int k = 0; k < VEC; ++k) zero.v[k] = scalar_t(0);
      for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) reinterpret_cast<P*>(orow + head)[j] = zero;
      for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x) orow[i] = scalar_t(0);
      continue;
    }
    const acc_t a = g_lp[r] * inv_t, b = (g_ent ? g_ent[r] : acc_t(0)) * inv_t, l = lse[r], h = entropy[r];
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x)
      orow[i] = static_cast<scalar_t>(grad_entry(static_cast<acc_t>(row[i]), i == label, a, b, l, h, inv_t));
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
      const P p = reinterpret_cast<const P*>(row + head)[j];
      P q;
      const int64_t i0 = head + j * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        q.v[k] = static_cast<scalar_t>(grad_entry(static_cast<acc_t>(p.v[k]), i0 + k == label, a, b, l, h, inv_t));
      reinterpret_cast<P*>(orow + head)[j] = q;
    }
    for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x)
      orow[i] = static_cast<scalar_t>(grad_entry(static_cast<acc_t>(row[i]), i == label, a, b, l, h, inv_t));
  }
}

// Threads per row: enough 16-byte loads in flight for long rows, few idle threads for short ones.
int threads_for(int64_t V) { return V >= 32768 ? 512 : (V >= 4096 ? 256 : 128); }
unsigned blocks_for(int64_t N) { return static_cast<unsigned>(std::min(N, kMaxBlocks)); }

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda() && labels.device() == logits.device(), "logprobs: expected CUDA tensors on one device");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [N, V] with unit column stride");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong,
              "labels must be int64 [N]");
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) > 0, "logits must have V >= 1");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                                  double inv_temperature, int64_t ignore_index) {
  check_logits_labels(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(out_dtype);
  at::Tensor logp = at::empty({N}, opts), entropy = at::empty({N}, opts), lse = at::empty({N}, opts);
  if (N == 0) return {logp, entropy, lse};
  const at::Tensor lab = labels.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    logprobs_fwd_kernel<scalar_t><<<blocks_for(N), threads_for(V), 0, stream>>>(
        logits.data_ptr<scalar_t>(), lab.data_ptr<int64_t>(), logp.data_ptr<acc_t>(), entropy.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), N, V, row_stride, static_cast<acc_t>(inv_temperature), ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logp, entropy, lse};
}

// Writes the gradient into `grad` (any row stride, unit column stride; may be `logits` itself).
void logprobs_bwd_into_cuda(const at::Tensor& grad, const at::Tensor& grad_logp,
                            const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                            const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                            double inv_temperature, int64_t ignore_index) {
  check_logits_labels(logits, labels);
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return;
  const at::Tensor lab = labels.contiguous(), glp = grad_logp.contiguous(), ls = lse.contiguous(),
                   ent = entropy.contiguous();
  const bool has_gent = grad_entropy.has_value() && grad_entropy->defined();
  const at::Tensor gent = has_gent ? grad_entropy->contiguous() : at::Tensor();
  for (const at::Tensor* t : {&glp, &ls, &ent})
    TORCH_CHECK(t->device() == logits.device() && t->dim() == 1 && t->size(0) == N, "logprobs_bwd: expected [N] tensors on ",
                logits.device());
  TORCH_CHECK(!has_gent || (gent.device() == logits.device() && gent.numel() == N), "grad_entropy must be [N]");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_bwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr auto acc_st = c10::CppTypeToScalarType<acc_t>::value;
    TORCH_CHECK(glp.scalar_type() == acc_st && ls.scalar_type() == acc_st && ent.scalar_type() == acc_st &&
                    (!has_gent || gent.scalar_type() == acc_st),
                "grad_logp, grad_entropy, lse, entropy must be ", acc_st, " for ", logits.scalar_type(), " logits");
    logprobs_bwd_kernel<scalar_t><<<blocks_for(N), threads_for(V), 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), grad.data_ptr<scalar_t>(), grad.stride(0),
        lab.data_ptr<int64_t>(), glp.data_ptr<acc_t>(), has_gent ? gent.data_ptr<acc_t>() : nullptr,
        ls.data_ptr<acc_t>(), ent.data_ptr<acc_t>(), N, V, static_cast<acc_t>(inv_temperature), ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                             const at::Tensor& entropy, double inv_temperature, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, V]");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  logprobs_bwd_into_cuda(grad, grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index);
  return grad;
}

void logprobs_bwd_inplace_cuda(const at::Tensor& logits, const at::Tensor& grad_logp,
                               const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels,
                               const at::Tensor& lse, const at::Tensor& entropy, double inv_temperature,
                               int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  logprobs_bwd_into_cuda(logits, grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &logprobs_bwd_cuda);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cuda);
}

}  // namespace rlhf_fast
