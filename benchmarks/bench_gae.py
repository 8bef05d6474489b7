"""gae: generalised advantage estimation over [B, T], forward only (advantages are not differentiated).

Byte model: read rewards, values (b bytes each) and the bool mask (1 B), write advantages and
returns (b bytes each): B·T·(4·b + 1) — one pass, whatever the scan order.
Peers: the Python loop over T that TRL / verl / OpenRLHF use (right padding only; the inputs are
zero past each row's length, so it agrees with the masked reference on the valid positions).
"""
import torch

from benchmarks.harness import Bench, Impl, compile_peer
from rlhf_fast import reference as ref


def make_inputs(s, dtype, device):
    B, T = s["B"], s["T"]
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # right padding
    rewards = torch.randn(B, T, device=device).to(dtype) * mask
    values = torch.randn(B, T, device=device).to(dtype) * mask
    return {"rewards": rewards, "values": values, "mask": mask}


def bytes_model(s, dtype):
    b = torch.finfo(dtype).bits // 8
    return {"fwd": s["B"] * s["T"] * (4 * b + 1)}


def peers(bench, device):
    return [
        Impl("python-loop", "peer", lambda i: ref.gae_python_loop(i["rewards"], i["values"], 1.0, 0.95),
             "rlhf_fast.reference.gae_python_loop (the TRL/verl/OpenRLHF loop, right padding only)"),
        compile_peer(bench, device, enabled=False,
                     why_not="torch.compile would unroll the reference's T-step loop (minutes of compile)"),
    ]


BENCHES = [Bench(
    op="gae",
    sizes={"tiny": [dict(B=4, T=64)],
           "cpu": [dict(B=64, T=512), dict(B=256, T=2048)],
           "gpu": [dict(B=256, T=2048), dict(B=4096, T=8192)]},
    dtypes={"cpu": ["float32"], "cuda": ["float32"]},
    make_inputs=make_inputs,
    args=lambda i: (i["rewards"], i["values"], i["mask"], 1.0, 0.95),
    size=lambda s: s["B"] * s["T"], size_label="B·T (tokens)",
    primary=lambda out, inp: out[0] * inp["mask"],
    bytes_model=bytes_model,
    peers=peers,
)]
