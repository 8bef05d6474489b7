"""The stages as a user meets them on the command line: every bad input is one clear line naming the
file, the line and the field, a non-zero exit, no traceback and no output folder left behind."""
import json
import os
import subprocess
import sys

import pytest

from rlhf_fast.cli import main
from rlhf_fast.train import checkpoint
from rlhf_fast.train.config import ModelConfig
from rlhf_fast.train.model import Transformer


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A tiny untrained lm checkpoint and a value-head copy: enough for sft/reward/ppo to start."""
    d = tmp_path_factory.mktemp("init")
    model = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2))
    lm, rm = str(d / "lm.safetensors"), str(d / "rm.safetensors")
    checkpoint.save(lm, {"model": model}, meta={"head": "lm", "model_config": vars(model.cfg)})
    checkpoint.save(rm, {"model": model}, meta={"head": "lm", "model_config": vars(model.cfg)})
    return {"init": lm, "reward_model": rm}


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


def _run(capsys, tmp_path, stage, rows, init, *extra):
    """Run ``stage`` on ``rows`` through the CLI; returns (exit code, stderr lines, data path, out folder)."""
    path = _write(tmp_path, rows)
    out = tmp_path / "out"
    argv = [stage, "--data", path, "--out", str(out), f"init={init['init']}", "device=cpu", *extra]
    if stage == "ppo":
        argv.append(f"reward_model={init['reward_model']}")
    code = main(argv)
    err = capsys.readouterr().err
    return code, err.strip().splitlines(), path, out


GOOD_SFT = {"prompt": "Q: x?\nA:", "response": " y"}


@pytest.mark.parametrize("stage,rows,line,field,words", [
    ("sft", [GOOD_SFT, {"prompt": "", "response": " Paris"}], 2, "prompt", "is empty"),
    ("sft", [{"prompt": "Q: caf\u00e9?\nA:", "response": " x"}, GOOD_SFT], 1, "prompt", "'\u00e9' (U+00E9, position 7)"),
    ("sft", [GOOD_SFT, {"prompt": "x" * 70, "response": " y"}], 2, "prompt",
     "too long for block_size=64 (the context must also hold at least one response token): shorten it, "
     "or use a model with a longer context: pretrain with model.block_size=128"),
    ("sft", [GOOD_SFT, {"prompt": "x" * 40, "response": " " + "y" * 30}], 2, "response", "longer than block_size=64"),
    ("ppo", [{"prompt": "Q: a?\nA:", "answer": "Rome"}, {"prompt": "Q: b?\nA:", "answer": 3}], 2, "answer",
     "must be a string, got int 3"),
    ("reward", [{"prompt": "p", "chosen": " a", "rejected": " a"}, {"prompt": "p", "chosen": " a", "rejected": " b"}],
     1, "'chosen' and 'rejected'", "are the same text"),
    ("reward", [{"prompt": "p", "chosen": " a"}, {"prompt": "p", "chosen": " a", "rejected": " b"}], 1, "rejected",
     "missing field"),
])
def test_a_bad_row_is_one_line_with_file_line_and_field(capsys, tmp_path, init, stage, rows, line, field, words):
    code, err, path, out = _run(capsys, tmp_path, stage, rows, init)
    assert code == 1
    assert len(err) == 1, err
    assert err[0].startswith(f"rlhf-fast {stage}: {path}:{line}: "), err
    assert field in err[0] and words in err[0], err
    assert not os.path.exists(out)


def test_every_bad_line_is_reported_up_to_a_limit(capsys, tmp_path, init):
    rows = [{"prompt": "", "response": " a"}, {"prompt": "   ", "response": " a"}, GOOD_SFT, {"prompt": 5, "response": ""}]
    code, err, path, out = _run(capsys, tmp_path, "sft", rows, init)
    assert code == 1 and not os.path.exists(out)
    assert [e.split(": ")[1] for e in err] == [f"{path}:1", f"{path}:2", f"{path}:4", f"{path}:4"]  # both fields of 4
    assert "field 'prompt' must be a string, got int 5" in err[2] and "field 'response' is empty" in err[3]
    code, err, path, _ = _run(capsys, tmp_path, "sft", [{"prompt": "", "response": " a"}] * 25 + [GOOD_SFT], init)
    assert code == 1 and len(err) == 21
    assert err[19].startswith(f"rlhf-fast sft: {path}:20: ") and err[20] == "rlhf-fast sft: ... and 5 more bad lines"


def test_all_prompts_empty(capsys, tmp_path, init):
    code, err, path, out = _run(capsys, tmp_path, "ppo", [{"prompt": ""}] * 3, init)
    assert code == 1 and not os.path.exists(out)
    assert err == [f"rlhf-fast ppo: {path}:{i}: field 'prompt' is empty: the model needs at least one prompt "
                   "token to answer" for i in (1, 2, 3)]


def test_a_one_row_file(capsys, tmp_path, init):
    code, err, path, out = _run(capsys, tmp_path, "sft", [GOOD_SFT], init, "steps=1")
    assert code == 1 and not os.path.exists(out)
    assert err == [f"rlhf-fast sft: {path}: 1 row, but eval_frac=0.1 holds rows out for evaluation: give two or "
                   "more rows, or set eval_frac=0 to train on it without a held-out check"]
    code, err, path, out = _run(capsys, tmp_path, "sft", [GOOD_SFT], init, "steps=1", "eval_frac=0")
    assert code == 0, err  # and the way out it names works
    assert os.path.exists(out / "model.safetensors")


def test_empty_file_and_bad_json(capsys, tmp_path, init):
    code, err, path, out = _run(capsys, tmp_path, "sft", ["", "  "], init)
    assert code == 1 and err == [f"rlhf-fast sft: {path}: no rows (expected one JSON object per line with fields "
                                 "prompt, response)"]
    code, err, path, out = _run(capsys, tmp_path, "reward", ['{"prompt": "p",', "[1, 2]"], init)
    assert code == 1 and len(err) == 2 and not os.path.exists(out)
    assert f"{path}:1: not valid JSON" in err[0] and f"{path}:2: expected a JSON object" in err[1]


def test_a_folder_that_was_there_is_left_as_it_was(capsys, tmp_path, init):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    (tmp_path / "out" / "empty").mkdir()
    code, _, _, out = _run(capsys, tmp_path, "sft", [{"prompt": "", "response": " a"}], init)
    assert code == 1
    assert sorted(os.listdir(out)) == ["empty", "keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_pipeline_checks_every_file_before_training(capsys, tmp_path):
    bad_sft = _write(tmp_path, [{"prompt": "", "response": " a"}], "sft.jsonl")
    bad_ppo = _write(tmp_path, [{"prompt": "Q?", "answer": 1}, {"prompt": "Q?"}], "ppo.jsonl")
    out = tmp_path / "pipe"
    code = main(["pipeline", "--out", str(out), f"sft.data={bad_sft}", f"ppo.data={bad_ppo}", "device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not os.path.exists(out)  # nothing was trained
    assert err == [f"rlhf-fast pipeline: {bad_sft}:1: field 'prompt' is empty: the model needs at least one prompt "
                   "token to answer",
                   f"rlhf-fast pipeline: {bad_ppo}:1: field 'answer' must be a string, got int 1"]


def test_no_traceback_from_the_installed_command(tmp_path):
    """The real process: exit status 1, one line on stderr, no Python traceback."""
    path = _write(tmp_path, [{"prompt": "", "response": " a"}])
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    p = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "sft", "--data", path, "--out", str(tmp_path / "o"),
                        "init=" + str(tmp_path / "missing.safetensors")], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        f"rlhf-fast sft: init checkpoint {tmp_path}/missing.safetensors does not exist; run the previous stage "
        "first (e.g. `rlhf-fast pretrain`) or set init=PATH"]
    assert not os.path.exists(tmp_path / "o")


def _keys(cls, prefix=""):
    """Every settable key of a config dataclass with its type and default, walked here independently."""
    import dataclasses
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(type(value), prefix + f.name + ".")
        else:
            yield prefix + f.name, f.type, value


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo", "pipeline"])
def test_stage_help_lists_every_config_key(capsys, stage):
    import re

    from rlhf_fast.train.config import STAGE_CONFIGS, load_config
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    lines = text.split("config keys")[1].splitlines()
    keys = list(_keys(STAGE_CONFIGS[stage]))
    assert len(keys) == len(lines) - 1 and len(keys) >= 14
    for key, typ, default in keys:
        shown = json.dumps(default)
        hit = [ln for ln in lines if re.match(rf"\s+{re.escape(key)}\s+{typ} = {re.escape(shown)}\s+\S", ln)]
        assert len(hit) == 1, f"{key} ({typ} = {shown}) is not listed with a one-line meaning; give it opt(default, help)"
        # and what is shown is what a key=value override of that text parses to
        text_value = shown.strip('"') if typ == "str" else shown
        assert getattr_path(load_config(STAGE_CONFIGS[stage], overrides=[f"{key}={text_value}"]), key) == default


def getattr_path(obj, key):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2"]
RESUME_RUNS = {  # each stage (and the pipeline) run to its end on tiny settings
    "pretrain": [*TINY, "steps=3", "eval_every=1000", "batch_size=4"],
    "sft": ["steps=2", "batch_size=2", "eval_frac=0"],
    "reward": ["steps=2", "batch_size=2", "eval_frac=0"],
    "ppo": ["iterations=1", "rollout_size=2", "minibatch_size=2", "ppo_epochs=1", "max_new_tokens=2", "eval_frac=0"],
    "pipeline": [*("pretrain." + o for o in TINY), "pretrain.steps=2", "pretrain.batch_size=4", "sft.steps=1",
                 "sft.batch_size=4", "reward.steps=1", "reward.batch_size=4", "ppo.iterations=1", "ppo.rollout_size=4",
                 "ppo.minibatch_size=4", "ppo.ppo_epochs=1", "ppo.ptx_batch_size=2", "ppo.max_new_tokens=2"],
}
RESUME_DATA = {"sft": [GOOD_SFT, {"prompt": "Q: z?\nA:", "response": " w"}],
               "reward": [{"prompt": "p", "chosen": " a", "rejected": " b"},
                          {"prompt": "q", "chosen": " c", "rejected": " d"}],
               "ppo": [{"prompt": "Q: a?\nA:", "answer": "x"}, {"prompt": "Q: b?\nA:", "answer": "y"}]}


@pytest.mark.parametrize("stage", list(RESUME_RUNS))
def test_resume_of_a_finished_run_says_it_is_complete(capsys, tmp_path, init, stage):
    """The same command again with --resume after the run reached its end: one line saying the run is
    complete, exit 0, nothing trained or rewritten."""
    out = tmp_path / "out"
    argv = [stage, "--out", str(out), *(["--data", _write(tmp_path, RESUME_DATA[stage]), f"init={init['init']}"]
                                        if stage in RESUME_DATA else []), "device=cpu", *RESUME_RUNS[stage]]
    if stage == "ppo":
        argv.append(f"reward_model={init['reward_model']}")
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    model = out / ("ppo" if stage == "pipeline" else ".") / "model.safetensors"
    before = model.stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and cap.err.strip() == ""
    assert f"{out} is complete" in cap.out and "nothing to resume" in cap.out, cap.out
    assert model.stat().st_mtime_ns == before  # not retrained


def test_resume_with_nothing_left_in_this_invocation(capsys, tmp_path):
    """stop_after reached, then --resume with the same stop_after: no step runs; a clear line, exit 0."""
    out = tmp_path / "out"
    argv = ["pretrain", "--out", str(out), "device=cpu", *RESUME_RUNS["pretrain"], "stop_after=2"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "no step" in cap.out and "2 of 3" in cap.out, cap.out
