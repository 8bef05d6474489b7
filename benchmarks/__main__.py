"""python -m benchmarks: time every rlhf_fast backend of each op against the reference and peers.

  python -m benchmarks --cpu                      small CPU sizes, about a minute on any machine
  python -m benchmarks                            the issue's sizes on the GPU (CPU sizes without one)
  python -m benchmarks --ops logprobs,gae --dtypes bfloat16 --backends reference,triton --peers none
  python -m benchmarks --replot benchmarks/results/cpu   redraw the tables and plots from results.json
Writes results.json, results.md and PNG plots to benchmarks/results/<device>/ (or --out).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch


def _csv(s: str | None):
    return None if s is None else [x for x in s.split(",") if x and x != "none"]


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU, small sizes (about a minute on 2 cores)")
    ap.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available, unless --cpu)")
    ap.add_argument("--sizes", choices=("tiny", "cpu", "gpu"), help="size preset (default: cpu on CPU, gpu on CUDA)")
    ap.add_argument("--ops", help="comma-separated ops (default: all); see --list")
    ap.add_argument("--dtypes", help="comma-separated dtypes, e.g. float32,bfloat16 (default: per op and device)")
    ap.add_argument("--backends", help="comma-separated rlhf_fast backends (default: all registered for the device)")
    ap.add_argument("--peers", help="comma-separated peers, or none (default: all: torch.compile, python-loop, "
                                    "trl, liger, flash-attn; --cpu leaves out torch.compile)")
    ap.add_argument("--phases", default="fwd,bwd,full", help="subset of fwd,bwd,full")
    ap.add_argument("--budget", type=float, help="seconds of repetitions per phase and case (default 1 GPU, 0.2 CPU)")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=100)
    ap.add_argument("--time-budget", type=float, help="seconds for the whole run; later cases are recorded as skipped")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", help="output folder (default benchmarks/results/<device>)")
    ap.add_argument("--append", action="store_true",
                    help="keep the records already in OUT/results.json (those measured again are replaced)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--replot", metavar="DIR", help="rewrite results.md and the plots from DIR/results.json")
    ap.add_argument("--list", action="store_true", help="list the ops and their cases, then exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from benchmarks import harness as H

    if args.replot:
        result = H.load(os.path.join(args.replot, "results.json"))
        print(H.write(result, args.replot, plots=not args.no_plots))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    preset = args.sizes or ("gpu" if device.startswith("cuda") else "cpu")
    benches = H.load_benches()
    if args.list:
        for b in benches:
            print(f"{b.op}: " + "; ".join(f"{p}: " + ", ".join(H.shape_label(s) for s in b.sizes[p]) for p in H.PRESETS))
        return 0
    ops = _csv(args.ops)
    unknown = set(ops or ()) - {b.op for b in benches}
    if unknown:
        raise SystemExit(f"unknown ops {sorted(unknown)}; see --list")
    peers, peer_notes = _csv(args.peers), {}
    if peers is None and args.cpu:  # torch.compile costs minutes of compiling on a small CPU
        peers = ["python-loop", "trl", "liger", "flash-attn"]
        peer_notes = {"torch.compile": "left out in --cpu mode (minutes of compiling on a small CPU); "
                                       "add --peers torch.compile"}
    cuda = device.startswith("cuda")
    opts = H.Options(device=device, preset=preset, ops=ops, dtypes=_csv(args.dtypes), backends=_csv(args.backends),
                     peers=peers, peer_notes=peer_notes, phases=tuple(_csv(args.phases)),
                     budget_s=args.budget if args.budget is not None else (1.0 if cuda else 0.2),
                     min_reps=args.min_reps, max_reps=args.max_reps, time_budget_s=args.time_budget)
    out_dir = args.out or os.path.join(H.REPO, "benchmarks", "results", H.device_slug(device))
    result: dict = {}
    old = []
    if args.append and os.path.exists(os.path.join(out_dir, "results.json")):
        old = H.load(os.path.join(out_dir, "results.json"))["records"]

    def merged() -> dict:
        key = lambda r: (r["op"], r["impl"], r["case"], r["dtype"])  # noqa: E731
        new = {key(r) for r in result["records"]}
        return {"meta": result["meta"], "records": [r for r in old if key(r) not in new] + result["records"]}

    def on_term(signum, frame):  # `timeout` sends SIGTERM: stop, keep what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.perf_counter()
    status = 0
    try:
        H.run(benches, opts, on_record=lambda r: H.write(merged(), out_dir, plots=False), result=result)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e}): writing the results measured so far", file=sys.stderr)
        status = 130
    if result.get("meta") is None:
        return status or 1
    result["meta"]["options"] = H.as_dict(opts)
    result["meta"]["interrupted"] = status != 0
    result["meta"]["wall_s"] = time.perf_counter() - t0
    result = merged()
    written = H.write(result, out_dir, plots=not args.no_plots)
    print(f"wrote {out_dir} ({len(result['records'])} records, {result['meta']['wall_s']:.0f} s): "
          f"{', '.join(os.path.basename(p) for v in written.values() for p in (v if isinstance(v, list) else [v]))}")
    return status


if __name__ == "__main__":
    sys.exit(main())
