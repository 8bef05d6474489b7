"""The README's performance plot, from a committed benchmark run (no measuring here):

    python -m benchmarks.plot_readme [--results benchmarks/results/cpu/results.json] [--out .../readme_speedup.png]

One bar per op: the speed-up of the compiled "cpu" backend over the PyTorch reference in the same run
(reference time / cpu time, forward + backward where the op has a backward), at the run's largest case,
and beside it the extra memory of both. The title says the device, commit and date of the run: the
committed results are CPU-only (there are no GPU numbers yet)."""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def rows(result: dict, impl: str = "cpu") -> list[dict]:
    """Per op, the largest case where both ``impl`` and the reference ran: speed-up and extra memory."""
    by_case = {}
    for r in result["records"]:
        if r["status"] == "ok" and r["impl"] in (impl, "reference"):
            by_case.setdefault((r["op"], r["case"], r["dtype"]), {})[r["impl"]] = r
    best = {}
    for (op, case, dtype), pair in by_case.items():
        if len(pair) == 2 and (op not in best or pair[impl]["size"] > best[op]["size"]):
            phase = "full" if pair[impl]["time_ms"]["full"] else "fwd"
            mem = {k: (pair[k]["mem_extra_bytes"][phase] or 0) / 2**20 for k in pair}
            best[op] = {"op": op, "case": case, "dtype": dtype, "phase": phase, "size": pair[impl]["size"],
                        "speedup": pair["reference"]["time_ms"][phase]["p50"] / pair[impl]["time_ms"][phase]["p50"],
                        "mem_ref": mem["reference"], "mem_impl": mem[impl]}
    return sorted(best.values(), key=lambda b: b["speedup"])


def plot(result: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs, meta = rows(result), result["meta"]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rs) + 1.9))
    y = range(len(rs))
    ax.barh(y, [r["speedup"] for r in rs], color=["#c44" if r["speedup"] < 1 else "#38c" for r in rs])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(y), [f"{r['op']} ({r['case']}, {r['dtype']}, {'fwd+bwd' if r['phase'] == 'full' else 'fwd'})"
                            for r in rs], fontsize=8)
    for i, r in enumerate(rs):
        mem = f"   extra memory {r['mem_impl']:.0f} vs {r['mem_ref']:.0f} MiB" if r["mem_ref"] or r["mem_impl"] else ""
        ax.text(r["speedup"] * 1.05, i, f"{r['speedup']:.2f}x{mem}", va="center", fontsize=7)
    ax.set_xlim(min(0.5, min(r["speedup"] for r in rs) / 1.5), max(r["speedup"] for r in rs) * 60)
    ax.set_xlabel("speed-up of the C++ cpu backend over the PyTorch reference (same run, median times)")
    ax.set_title(f"CPU ONLY (no GPU numbers yet): {meta['device_name']}, {meta['cpu_threads']} threads, "
                 f"torch {meta['torch']}\ncommit {meta['git_commit'][:7]}, {meta['date'][:10]}: "
                 "python -m benchmarks --cpu -> benchmarks/results/cpu/results.json", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(HERE, "results", "cpu", "results.json"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu", "readme_speedup.png"))
    a = p.parse_args(argv)
    with open(a.results) as f:
        print(plot(json.load(f), a.out))


if __name__ == "__main__":
    main()
