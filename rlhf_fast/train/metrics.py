"""Metrics: one JSON line per logged step, TensorBoard scalars when tensorboard imports, a PNG of the
curves when matplotlib imports. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os


class MetricLog:
    def __init__(self, out_dir: str, stage: str, enabled: bool = True, append: bool = False):
        self.stage, self.enabled = stage, enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._f = self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._f = open(self.path, "a" if append else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except Exception:  # tensorboard not installed: JSONL only
            self._tb = None

    def log(self, step: int, **metrics):
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, **{k: float(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{self.stage}/{k}", float(v), step)

    def close(self):
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: str, step: int) -> None:
    """Drop logged rows past ``step`` (a resumed run rewrites them), and a last line torn by a killed process."""
    if os.path.exists(path):
        with open(path) as f:
            lines = f.read().split("\n")
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.strip() and i < len(lines) - 1:  # only the last line can be half written
                    raise
        rows = [r for r in rows if r["step"] <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


PLOTTED = {"pretrain": ["loss", "eval_loss"], "sft": ["loss", "eval_loss"], "reward": ["loss", "eval_acc"],
           "ppo": ["mean_score", "true_reward", "kl", "pg_loss"]}


def plot_curves(jsonl_paths: list[str], png: str) -> str | None:
    """One panel per stage with its main curves; returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = [r for p in jsonl_paths if os.path.exists(p) for r in read_jsonl(p)]
    stages = [s for s in PLOTTED if any(r["stage"] == s for r in rows)]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for key in PLOTTED[stage]:
            pts = [(r["step"], r[key]) for r in rows if r["stage"] == stage and key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
