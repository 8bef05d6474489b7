"""Half-precision log-probs and entropy: TRL's own ``selective_log_softmax`` / ``entropy_from_logits`` (its
CPU path: ``log_softmax`` in the half dtype) against rf's (fp32 math, output cast to the logits' dtype, as
the TRL adapter returns it), both measured against float64 on the same half-precision logits (CPU).

TRL's tests ask for bit equality with ``logits.log_softmax(-1)`` in the half dtype; rf is closer to the exact
value instead, so those tests cannot pass on rf. Writes benchmarks/results/cpu/trl_half_precision.json.

    python -m benchmarks.trl_half_precision
"""
from __future__ import annotations

import json
import os

import torch

from benchmarks.harness import environment


def _stats(out, exact, half_ref):
    err = (out.double() - exact).abs()
    return {"max_abs_err": err.max().item(), "mean_abs_err": err.mean().item(),
            "max_rel_err": (err / exact.abs().clamp_min(1e-12)).max().item(),
            "bit_equal_to_half_log_softmax_fraction": (out == half_ref).double().mean().item()}


def measure(N=512, V=32000, scale=4.0, seed=0):
    from trl.trainer import utils as trl_utils

    import rlhf_fast as rf

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, V, generator=g) * scale
    index = torch.randint(0, V, (N,), generator=g)
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        x = base.to(dtype)
        x64 = x.double()
        lsm64 = x64.log_softmax(-1)
        lp_exact = lsm64.gather(-1, index[:, None]).squeeze(-1)
        ent_exact = -(lsm64.exp() * lsm64).sum(-1)
        lp_half = x.log_softmax(-1).gather(-1, index[:, None]).squeeze(-1)  # TRL's tests' oracle
        ent_half = -(x.softmax(-1) * x.log_softmax(-1)).sum(-1)
        lp_trl = trl_utils.selective_log_softmax(x, index)
        ent_trl = trl_utils.entropy_from_logits(x)
        lp32, ent32 = rf.logprobs(x, index, return_entropy=True, backend="cpu")
        name = str(dtype).replace("torch.", "")
        out[name] = {
            "logp": {"trl": _stats(lp_trl, lp_exact, lp_half), "rf_as_returned_to_trl": _stats(lp32.to(dtype), lp_exact, lp_half),
                     "rf_fp32": _stats(lp32, lp_exact, lp_half)},
            "entropy": {"trl": _stats(ent_trl, ent_exact, ent_half),
                        "rf_as_returned_to_trl": _stats(ent32.to(dtype), ent_exact, ent_half),
                        "rf_fp32": _stats(ent32, ent_exact, ent_half)},
        }
    return {"meta": environment("cpu"), "shape": {"N": N, "V": V}, "logits": f"N(0, {scale}^2) rounded to the dtype",
            "what": __doc__.split("\n\n")[0], "note": "errors against float64 of the same half-precision logits; "
            "bit_equal_...: the fraction of rows equal to log_softmax (and its entropy) taken in the half dtype, "
            "which TRL's own tests require", "results": out}


def main():
    r = measure()
    path = os.path.join(os.path.dirname(__file__), "results", "cpu", "trl_half_precision.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(r, f, indent=1)
    for dt, res in r["results"].items():
        for what, by in res.items():
            for who, s in by.items():
                print(f"{dt:9s} {what:8s} {who:22s} max abs {s['max_abs_err']:.3e}  mean abs {s['mean_abs_err']:.3e}  "
                      f"bit-equal to half log_softmax {s['bit_equal_to_half_log_softmax_fraction']:.3f}")


if __name__ == "__main__":
    main()
