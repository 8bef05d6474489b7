// Schemas of every compiled rlhf_fast op (one place), and the Python module stub that loads them.
// Implementations register per dispatch key at the bottom of each source:
// TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) in *_cpu.cpp, TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) in *.cu.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rlhf_fast, m) {
  // logits [N, V] (row stride free, unit column stride), labels [N] int64
  // -> logp [N], entropy [N], lse [N] (fp32; fp64 for fp64 logits); ignored rows give 0, 0, 0
  m.def("logprobs_fwd(Tensor logits, Tensor labels, float inv_temperature, int ignore_index) "
        "-> (Tensor, Tensor, Tensor)");
  // -> grad_logits [N, V] in the logits dtype
  m.def("logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor lse, Tensor entropy, float inv_temperature, int ignore_index) -> Tensor");
  // rewards, values [B, T] fp32/fp64, mask [B, T] bool -> advantages, returns [B, T]
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  // -> grad_rewards, grad_values [B, T]
  m.def("gae_bwd(Tensor grad_advantages, Tensor grad_returns, Tensor mask, float gamma, float lam) "
        "-> (Tensor, Tensor)");
}

// `import rlhf_fast._C` loads this library (running the registrations above); the module is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
