"""linear_logprobs: logprobs(hidden @ weight.T, labels) from the last hidden states and the lm_head.

Compute-bound (the matmuls), so records carry FLOPs, not bytes:
  fwd   2·N·H·V   (the logits)
  bwd   4·N·H·V   (grad hidden and grad weight)
  full  6·N·H·V
A fused (chunked) implementation never holds the [N, V] logits; the reference does, in fp32.
"""
import torch

from benchmarks.harness import Bench, Impl, compile_peer, optional_import


def make_inputs(s, dtype, device):
    N, H, V = s["N"], s["H"], s["V"]
    hidden = torch.randn(N, H, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_()
    return {"hidden": hidden, "weight": weight, "labels": torch.randint(0, V, (N,), device=device)}


def flops_model(s, dtype):
    f = 2 * s["N"] * s["H"] * s["V"]
    return {"fwd": f, "bwd": 2 * f, "full": 3 * f}


def peers(bench, device):
    out = [compile_peer(bench, device)]
    liger, why = optional_import("liger_kernel.transformers.functional", "liger-kernel")
    why = why or (None if device.startswith("cuda") else "needs CUDA tensors")
    # Liger's fused linear CE returns a reduced loss (its backward is computed in the forward):
    # compare -Σ logp with the reference's Σ logp
    out.append(Impl("liger", "peer",
                    None if why else (lambda i: liger.liger_fused_linear_cross_entropy(
                        i["hidden"], i["weight"], i["labels"], reduction="sum")),
                    why or "liger_fused_linear_cross_entropy(reduction='sum') = -Σ logp",
                    primary=lambda out, inp: -out, ref_view=lambda r: r.sum()))
    return out


BENCHES = [Bench(
    op="linear_logprobs",
    sizes={"tiny": [dict(N=32, H=64, V=512)],
           "cpu": [dict(N=128, H=256, V=8192), dict(N=512, H=256, V=8192)],
           "gpu": [dict(N=16384, H=4096, V=151936), dict(N=4096, H=4096, V=151936)]},
    dtypes={"cpu": ["float32"], "cuda": ["bfloat16"]},
    make_inputs=make_inputs,
    args=lambda i: (i["hidden"], i["weight"], i["labels"], None, 1.0, -100, False),
    size=lambda s: s["N"] * s["V"], size_label="N·V (logits never materialised by fused backends)",
    grad_inputs=("hidden", "weight"),
    flops_model=flops_model,
    peers=peers,
)]
