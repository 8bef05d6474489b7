"""`rlhf-fast pipeline` (what `make demo` runs) for several seeds: mean ± std of every stage's metric.

    python -m benchmarks.pipeline_seeds [--seeds 0,1,2] [--jobs 1] [--out DIR] [key=value ...]

Each seed is one fresh process, `python -m rlhf_fast.cli pipeline --out <tmp>/seed<S> seed=<S>` (the
seed is added to every stage's seed: other data order, initialisation and sampling; the data are the
same), run --jobs at a time. Per run it records the wall time and the CPU time the process used
(user + sys, from getrusage of the children): on a shared machine the wall time depends on the other
load, the CPU time much less (the CLI runs torch on one thread). Writes pipeline_seeds.json into
benchmarks/results/cpu/ (or --out) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .harness import environment

# (stage, label, path in summary.json's results) of the metrics reported
METRICS = [
    ("pretrain", "held-out loss (nats/token)", ("pretrain", "eval_loss_after")),
    ("sft", "held-out countries: accuracy (greedy)", ("sft", "eval_acc_after")),
    ("reward", "held-out pairwise accuracy", ("reward", "eval_acc_after")),
    ("reward", "held-out countries: answer vs question back", ("reward", "new_countries_acc")),
    ("reward", "held-out countries: right vs wrong capital", ("reward", "new_countries_wrong_acc")),
]
for split, name in (("eval", "held-out countries"), ("train", "train prompts")):
    for key, what in (("acc_sampled", "accuracy (sampled, T=1)"), ("acc_greedy", "accuracy (greedy)"),
                      ("asks_back", "answers that ask back"), ("score", "mean RM score"),
                      ("kl", "KL to SFT (nats/seq)")):
        METRICS += [("ppo", f"{name}: {what}, before", ("ppo", "before", split, key)),
                    ("ppo", f"{name}: {what}, after", ("ppo", "after", split, key))]


def _get(d, path):
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d


def run_seed(seed: int, out: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rlhf_fast.cli", "pipeline", "--out", out, f"seed={seed}", *overrides]
    t0 = time.time()
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return {"seed": seed, "out": out, "cmd": cmd, "proc": proc, "t0": t0}


def finish(job: dict) -> dict:
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix the jobs running together)
    _, status, ru = os.wait4(job["proc"].pid, 0)
    wall = time.time() - job["t0"]
    code = job["proc"].returncode = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"seed {job['seed']} failed (exit {code}); see {job['out']}.log")
    with open(os.path.join(job["out"], "summary.json")) as f:
        results = json.load(f)["results"]
    return {"seed": job["seed"], "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
            "stage_wall_s": {s: results[s].get("seconds") for s in ("pretrain", "sft", "reward", "ppo")},
            "metrics": {label: _get(results, path) for _, label, path in METRICS}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=1, help="pipelines at once (each uses one thread)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    ap.add_argument("overrides", nargs="*", help="pipeline key=value overrides (default: none, as make demo)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    env = environment("cpu")
    tmp = tempfile.mkdtemp(prefix="pipeline_seeds_")
    runs, pending, running = [], list(seeds), []
    while pending or running:
        while pending and len(running) < args.jobs:
            s = pending.pop(0)
            running.append(run_seed(s, os.path.join(tmp, f"seed{s}"), args.overrides))
        runs.append(finish(running.pop(0)))
        print(f"seed {runs[-1]['seed']}: wall {runs[-1]['wall_s']:.0f}s, cpu {runs[-1]['cpu_s']:.0f}s", flush=True)
    runs.sort(key=lambda r: r["seed"])
    summary = []
    for stage, label, _ in METRICS:
        vals = [r["metrics"][label] for r in runs]
        if any(v is None for v in vals):
            continue
        summary.append({"stage": stage, "metric": label, "mean": statistics.mean(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals})
    result = {"meta": {**env, "load_average_end": list(os.getloadavg())}, "seeds": seeds, "jobs": args.jobs,
              "overrides": args.overrides, "runs": runs, "summary": summary,
              "wall_s": {"mean": statistics.mean(r["wall_s"] for r in runs), "max": max(r["wall_s"] for r in runs)},
              "cpu_s": {"mean": statistics.mean(r["cpu_s"] for r in runs), "max": max(r["cpu_s"] for r in runs)}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pipeline_seeds.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    n = len(result["seeds"])
    lines = [f"| stage | metric | mean ± std ({n} seeds) | per seed |", "|---|---|---|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['stage']} | {r['metric']} | {r['mean']:.3f} ± {r['std']:.3f} | "
                     + " / ".join(f"{v:.3f}" for v in r["values"]) + " |")
    w = result["wall_s"]
    lines.append(f"\nwall time per pipeline: mean {w['mean']:.0f} s, max {w['max']:.0f} s; "
                 f"CPU time (user + sys): mean {result['cpu_s']['mean']:.0f} s, max {result['cpu_s']['max']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
