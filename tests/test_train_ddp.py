"""DDP: `torchrun --nproc_per_node=2 -m rlhf_fast.cli pretrain` on CPU (gloo) for a few steps gives the
losses of one process on the same global batch (each rank takes its slice; gradients are averaged)."""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "steps=4", "batch_size=8", "eval_every=2",
        "save_every=100", "device=cpu"]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is unavailable")
def test_two_process_pretraining_matches_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rlhf_fast.cli", "pretrain", "--out", str(tmp_path / "ddp"), *ARGS]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "parallel=ddp over 2 processes (gloo)" in p.stdout  # what parallel=auto picks for a tiny model
    p1 = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "pretrain", "--out", str(tmp_path / "one"), *ARGS],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p1.returncode == 0, p1.stderr[-3000:]
    ddp, one = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    assert len(ddp) == len(one) == 4
    assert ddp == pytest.approx(one, rel=1e-4)
    assert os.path.exists(tmp_path / "ddp" / "model.safetensors")
    # the DDP run's checkpoint (DCP, written by both ranks) continues in one process like the one-process run's
    for run in ("ddp", "one"):
        p = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "pretrain", "--out", str(tmp_path / run), *ARGS,
                            "steps=6", "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stderr[-3000:]
    ddp, one = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    assert len(ddp) == len(one) == 6
    assert ddp == pytest.approx(one, rel=1e-4)
