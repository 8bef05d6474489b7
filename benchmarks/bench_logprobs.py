"""logprobs: log_softmax(logits)[label] over a large vocabulary, fwd + bwd.

Byte model (b = bytes per logit; per-row terms of a few bytes are included):
  fwd   read the logits once, the labels (8 B) and write logp (4 B)           N·V·b + 12·N
  bwd   read the logits again, write their gradient, read grad_out and the
        saved per-row logsumexp                                               2·N·V·b + 16·N
  full  the fused floor: logits read twice, gradient written once             3·N·V·b + 20·N
(the reference also materialises an fp32 log_softmax of [N, V], so it moves far more.)
"""
import torch

from benchmarks.harness import Bench, Impl, compile_peer, optional_import


def make_inputs(s, dtype, device):
    logits = (torch.randn(s["N"], s["V"], device=device) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, s["V"], (s["N"],), device=device)
    return {"logits": logits, "labels": labels}


def bytes_model(s, dtype):
    nv, n, b = s["N"] * s["V"], s["N"], torch.finfo(dtype).bits // 8
    return {"fwd": nv * b + 12 * n, "bwd": 2 * nv * b + 16 * n, "full": 3 * nv * b + 20 * n}


def peers(bench, device):
    out = [compile_peer(bench, device)]
    cuda_only = None if device.startswith("cuda") else "needs CUDA tensors"
    trl, why = optional_import("trl.trainer.utils", "trl")
    if trl is not None and not hasattr(trl, "selective_log_softmax"):
        trl, why = None, "this trl has no trl.trainer.utils.selective_log_softmax"
    out.append(Impl("trl", "peer", (lambda i: trl.selective_log_softmax(i["logits"], i["labels"])) if trl else None,
                    why or "trl.trainer.utils.selective_log_softmax"))
    liger, why = optional_import("liger_kernel.transformers.functional", "liger-kernel")
    why = why or cuda_only
    out.append(Impl("liger", "peer",
                    None if why else (lambda i: -_first(liger.liger_cross_entropy(i["logits"], i["labels"],
                                                                                  reduction="none"))),
                    why or "-liger_cross_entropy(reduction='none'); writes the gradient into the logits in the "
                           "forward", mutates_inputs=True))
    fa, why = optional_import("flash_attn.ops.triton.cross_entropy", "flash-attn")
    why = why or cuda_only
    out.append(Impl("flash-attn", "peer",
                    None if why else (lambda i: -_first(fa.cross_entropy_loss(i["logits"], i["labels"]))),
                    why or "-flash_attn.ops.triton.cross_entropy.cross_entropy_loss"))
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


BENCHES = [Bench(
    op="logprobs",
    sizes={"tiny": [dict(N=64, V=1000)],
           "cpu": [dict(N=128, V=32000), dict(N=512, V=32000)],
           "gpu": [dict(N=8192, V=151936), dict(N=2048, V=151936)]},
    dtypes={"cpu": ["float32"], "cuda": ["bfloat16"]},
    make_inputs=make_inputs,
    args=lambda i: (i["logits"], i["labels"], 1.0, -100, False),
    size=lambda s: s["N"] * s["V"], size_label="N·V (logits)",
    grad_inputs=("logits",),
    bytes_model=bytes_model,
    peers=peers,
)]
