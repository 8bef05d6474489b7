"""Group advantages (GRPO, RLOO): per-group normalisation of sequence scores [B], forward only.

Byte model: read the scores and write the advantages, b bytes each: 2·B·b. At realistic B these
ops are launch-bound, not bandwidth-bound; the numbers say how far from the floor that is.
"""
import torch

from benchmarks.harness import Bench, compile_peer

GROUP = 16
SIZES = {"tiny": [dict(B=64)], "cpu": [dict(B=4096), dict(B=65536)], "gpu": [dict(B=65536), dict(B=1 << 20)]}


def make_inputs(s, dtype, device):
    return {"scores": torch.randn(s["B"], device=device).to(dtype)}


def bytes_model(s, dtype):
    return {"fwd": 2 * s["B"] * (torch.finfo(dtype).bits // 8)}


def _bench(op, args):
    return Bench(
        op=op, sizes=SIZES, dtypes={"cpu": ["float32"], "cuda": ["float32"]}, make_inputs=make_inputs,
        args=args, size=lambda s: s["B"], size_label=f"B (sequences, groups of {GROUP})",
        bytes_model=bytes_model, peers=lambda bench, device: [compile_peer(bench, device)])


BENCHES = [
    _bench("grpo_advantages", lambda i: (i["scores"], GROUP, True)),
    _bench("rloo_advantages", lambda i: (i["scores"], GROUP)),
]
