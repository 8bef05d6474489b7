// Group advantages (GRPO, RLOO) and KL-penalised token rewards on the CPU.
// Groups: one group per iteration (groups in parallel), math in advantages_math.h (shared with CUDA).
// Shaped rewards: one backward pass per row, so the first valid position met is the last one; the
// forward also writes d reward / d logp, the backward is a scale plus a gather of d score.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "advantages_math.h"

namespace rlhf_fast {
namespace {

struct NoSum2 {  // one lane: its sums are the group's
  template <typename T>
  void operator()(T&, T&) const {}
};

void check_groups(const char* op, const at::Tensor& x, int64_t n) {
  TORCH_CHECK(x.dim() == 1, op, ": scores must be 1-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": scores must be float32 or float64");
  TORCH_CHECK(n >= 1 && x.size(0) % n == 0, op, ": group_size must be >= 1 and divide len(scores)");
}

at::Tensor run_groups(const at::Tensor& x_in, const at::Tensor* g_in, int64_t n, int mode, double eps) {
  const at::Tensor x = x_in.contiguous(), g = g_in ? g_in->contiguous() : x;
  at::Tensor out = at::empty_like(x);
  const int64_t G = x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_advantages_cpu", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, G, std::max<int64_t>(1, 16384 / n), [&](int64_t g0, int64_t g1) {
      for (int64_t k = g0; k < g1; ++k)
        group_advantages<scalar_t>(px + k * n, pg + k * n, po + k * n, n, mode, e, 0, 1, NoSum2{});
    });
  });
  return out;
}

at::Tensor grpo_fwd_cpu(const at::Tensor& scores, int64_t group_size, bool normalize_std, double eps) {
  check_groups("grpo_advantages", scores, group_size);
  return run_groups(scores, nullptr, group_size, normalize_std ? kGrpoFwd : kCenter, eps);
}

at::Tensor grpo_bwd_cpu(const at::Tensor& grad, const at::Tensor& scores, int64_t group_size, bool normalize_std,
                        double eps) {
  check_groups("grpo_advantages", scores, group_size);
  TORCH_CHECK(grad.sizes() == scores.sizes() && grad.scalar_type() == scores.scalar_type(),
              "grpo_advantages: grad must match scores");
  if (!normalize_std) return run_groups(grad, nullptr, group_size, kCenter, eps);  // self-adjoint
  return run_groups(scores, &grad, group_size, kGrpoBwd, eps);
}

at::Tensor rloo_fwd_cpu(const at::Tensor& scores, int64_t group_size) {
  check_groups("rloo_advantages", scores, group_size);
  return run_groups(scores, nullptr, group_size, kRloo, 0.0);
}

void check_rewards_inputs(const at::Tensor& score, const at::Tensor& logp, const at::Tensor& ref_logp,
                          const at::Tensor& mask) {
  check_loss_inputs("kl_penalized_rewards", logp, ref_logp, ref_logp, &mask);
  TORCH_CHECK(logp.dim() == 2, "kl_penalized_rewards: logp must be [B, T]");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "kl_penalized_rewards: mask must be bool");
  TORCH_CHECK(score.dim() == 1 && score.size(0) == logp.size(0) && score.scalar_type() == logp.scalar_type() &&
                  score.device() == logp.device(),
              "kl_penalized_rewards: score must be [B] of the logp dtype and device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_rewards_fwd_cpu(const at::Tensor& score, const at::Tensor& logp,
                                                                  const at::Tensor& ref_logp, const at::Tensor& mask,
                                                                  double beta, c10::string_view estimator) {
  check_rewards_inputs(score, logp, ref_logp, mask);
  const KlConfig cfg = parse_kl(estimator, std::nullopt);
  const at::Tensor sc = score.contiguous(), lp = logp.contiguous(), rf = ref_logp.contiguous(), m = mask.contiguous();
  at::Tensor out = at::empty_like(lp), grad = at::empty_like(lp);
  at::Tensor last = at::empty({lp.size(0)}, lp.options().dtype(at::kLong));
  const int64_t B = lp.size(0), T = lp.size(1);
  AT_DISPATCH_FLOATING_TYPES(lp.scalar_type(), "kl_penalized_rewards_fwd_cpu", [&] {
    const scalar_t *ps = sc.data_ptr<scalar_t>(), *pl = lp.data_ptr<scalar_t>(), *pr = rf.data_ptr<scalar_t>();
    const bool* pm = m.data_ptr<bool>();
    scalar_t *po = out.data_ptr<scalar_t>(), *pg = grad.data_ptr<scalar_t>();
    int64_t* plast = last.data_ptr<int64_t>();
    const scalar_t nb = static_cast<scalar_t>(-beta);
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T;
        int64_t l = -1;
        for (int64_t t = T - 1; t >= 0; --t) {
          if (!pm[o + t]) {
            po[o + t] = pg[o + t] = 0;
            continue;
          }
          scalar_t r, d;
          kl_reward_token<scalar_t>(pl[o + t], pr[o + t], nb, cfg.estimator, cfg.plus, r, d);
          if (l < 0) l = t, r = r + ps[b];
          po[o + t] = r;
          pg[o + t] = d;
        }
        plast[b] = l;
      }
    });
  });
  return {out, grad, last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_rewards_bwd_cpu(const at::Tensor& grad_rewards,
                                                                  const at::Tensor& d_logp, const at::Tensor& last) {
  TORCH_CHECK(grad_rewards.dim() == 2 && grad_rewards.sizes() == d_logp.sizes() &&
                  grad_rewards.scalar_type() == d_logp.scalar_type(),
              "kl_penalized_rewards: grad_rewards must match d_logp");
  TORCH_CHECK(last.dim() == 1 && last.size(0) == d_logp.size(0) && last.scalar_type() == at::kLong,
              "kl_penalized_rewards: last must be [B] int64");
  const at::Tensor g = grad_rewards.contiguous(), d = d_logp.contiguous(), l = last.contiguous();
  const int64_t B = d.size(0), T = d.size(1);
  at::Tensor g_lp = at::empty_like(d), g_ref = at::empty_like(d), g_score = at::empty({B}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "kl_penalized_rewards_bwd_cpu", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *pd = d.data_ptr<scalar_t>();
    const int64_t* pl = l.data_ptr<int64_t>();
    scalar_t *plp = g_lp.data_ptr<scalar_t>(), *pref = g_ref.data_ptr<scalar_t>(), *ps = g_score.data_ptr<scalar_t>();
    at::parallel_for(0, B * T, 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t v = pg[i] * pd[i];
        plp[i] = v;
        pref[i] = -v;
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pl[b] < T, "kl_penalized_rewards: last position out of range");
      ps[b] = pl[b] >= 0 ? pg[b * T + pl[b]] : scalar_t(0);
    }
  });
  return {g_score, g_lp, g_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("grpo_advantages_fwd", &grpo_fwd_cpu);
  m.impl("grpo_advantages_bwd", &grpo_bwd_cpu);
  m.impl("rloo_advantages_fwd", &rloo_fwd_cpu);
  m.impl("kl_penalized_rewards_fwd", &kl_rewards_fwd_cpu);
  m.impl("kl_penalized_rewards_bwd", &kl_rewards_bwd_cpu);
}

}  // namespace rlhf_fast
