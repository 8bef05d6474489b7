"""parallel=fsdp (FSDP2) under torchrun: 2 ranks, gloo on CPU, tiny models.

- the pretrain loss curve on 2 ranks equals one process's for the same global batch (fp32, <= 1e-4 relative);
- the resumable state is a DCP folder written by both ranks (+ model.safetensors, the full model);
- --resume gives exactly the uninterrupted run's losses, on 2 ranks and (resharded) on 1 process;
- a worker SIGKILLed mid-run: --resume completes from the last whole checkpoint, every step logged once;
- each rank holds 1/2 of the parameters, gradients and optimizer state; sampling with sharded parameters;
- sft -> reward -> ppo under fsdp ends with finite metrics; a Hugging Face model (init=hf:PATH) trains under it.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from rlhf_fast.train import checkpoint
from rlhf_fast.train.config import ModelConfig
from rlhf_fast.train.model import Transformer
from rlhf_fast.train.runtime import Dist, mixed_precision_policy, pick_parallel, replica_bytes

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "device=cpu"]
PRETRAIN = [*TINY, "steps=12", "batch_size=8", "eval_every=6", "save_every=4"]


def torchrun(*args, nproc=2, popen=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def cli(*args, nproc=2):
    """``rlhf-fast ...`` on nproc ranks (torchrun) or, nproc=1, in one plain process."""
    if nproc > 1:
        return torchrun("-m", "rlhf_fast.cli", *args, nproc=nproc)
    p = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(r["step"], r["loss"]) for r in rows(out) if "loss" in r]


def close(a, b, rel=1e-4):
    return [s for s, _ in a] == [s for s, _ in b] and all(abs(x - y) <= rel * abs(y) for (_, x), (_, y) in zip(a, b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """full: 12 steps on 2 ranks under fsdp; one: the same in one process."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {k: str(tmp / k) for k in ("full", "one")}
    cli("pretrain", "--out", out["full"], *PRETRAIN, "parallel=fsdp")
    cli("pretrain", "--out", out["one"], *PRETRAIN, nproc=1)
    return tmp, out


def test_two_rank_curve_equals_one_process(runs):
    _, out = runs
    full, one = losses(out["full"]), losses(out["one"])
    assert [s for s, _ in full] == list(range(1, 13))
    assert close(full, one), (full, one)  # same global batch, same math: <= 1e-4 relative per step
    a = checkpoint.read(os.path.join(out["full"], "model.safetensors"))[0]
    b = checkpoint.read(os.path.join(out["one"], "model.safetensors"))[0]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_checkpoint_is_dcp_written_by_every_rank_plus_full_model(runs):
    _, out = runs
    d = out["full"]
    assert sorted(f for f in os.listdir(d) if "ckpt" in f) == ["ckpt-12"]  # older ones removed, no temp folder
    files = os.listdir(os.path.join(d, "ckpt-12"))
    shards = sorted(f for f in files if f.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and ".metadata" in files and "state.json" in files
    sizes = [os.path.getsize(os.path.join(d, "ckpt-12", f)) for f in shards]
    assert min(sizes) > 0.3 * sum(sizes)  # each rank wrote its half of the weights and AdamW moments
    state = json.load(open(os.path.join(d, "ckpt-12", "state.json")))
    assert state["world"] == 2 and state["meta"]["step"] == 12
    # model.safetensors: the whole model, loadable as the next stage's init
    m = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2), "lm")
    sd = checkpoint.module_state(checkpoint.read(os.path.join(d, "model.safetensors"))[0], "model")
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in m.state_dict().items()}
    m.load_state_dict(sd)


def _workers(pid):
    """{rank: pid} of the workers torchrun ``pid`` started."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(c) for c in f.read().split()]
    env = {k: dict(kv.split("=", 1) for kv in open(f"/proc/{k}/environ").read().split("\0") if "=" in kv) for k in kids}
    return {int(e["RANK"]): k for k, e in env.items() if "RANK" in e}


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the workers through /proc (Linux)")
def test_killed_worker_then_exact_resume_on_two_ranks_and_on_one(runs):
    """Rank 0 is SIGKILLed mid-run (checkpoints every 2 steps, which changes no loss). --resume on 2 ranks
    completes from the last whole checkpoint with exactly the uninterrupted run's losses, each step logged
    once; the same checkpoint resumed by one process (DCP reshards it) gives the same math to 1e-4."""
    tmp, out = runs
    d, on_one = str(tmp / "killed"), str(tmp / "killed_on_one")
    args = [*PRETRAIN, "save_every=2", "parallel=fsdp"]
    launcher = torchrun("-m", "rlhf_fast.cli", "pretrain", "--out", d, *args, popen=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and launcher.poll() is None:  # kill rank 0 once step 3 is logged
            log = os.path.join(d, "metrics.jsonl")
            text = open(log).read() if os.path.exists(log) else ""  # (the last line may be half written)
            if any(f'"step": {s}, "loss"' in text for s in range(3, 13)):
                os.kill(_workers(launcher.pid)[0], signal.SIGKILL)
                break
            time.sleep(0.005)
        launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, "the run ended before the worker could be killed"
    last = checkpoint.latest_state(d)
    step = json.load(open(os.path.join(last, "state.json")))["meta"]["step"]
    assert 2 <= step < 12 and not os.path.exists(os.path.join(d, "model.safetensors"))
    # what a crash can leave behind is never picked up: a temp folder, a checkpoint folder without state.json
    os.makedirs(os.path.join(d, ".tmp-ckpt-99"), exist_ok=True)
    os.makedirs(os.path.join(d, "ckpt-98"))
    assert checkpoint.latest_state(d) == last
    shutil.copytree(d, on_one)
    cli("pretrain", "--out", d, *args, "--resume")
    assert losses(d) == losses(out["full"])  # steps 1..12 once each, bit for bit
    assert sorted(f for f in os.listdir(d) if "ckpt" in f) == ["ckpt-12"]
    cli("pretrain", "--out", on_one, *args, "--resume", nproc=1)
    assert losses(on_one)[:step] == losses(out["full"])[:step]
    assert close(losses(on_one), losses(out["full"]))


def test_shards_sampling_and_bf16_on_two_ranks(tmp_path):
    torchrun(os.path.join(ROOT, "tests", "fsdp_worker.py"), str(tmp_path))
    recs = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r, rec in enumerate(recs):
        assert rec["parallel"] == "fsdp" and rec["param_is_shard"]
        # 1/world of the parameters, gradients and AdamW moments (both moments: 2 x params), of the frozen model
        assert rec["params"] == rec["grads"] == rec["total"] // 2
        assert rec["optim"] == 2 * rec["params"] and rec["optim_keys"] == ["exp_avg", "exp_avg_sq", "step"]
        assert abs(rec["frozen"] - rec["frozen_total"] / 2) <= 64  # dim-0 shards of odd-sized tensors
        assert rec["generate_len"] == 2 + 3 * r and rec["generate_equal"]  # no hang, the plain model's tokens
        assert rec["resharded_after"] and rec["forward_after_equal"]
        assert rec["bf16_compute"] == ["torch.bfloat16", "torch.bfloat16"]
        assert rec["bf16_shard_dtypes"] == ["torch.float32"]
    assert recs[0]["frozen"] + recs[1]["frozen"] == recs[0]["frozen_total"]


def test_sft_reward_ppo_under_fsdp(tmp_path):
    out = str(tmp_path / "pipe")
    cli("pipeline", "--out", out, *("pretrain." + o for o in TINY[:3]), "pretrain.steps=4", "pretrain.batch_size=8",
        "pretrain.eval_every=2", "sft.steps=2", "sft.batch_size=8", "reward.steps=2", "reward.batch_size=8",
        "ppo.iterations=2", "ppo.rollout_size=8", "ppo.minibatch_size=4", "ppo.ppo_epochs=1", "ppo.ptx_batch_size=4",
        "ppo.max_new_tokens=6", "device=cpu", "parallel=fsdp")
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert os.path.exists(os.path.join(out, stage, "model.safetensors")), stage
        last = checkpoint.latest_state(os.path.join(out, stage))
        assert json.load(open(os.path.join(last, "state.json")))["world"] == 2, stage
    ppo_rows = [r for r in rows(os.path.join(out, "ppo")) if "pg_loss" in r]
    assert len(ppo_rows) == 2
    for r in ppo_rows:
        for k in ("pg_loss", "vf_loss", "ptx_loss", "entropy", "kl", "mean_score", "response_len"):
            assert torch.isfinite(torch.tensor(r[k])), (k, r)
    assert checkpoint.meta(os.path.join(out, "reward", "model.safetensors"))["head"] == "value"


def test_hf_model_under_fsdp(tmp_path):
    pytest.importorskip("transformers", reason="init=hf:PATH needs transformers")
    pytest.importorskip("tokenizers", reason="building a local tokenizer needs tokenizers")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train_hf import build, char_tokenizer
    tok = char_tokenizer()
    base = str(tmp_path / "gpt2")  # GPT-2: tied embedding / lm head, both in the root's shard group
    build("gpt2", len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    out = str(tmp_path / "sft")
    cli("sft", "--out", out, f"init=hf:{base}", "steps=2", "batch_size=4", "save_every=1", "device=cpu",
        "parallel=fsdp")
    assert os.listdir(os.path.join(out, "ckpt-2")).count("__1_0.distcp") == 1
    cli("sft", "--out", out, f"init=hf:{base}", "steps=3", "batch_size=4", "device=cpu", "--resume", nproc=1)
    got = losses(out)
    assert [s for s, _ in got] == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for _, v in got)
    from rlhf_fast.train.runtime import load_model
    tuned, _ = load_model(os.path.join(out, "model.safetensors"), "lm", "cpu")  # the full HF model again
    assert tuned.hf.get_input_embeddings().weight.data_ptr() == tuned.hf.get_output_embeddings().weight.data_ptr()


# ---- in-process: the choice of wrapping ---------------------------------------------------------------------

def test_pick_parallel_and_mixed_precision(monkeypatch):
    from rlhf_fast.train import runtime
    m = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2), "lm")
    assert replica_bytes([m]) == 4 * replica_bytes([], [m]) == 4 * 4 * sum(p.numel() for p in m.parameters())
    one, two = Dist(0, 1), Dist(0, 2)
    assert pick_parallel("fsdp", one, [m]) == "none"  # one process: the plain model
    assert pick_parallel("ddp", two, [m]) == "ddp" and pick_parallel("fsdp", two, [m]) == "fsdp"
    monkeypatch.setattr(runtime, "rank_memory_bytes", lambda d: 4 * replica_bytes([m]))
    assert pick_parallel("auto", two, [m]) == "ddp"  # a replica takes a quarter of the memory: DDP
    monkeypatch.setattr(runtime, "rank_memory_bytes", lambda d: 4 * replica_bytes([m]) - 1)
    assert pick_parallel("auto", two, [m]) == "fsdp"
    with pytest.raises(ValueError, match="parallel must be one of"):
        pick_parallel("zero3", two, [m])
    assert mixed_precision_policy("auto", torch.device("cpu")).param_dtype is None  # fp32 on a CPU
    p = mixed_precision_policy("auto", torch.device("cuda"))
    assert (p.param_dtype, p.reduce_dtype) == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        mixed_precision_policy("fp8", torch.device("cpu"))
