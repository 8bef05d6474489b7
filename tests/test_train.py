"""Training stages: config overrides, data errors, model invariances, checkpoint resume, a tiny
pipeline end to end, and the PPO trainer on the rf ops vs the reference backend."""
import json
import os

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast.train import checkpoint, ppo, pretrain
from rlhf_fast.train.config import ModelConfig, PipelineConfig, PPOConfig, PretrainConfig, load_config
from rlhf_fast.train.data import CharTokenizer, left_pad, load_jsonl, right_pad
from rlhf_fast.train.model import Transformer, generate
from rlhf_fast.train.pipeline import run as run_pipeline
from rlhf_fast.train.runtime import load_model

TINY_MODEL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2"]


def tiny_pipeline_config():
    return load_config(PipelineConfig, overrides=[
        *("pretrain." + o for o in TINY_MODEL), "pretrain.steps=6", "pretrain.eval_every=3", "pretrain.batch_size=8",
        "sft.steps=4", "sft.batch_size=8", "reward.steps=4", "reward.batch_size=8",
        "ppo.iterations=2", "ppo.rollout_size=8", "ppo.minibatch_size=4", "ppo.ppo_epochs=2", "ppo.ptx_batch_size=4",
        "ppo.max_new_tokens=6", "device=cpu"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipeline"))
    res = run_pipeline(tiny_pipeline_config(), out)
    return out, res


# ---- config -----------------------------------------------------------------------------------------

def test_config_overrides_and_files(tmp_path):
    cfg = load_config(PipelineConfig, overrides=["pretrain.steps=7", "pretrain.model.n_layer=1", "ppo.adaptive_kl=false",
                                                 "ppo.kl_coef=0.3", "sft.data=x.jsonl"])
    assert cfg.pretrain.steps == 7 and cfg.pretrain.model.n_layer == 1
    assert cfg.ppo.adaptive_kl is False and cfg.ppo.kl_coef == 0.3 and cfg.sft.data == "x.jsonl"
    for bad in ["pretrain.stepz=1", "pretrain.steps=abc", "ppo.adaptive_kl=maybe", "steps", "pretrain.model=3",
                "pretrain.steps.x=1"]:
        with pytest.raises(ValueError):
            load_config(PipelineConfig, overrides=[bad])
    (tmp_path / "c.json").write_text(json.dumps({"steps": 11, "model": {"d_model": 64}}))
    (tmp_path / "c.toml").write_text("steps = 12\nlr = 1\n[model]\nn_head = 2\n")
    c = load_config(PretrainConfig, str(tmp_path / "c.json"), ["steps=13"])
    assert (c.steps, c.model.d_model) == (13, 64)  # the override wins over the file
    c = load_config(PretrainConfig, str(tmp_path / "c.toml"))
    assert (c.steps, c.lr, c.model.n_head) == (12, 1.0, 2) and isinstance(c.lr, float)
    (tmp_path / "bad.json").write_text(json.dumps({"steps": "many"}))
    with pytest.raises(ValueError, match="steps"):
        load_config(PretrainConfig, str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError):
        load_config(PretrainConfig, str(tmp_path / "missing.toml"))


# ---- data -------------------------------------------------------------------------------------------

def _jsonl(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


@pytest.mark.parametrize("stage,rows,match", [
    ("sft", [{"prompt": "Q: a\nA:"}], r"d.jsonl:1: missing field 'response'"),
    ("sft", [{"prompt": "Q: a\nA:", "response": "ok"}, {"prompt": "Q: b\nA:", "response": "  "}], r":2: field 'response' is empty"),
    ("sft", [{"prompt": "x" * 64, "response": " y"}], r"field 'prompt' is 64 tokens, too long for block_size=64"),
    ("sft", [{"prompt": "x" * 40, "response": " " + "y" * 30}], r"longer than block_size=64"),
    ("reward", [{"prompt": "p", "chosen": " a"}], r"missing field 'rejected'"),
    ("reward", [{"prompt": "p", "chosen": " a", "rejected": ""}], r"field 'rejected' is empty"),
    ("ppo", [{"answer": "Paris"}], r"missing field 'prompt'"),
    ("pretrain", [{"txt": "hello"}], r"missing field 'text'"),
    ("sft", ["{not json"], r"not valid JSON"),
    ("sft", [{"prompt": 3, "response": "x"}], r"field 'prompt' must be a string"),
    ("sft", [{"prompt": "caf\u00e9", "response": " x"}], r"not in the tokenizer's alphabet"),
])
def test_bad_data_errors(tmp_path, stage, rows, match):
    with pytest.raises(ValueError, match=match):
        load_jsonl(_jsonl(tmp_path, rows), stage, CharTokenizer(), 64)


def test_bad_data_from_the_cli(tmp_path, capsys):
    from rlhf_fast.cli import main
    path = _jsonl(tmp_path, [{"prompt": "Q: x\nA:", "response": ""}])
    init = tmp_path / "m.safetensors"
    model = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2))
    checkpoint.save(str(init), {"model": model}, meta={"head": "lm", "model_config": vars(model.cfg)})
    assert main(["sft", "--data", path, "--out", str(tmp_path / "o"), f"init={init}", "device=cpu"]) == 1
    assert "field 'response' is empty" in capsys.readouterr().err
    assert main(["sft", "--out", str(tmp_path / "o"), "init=nowhere.safetensors"]) == 1
    assert "run the previous stage first" in capsys.readouterr().err
    assert main(["pretrain", "nosuchkey=1"]) == 2


def test_data_file_rows_load(tmp_path):
    rows = [{"prompt": f"Q: {i}?\nA:", "response": f" {i}"} for i in range(5)]
    assert load_jsonl(_jsonl(tmp_path, rows), "sft", CharTokenizer(), 64) == rows


# ---- model --------------------------------------------------------------------------------------------

def test_padding_and_kv_cache_match_the_plain_forward():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(n_layer=2, d_model=32, n_head=2)).eval()
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    plain = [m(torch.tensor([s]))[0] for s in seqs]
    ids, mask = right_pad(seqs, 0)
    out = m(ids, mask)
    ids_l, mask_l = left_pad(seqs, 0)
    out_l = m(ids_l, mask_l)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i, :len(s)], plain[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_l[i, -len(s):], plain[i], atol=1e-5, rtol=1e-5)
    # greedy generation with the KV cache == greedy decoding by full recomputation
    resp, rmask = generate(m, ids_l, mask_l, 6, eos_id=1, pad_id=0, temperature=0.0)
    for i, s in enumerate(seqs):
        x = list(s)
        for t in range(resp.shape[1]):
            if not rmask[i, t]:
                break
            nxt = m(torch.tensor([x]))[0, -1].argmax().item()
            assert resp[i, t].item() == nxt
            x.append(nxt)
    for temperature in (0.0, 1.0):  # and == generate's recomputing path, greedy and seeded sampling
        runs = [generate(m, ids_l, mask_l, 10, 40, 0, temperature, torch.Generator().manual_seed(1), kv_cache=kv)
                for kv in (True, False)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_value_head_and_shapes():
    m = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2), head="value")
    assert m(torch.randint(2, 90, (3, 7))).shape == (3, 7)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_hf_source_errors(tmp_path):
    try:
        import transformers  # noqa: F401
        has_tf = True
    except ImportError:
        has_tf = False
    if has_tf:
        with pytest.raises(FileNotFoundError, match="not a local folder"):
            load_model(f"hf:{tmp_path}/none", "lm", "cpu")
    else:
        with pytest.raises(ImportError, match="needs the transformers package"):
            load_model(f"hf:{tmp_path}", "lm", "cpu")


# ---- checkpoints ---------------------------------------------------------------------------------------

def test_checkpoint_atomic_and_roundtrip(tmp_path):
    m = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2))
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randint(2, 90, (2, 5))).sum().backward()
    opt.step()
    path = str(tmp_path / "c.safetensors")
    checkpoint.save(path, {"model": m}, meta={"step": 3})
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temp file left behind
    assert checkpoint.meta(path) == {"step": 3}
    m2 = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2))
    m2.load_state_dict(checkpoint.module_state(checkpoint.read(path)[0], "model"))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    with pytest.raises(FileNotFoundError):
        checkpoint.read(str(tmp_path / "none.safetensors"))
    # the resumable state (DCP folder) in one process: modules, optimizer moments, RNG, meta
    gen = torch.Generator().manual_seed(5)
    out = str(tmp_path / "run")
    checkpoint.save_state(out, 3, {"model": m}, {"opt": opt}, checkpoint.rng_state({"data": gen}), {"step": 3})
    assert os.listdir(out) == ["ckpt-3"] and checkpoint.latest_state(out) == os.path.join(out, "ckpt-3")
    want = torch.rand(3, generator=gen)
    m3 = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2))
    opt3 = torch.optim.AdamW(m3.parameters())
    state = checkpoint.load_state(checkpoint.latest_state(out), {"model": m3}, {"opt": opt3})
    gen3 = torch.Generator()
    checkpoint.set_rng_state(state["rng"], {"data": gen3})
    assert state["step"] == 3 and torch.equal(torch.rand(3, generator=gen3), want)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m3.parameters()))
    for p, p3 in zip(m.parameters(), m3.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt3.state[p3]["exp_avg_sq"])


def test_pretrain_exact_resume(tmp_path):
    over = [*TINY_MODEL, "steps=8", "batch_size=4", "save_every=100", "eval_every=4", "device=cpu"]
    full = pretrain.train(load_config(PretrainConfig, overrides=over), str(tmp_path / "a"))
    part = pretrain.train(load_config(PretrainConfig, overrides=over + ["stop_after=3"]), str(tmp_path / "b"))
    assert part["steps"] == 3 and not os.path.exists(tmp_path / "b" / "model.safetensors")
    torch.manual_seed(999)  # the resumed run must not depend on the process's RNG state
    pretrain.train(load_config(PretrainConfig, overrides=over), str(tmp_path / "b"), resume=True)

    def losses(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(d / "metrics.jsonl")) if "loss" in r]
    assert len(losses(tmp_path / "a")) == 8
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit for bit
    a = checkpoint.read(str(tmp_path / "a" / "model.safetensors"))[0]
    b = checkpoint.read(str(tmp_path / "b" / "model.safetensors"))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["steps"] == 8


# ---- pipeline ---------------------------------------------------------------------------------------------

def test_tiny_pipeline_writes_everything(tiny_run):
    out, res = tiny_run
    for stage in ("pretrain", "sft", "reward", "ppo"):
        for f in ("model.safetensors", "metrics.jsonl", "result.json"):
            assert os.path.exists(os.path.join(out, stage, f)), (stage, f)
        assert checkpoint.latest_state(os.path.join(out, stage)), stage  # the resumable DCP folder
    for f in ("metrics.jsonl", "summary.json", "curves.png"):
        assert os.path.exists(os.path.join(out, f)), f
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {r["stage"] for r in rows} == {"pretrain", "sft", "reward", "ppo"}
    assert "ppo" in res["_table"] and "pairwise accuracy" in res["_table"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["results"]) == {"pretrain", "sft", "reward", "ppo"}
    assert checkpoint.meta(os.path.join(out, "reward", "model.safetensors"))["head"] == "value"


def test_cli_pipeline_help():
    from rlhf_fast.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_ppo_rf_ops_match_reference_backend(tiny_run, tmp_path):
    out, _ = tiny_run
    over = [f"init={out}/sft/model.safetensors", f"reward_model={out}/reward/model.safetensors", "iterations=2",
            "rollout_size=8", "minibatch_size=4", "ppo_epochs=2", "ptx_batch_size=4", "max_new_tokens=6", "device=cpu"]
    cfg = load_config(PPOConfig, overrides=over)
    default = ppo.train(cfg, str(tmp_path / "default"))
    with rf.use_backend("reference"):
        reference = ppo.train(load_config(PPOConfig, overrides=over), str(tmp_path / "reference"))
    assert len(default["history"]) == 2
    for a, b in zip(default["history"], reference["history"]):
        for k in ("pg_loss", "vf_loss", "entropy", "ptx_loss", "kl", "mean_score"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


# ---- the built-in task -----------------------------------------------------------------------------------

def test_builtin_task_keeps_held_out_countries_out_of_training():
    from rlhf_fast.train import data as D
    train, held = D.split_countries()
    assert len(held) >= 16 and not {c for c, _ in train} & {c for c, _ in held}
    tok = CharTokenizer()
    sft_rows, pairs, prompts = D.builtin_sft("train"), D.builtin_preferences("train"), D.builtin_prompts("train")
    for stage, rows in (("sft", sft_rows), ("reward", pairs + D.builtin_preferences("eval")), ("ppo", prompts)):
        for r in rows:
            assert not D.row_problems(r, stage, tok, D.BLOCK_SIZE), r
            # a held-out country is never what a training prompt is about
            assert not any(f" {c}?" in r["prompt"] or f" {c}." in r["prompt"] for c, _ in held), r
    # the SFT demonstrations ask back half the time: the habit PPO has to remove
    asks = [r["response"].endswith("?") for r in sft_rows]
    assert sum(asks) / len(asks) == pytest.approx(D.QUESTION_BACK_PROB / (1 + D.QUESTION_BACK_PROB))
    # every held-out-country pair tests the preference that generalises: an answer over a question
    new = D.builtin_preferences("new_countries")
    assert new and all(r["rejected"].endswith("?") and not r["chosen"].endswith("?") for r in new)
    wrong = D.builtin_preferences("new_countries_wrong")
    caps = {a for _, a in held}
    assert wrong and all(r["rejected"].strip() in caps and r["rejected"] != r["chosen"] for r in wrong)
    assert {r["answer"] for r in D.builtin_prompts("eval")} == caps


def test_pipeline_seed_offsets_every_stage(tmp_path):
    cfg = load_config(PipelineConfig, overrides=["seed=7"])
    defaults = PipelineConfig()
    run_pipeline(cfg, str(tmp_path / "p"), stages=())
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert getattr(cfg, stage).seed == getattr(defaults, stage).seed + 7
