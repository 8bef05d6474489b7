"""ppo_value_loss: clipped value loss over [B, T] with token-mean aggregation, fwd + bwd.

Byte model (b bytes per float element, n = B·T, mask 1 B):
  fwd   read values, old_values, returns, mask                     n·(3·b + 1)
  bwd   read them again and write grad values                      n·(4·b + 1)
  full  fused floor: one read, the gradient written alongside      n·(4·b + 1)
"""
import torch

from benchmarks.harness import Bench, compile_peer


def make_inputs(s, dtype, device):
    B, T = s["B"], s["T"]
    old = torch.randn(B, T, device=device)
    values = (old + 0.3 * torch.randn(B, T, device=device)).to(dtype).requires_grad_()
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    return {"values": values, "old_values": old.to(dtype), "returns": torch.randn(B, T, device=device).to(dtype),
            "mask": mask}


def bytes_model(s, dtype):
    n, b = s["B"] * s["T"], torch.finfo(dtype).bits // 8
    return {"fwd": n * (3 * b + 1), "bwd": n * (4 * b + 1), "full": n * (4 * b + 1)}


BENCHES = [Bench(
    op="ppo_value_loss",
    sizes={"tiny": [dict(B=4, T=64)],
           "cpu": [dict(B=64, T=1024), dict(B=256, T=4096)],
           "gpu": [dict(B=256, T=2048), dict(B=1024, T=8192)]},
    dtypes={"cpu": ["float32"], "cuda": ["float32"]},
    make_inputs=make_inputs,
    args=lambda i: (i["values"], i["old_values"], i["returns"], i["mask"], 0.2, "token-mean"),
    size=lambda s: s["B"] * s["T"], size_label="B·T (tokens)",
    grad_inputs=("values",),
    outputs=lambda out: [out[0]],
    bytes_model=bytes_model,
    peers=lambda bench, device: [compile_peer(bench, device)],
)]
