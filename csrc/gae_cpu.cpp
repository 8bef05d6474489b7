// GAE on the CPU: one reverse pass per row (rows in parallel), masked positions skipped.
// The backward is the adjoint recursion, one forward pass per row.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

namespace rlhf_fast {
namespace {

void check_gae_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask) {
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes() && a.sizes() == mask.sizes(), "gae: expected [B, T] inputs of one shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "gae: inputs must share a dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae: mask must be bool");
}

// A_t = δ_t + γλ·A_next, δ_t = r_t + γ·V_next - V_t over valid t; masked t: A = R = 0, carry kept.
std::tuple<at::Tensor, at::Tensor> gae_fwd_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, double gamma, double lam) {
  check_gae_inputs(rewards, values, mask);
  const at::Tensor r = rewards.contiguous(), v = values.contiguous(), m = mask.contiguous();
  at::Tensor adv = at::empty_like(r), ret = at::empty_like(r);
  const int64_t B = r.size(0), T = r.size(1);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "gae_fwd_cpu", [&] {
    const scalar_t *pr = r.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>();
    const bool* pm = m.data_ptr<bool>();
    scalar_t *pa = adv.data_ptr<scalar_t>(), *pt = ret.data_ptr<scalar_t>();
    const scalar_t g = gamma, gl = gamma * lam;
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T;
        scalar_t next_v = 0, running = 0;
        for (int64_t t = T - 1; t >= 0; --t) {
          if (!pm[o + t]) {
            pa[o + t] = pt[o + t] = 0;
            continue;
          }
          running = pr[o + t] + g * next_v - pv[o + t] + gl * running;
          next_v = pv[o + t];
          pa[o + t] = running;
          pt[o + t] = running + next_v;
        }
      }
    });
  });
  return {adv, ret};
}

// Adjoint over valid t in increasing order: u_t = gA_t + gR_t + γλ·u_prev; dr_t = u_t,
// dV_t = -u_t + gR_t + γ·u_prev (V_t enters the previous valid δ as γ·V_next).
std::tuple<at::Tensor, at::Tensor> gae_bwd_cpu(const at::Tensor& grad_adv, const at::Tensor& grad_ret,
                                               const at::Tensor& mask, double gamma, double lam) {
  check_gae_inputs(grad_adv, grad_ret, mask);
  const at::Tensor ga = grad_adv.contiguous(), gr = grad_ret.contiguous(), m = mask.contiguous();
  at::Tensor d_rew = at::empty_like(ga), d_val = at::empty_like(ga);
  const int64_t B = ga.size(0), T = ga.size(1);
  AT_DISPATCH_FLOATING_TYPES(ga.scalar_type(), "gae_bwd_cpu", [&] {
    const scalar_t *pga = ga.data_ptr<scalar_t>(), *pgr = gr.data_ptr<scalar_t>();
    const bool* pm = m.data_ptr<bool>();
    scalar_t *pdr = d_rew.data_ptr<scalar_t>(), *pdv = d_val.data_ptr<scalar_t>();
    const scalar_t g = gamma, gl = gamma * lam;
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T;
        scalar_t u_prev = 0;
        for (int64_t t = 0; t < T; ++t) {
          if (!pm[o + t]) {
            pdr[o + t] = pdv[o + t] = 0;
            continue;
          }
          const scalar_t u = pga[o + t] + pgr[o + t] + gl * u_prev;
          pdr[o + t] = u;
          pdv[o + t] = -u + pgr[o + t] + g * u_prev;
          u_prev = u;
        }
      }
    });
  });
  return {d_rew, d_val};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("gae_fwd", &gae_fwd_cpu);
  m.impl("gae_bwd", &gae_bwd_cpu);
}

}  // namespace rlhf_fast
