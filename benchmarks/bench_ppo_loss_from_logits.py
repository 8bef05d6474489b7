"""ppo_loss_from_logits: PPO loss with KL and entropy terms straight from logits [B, T, V], fwd + bwd.

Byte model (b bytes per logit, N = B·T; per token: labels 8 B, old_logp, advantages, ref_logp
4 B each, mask 1 B = 21 B): the logits dominate, as in logprobs:
  fwd   N·V·b + 21·N
  bwd   2·N·V·b + 21·N    (read the logits again, write their gradient)
  full  3·N·V·b + 21·N    (logits read twice, gradient written once)
"""
import torch

from benchmarks.harness import Bench, compile_peer


def make_inputs(s, dtype, device):
    B, T, V = s["B"], s["T"], s["V"]
    logits = (torch.randn(B, T, V, device=device) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=device)
    old = -torch.rand(B, T, device=device) * 5
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    return {"logits": logits, "labels": labels, "old_logp": old, "advantages": torch.randn(B, T, device=device),
            "mask": mask, "ref_logp": old + 0.1 * torch.randn(B, T, device=device)}


def bytes_model(s, dtype):
    n = s["B"] * s["T"]
    nvb = n * s["V"] * (torch.finfo(dtype).bits // 8)
    return {"fwd": nvb + 21 * n, "bwd": 2 * nvb + 21 * n, "full": 3 * nvb + 21 * n}


BENCHES = [Bench(
    op="ppo_loss_from_logits",
    sizes={"tiny": [dict(B=2, T=16, V=1000)],
           "cpu": [dict(B=1, T=128, V=32000), dict(B=2, T=256, V=32000)],
           "gpu": [dict(B=4, T=2048, V=151936), dict(B=1, T=2048, V=151936)]},
    dtypes={"cpu": ["float32"], "cuda": ["bfloat16"]},
    make_inputs=make_inputs,
    # kl_coef=0.05 (k3), entropy_coef=0.01, clip 0.2/0.28, dual clip 3, token-mean
    args=lambda i: (i["logits"], i["labels"], i["old_logp"], i["advantages"], i["mask"], i["ref_logp"], 0.05, "k3",
                    0.01, 1.0, 0.2, 0.28, 3.0, "token-mean"),
    size=lambda s: s["B"] * s["T"] * s["V"], size_label="B·T·V (logits)",
    grad_inputs=("logits",),
    outputs=lambda out: [out[0]],
    bytes_model=bytes_model,
    peers=lambda bench, device: [compile_peer(bench, device)],
)]
