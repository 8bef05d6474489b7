"""Tensor parallelism over the vocabulary (process_group= on the logits ops): tests/tp_worker.py run under
torchrun with gloo on CPU tensors, 2 ranks (one group) and 4 ranks (two groups of 2 and the world of 4). The
worker checks every backend here against the float64 reference on the unsharded logits (fp32/bf16, sliced
views, max in another shard, an all -inf shard, label in the last shard, ignored rows, temperature, uneven
shards), ranks bitwise equal, run-to-run and batch invariance, the linear ops (reduce_hidden_grad both ways),
the communication volume (a dispatch mode over the c10d ops), the ValueErrors, torch.compile(fullgraph) and
Megatron-core's vocab_parallel_cross_entropy as an oracle. The single-process part runs here."""
import os
import subprocess
import sys

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import _vocab_parallel as vp

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("nproc", [2, 4])
def test_tensor_parallel_torchrun(nproc):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "tp_worker.py")]
    r = subprocess.run(cmd, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert all(f"rank {i}: ok" in out for i in range(nproc)), out[-3000:]


def test_merge_of_one_shard_is_the_shard():
    # a group of one: the merge returns the kernel's own logp / entropy bits (log w = 0)
    x = torch.randn(5, 9)
    labels = torch.tensor([0, 8, -100, 3, 4])
    lp, ent, lse = torch.ops.rlhf_fast.logprobs_fwd(x, labels, 1.0, -100)
    owned = labels != -100
    m_lp, m_ent, m_lse = vp.merge(torch.stack([lse, ent, lp, owned.float()], -1).unsqueeze(0), owned)
    assert torch.equal(m_lp, lp) and torch.equal(m_ent, ent) and torch.equal(m_lse, lse)


def test_merge_rows_owned_by_no_rank_are_nan():
    p = torch.zeros(2, 3, 4)  # two shards of finite rows, no owner for row 1, two owners for row 2
    p[0, :, 3] = torch.tensor([1.0, 0.0, 1.0])
    p[1, :, 3] = torch.tensor([0.0, 0.0, 1.0])
    lp, ent, lse = vp.merge(p, torch.tensor([True, True, True]))
    assert lp[0].isfinite() and lp[1:].isnan().all() and ent[1:].isnan().all() and lse[1:].isnan().all()


def test_vocab_start_without_group_raises():
    with pytest.raises(ValueError, match="process_group"):
        rf.logprobs(torch.randn(2, 4), torch.tensor([0, 1]), vocab_start=0)
    with pytest.raises(ValueError, match="torch.distributed"):
        rf.logprobs(torch.randn(2, 4), torch.tensor([0, 1]), process_group=object())
