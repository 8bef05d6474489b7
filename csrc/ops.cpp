// Schemas of every compiled rlhf_fast op (one place), and the Python module stub that loads them.
// Implementations register per dispatch key at the bottom of each source:
// TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) in *_cpu.cpp, TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) in *.cu.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rlhf_fast, m) {
  // logits [N, V] or [B, T, V] (any leading strides, unit stride over V: csrc/logits_layout.h), labels [N] int64
  // -> logp [N], entropy [N], lse [N] (fp32; fp64 for fp64 logits); ignored rows give 0, 0, 0, rows whose
  // label is out of range NaN (neither is read); a NaN logit makes its row NaN
  m.def("logprobs_fwd(Tensor logits, Tensor labels, float inv_temperature, int ignore_index) "
        "-> (Tensor, Tensor, Tensor)");
  // -> grad_logits in the logits dtype, shape and (non-overlapping) strides; 0 rows ignored, NaN rows out of range
  m.def("logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor lse, Tensor entropy, float inv_temperature, int ignore_index) -> Tensor");
  // the same gradient written into the logits buffer (its strides kept): no [N, V] allocation
  m.def("logprobs_bwd_(Tensor(a!) logits, Tensor grad_logp, Tensor? grad_entropy, Tensor labels, "
        "Tensor lse, Tensor entropy, float inv_temperature, int ignore_index) -> ()");
  // rewards, values [B, T] fp32/fp64, mask [B, T] bool -> advantages, returns [B, T]
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  // -> grad_rewards, grad_values [B, T]
  m.def("gae_bwd(Tensor grad_advantages, Tensor grad_returns, Tensor mask, float gamma, float lam) "
        "-> (Tensor, Tensor)");
  // Elementwise losses: float inputs of one shape and dtype (fp32/fp64), mask bool or that dtype
  // (weights). Each forward also returns d out / d input, so the backward is a scale.
  // estimator k1|k2|k3|abs with an optional "+" (k2's gradient) -> out, d out/d logp
  // (d out / d ref_logp = -d out / d logp)
  m.def("kl_fwd(Tensor logp, Tensor ref_logp, str estimator, float? clamp) -> (Tensor, Tensor)");
  // agg token-mean|seq-mean-token-sum|seq-mean-token-mean ([B, T] for the seq modes); loss_type 0 ppo, 1 gspo
  // (seq_log_ratio: each token's sequence log-ratio, required), 2 cispo (reference.policy_token_loss)
  // -> loss [], stats [clipfrac, approx_kl, dual_clipfrac], d loss/d logp, d loss/d advantages
  // (d loss / d old_logp = -d loss / d logp for ppo, 0 for gspo and cispo)
  m.def("ppo_policy_loss_fwd(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, float clip_low, "
        "float clip_high, float? dual_clip, str agg, int loss_type=0, Tensor? seq_log_ratio=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // -> loss [], stats [vf_clipfrac], d loss/d values, d loss/d old_values
  // (d loss / d returns = -(d loss/d values + d loss/d old_values))
  m.def("ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float? clip, "
        "str agg) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- group advantages and shaped rewards (advantages_cpu.cpp, advantages_cuda.cu) ----
  // scores [B] fp32/fp64 as [B / group_size, group_size] -> GRPO advantages [B]
  m.def("grpo_advantages_fwd(Tensor scores, int group_size, bool normalize_std, float eps) -> Tensor");
  // -> grad_scores [B] (scores are read only with normalize_std)
  m.def("grpo_advantages_bwd(Tensor grad, Tensor scores, int group_size, bool normalize_std, float eps) -> Tensor");
  // -> RLOO advantages [B]; a symmetric linear map, so it is also its own backward
  m.def("rloo_advantages_fwd(Tensor scores, int group_size) -> Tensor");
  // score [B], logp, ref_logp [B, T] of one dtype (fp32/fp64), mask [B, T] bool, estimator as kl_fwd
  // -> rewards [B, T], d rewards / d logp [B, T], last valid position per row [B] int64 (-1: none)
  m.def("kl_penalized_rewards_fwd(Tensor score, Tensor logp, Tensor ref_logp, Tensor mask, float beta, "
        "str estimator) -> (Tensor, Tensor, Tensor)");
  // (grad_rewards, d rewards / d logp, last) -> grad_score [B], grad_logp, grad_ref_logp [B, T]
  m.def("kl_penalized_rewards_bwd(Tensor grad_rewards, Tensor d_logp, Tensor last) -> (Tensor, Tensor, Tensor)");

  // ---- ppo_loss_from_logits (ppo_from_logits_*.cpp/.cu, ppo_from_logits_math.h) ----
  // logits [N, V] or [B, T, V] (any leading strides, unit stride over V), labels [N] int64 (-100: ignored;
  // out of range: a NaN row, not read), old_logp,
  // advantages, ref_logp (N elements, [B, T] for the seq-mean aggs) of one dtype fp32/fp64, mask bool or
  // that dtype -> loss [], stats [pg_loss, clipfrac, approx_kl, dual_clipfrac, entropy, kl], saved [N, 8]
  // (per-token coefficients of the backward and d loss / d old_logp, advantages, ref_logp in cols 5-7)
  m.def("ppo_from_logits_fwd(Tensor logits, Tensor labels, Tensor old_logp, Tensor advantages, Tensor mask, "
        "Tensor? ref_logp, float kl_coef, str kl_estimator, float entropy_coef, float inv_temperature, "
        "float clip_low, float clip_high, float? dual_clip, str agg) -> (Tensor, Tensor, Tensor)");
  // grad_loss [] (saved's dtype) -> grad_logits in the logits dtype, shape and (non-overlapping) strides
  m.def("ppo_from_logits_bwd(Tensor grad_loss, Tensor logits, Tensor labels, Tensor saved, "
        "float inv_temperature) -> Tensor");
}

// `import rlhf_fast._C` loads this library (running the registrations above); the module is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
