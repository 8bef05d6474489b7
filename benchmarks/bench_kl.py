"""kl: per-token k3 estimate of KL(π‖π_ref) from sampled-token log-probs [B, T], fwd + bwd.

Byte model (b bytes per element, n = B·T; ref_logp needs no gradient):
  fwd   read logp, ref_logp, write kl                                       3·n·b
  bwd   read grad_out, logp, ref_logp, write grad logp                      4·n·b
  full  fused floor: read logp, ref_logp, grad_out, write kl and grad logp  5·n·b
"""
import torch

from benchmarks.harness import Bench, compile_peer


def make_inputs(s, dtype, device):
    shape = (s["B"], s["T"])
    logp = (-torch.rand(shape, device=device) * 5).to(dtype).requires_grad_()
    ref_logp = (logp.detach().float() + 0.1 * torch.randn(shape, device=device)).to(dtype)
    return {"logp": logp, "ref_logp": ref_logp}


def bytes_model(s, dtype):
    nb = s["B"] * s["T"] * (torch.finfo(dtype).bits // 8)
    return {"fwd": 3 * nb, "bwd": 4 * nb, "full": 5 * nb}


BENCHES = [Bench(
    op="kl",
    sizes={"tiny": [dict(B=8, T=64)],
           "cpu": [dict(B=64, T=4096), dict(B=256, T=8192)],
           "gpu": [dict(B=256, T=8192), dict(B=1024, T=16384)]},
    dtypes={"cpu": ["float32"], "cuda": ["float32"]},
    make_inputs=make_inputs,
    args=lambda i: (i["logp"], i["ref_logp"], "k3", None),
    size=lambda s: s["B"] * s["T"], size_label="B·T (tokens)",
    grad_inputs=("logp",),
    bytes_model=bytes_model,
    peers=lambda bench, device: [compile_peer(bench, device)],
)]
