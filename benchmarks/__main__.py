"""python -m benchmarks [--cpu]: time each backend of the fused ops against the reference."""
import argparse
import time

import torch

import rlhf_fast as rf
from rlhf_fast import reference as ref


def _time(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="small CPU sizes (about a minute)")
    args = ap.parse_args()
    N, V, B, T = (2048, 32000, 64, 1024) if args.cpu else (8192, 151936, 256, 2048)
    x, y = torch.randn(N, V), torch.randint(0, V, (N,))
    base = _time(lambda: torch.log_softmax(x, -1).gather(-1, y[:, None]))
    print(f"logprobs N={N} V={V} fp32 (baseline log_softmax+gather {base * 1e3:.1f} ms)")
    for b in rf.backends_for("logprobs", "cpu"):
        t = _time(lambda: rf.logprobs(x, y, backend=b))
        print(f"  {b:10s} {t * 1e3:8.1f} ms  {base / t:5.2f}x")
    r, v, m = torch.randn(B, T), torch.randn(B, T), torch.ones(B, T, dtype=torch.bool)
    base = _time(lambda: ref.gae_python_loop(r, v), reps=3)
    print(f"gae B={B} T={T} fp32 (baseline Python loop {base * 1e3:.1f} ms)")
    for b in rf.backends_for("gae", "cpu"):
        t = _time(lambda: rf.gae(r, v, m, backend=b), reps=3)
        print(f"  {b:10s} {t * 1e3:8.1f} ms  {base / t:7.1f}x")


if __name__ == "__main__":
    main()
