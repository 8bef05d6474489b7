"""The InstructGPT pipeline: pretrain -> SFT -> reward model -> PPO-ptx, each stage in <out>/<stage>/,
each starting from the previous stage's model.safetensors. Ends with a summary table, summary.json,
all metrics in <out>/metrics.jsonl and the curves in <out>/curves.png."""
from __future__ import annotations

import json
import os
import time

from . import ppo, pretrain, reward, sft
from .config import PipelineConfig, to_dict
from .data import CharTokenizer, DataError, load_user_rows
from .metrics import plot_curves, read_jsonl

STAGES = ("pretrain", "sft", "reward", "ppo")


def modules_by_name() -> dict:
    return {"pretrain": pretrain, "sft": sft, "reward": reward, "ppo": ppo}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def summary_table(results: dict) -> str:
    rows = []
    if "pretrain" in results:
        r = results["pretrain"]
        rows.append(("pretrain", "loss (first -> last step)", r["first_loss"], r["last_loss"]))
        rows.append(("pretrain", "held-out loss", r["eval_loss_before"], r["eval_loss_after"]))
    if "sft" in results:
        r = results["sft"]
        rows.append(("sft", "held-out answer accuracy (greedy)", r["eval_acc_before"], r["eval_acc_after"]))
    if "reward" in results:
        r = results["reward"]
        rows.append(("reward", "held-out pairwise accuracy", r["eval_acc_before"], r["eval_acc_after"]))
        if r.get("new_countries_acc") is not None:
            rows.append(("reward", "held-out countries: answer vs question back", None, r["new_countries_acc"]))
        if r.get("new_countries_wrong_acc") is not None:
            rows.append(("reward", "held-out countries: right vs wrong capital", None, r["new_countries_wrong_acc"]))
    if "ppo" in results:
        b, a = results["ppo"]["before"], results["ppo"]["after"]
        for split, name in (("train", "train prompts"), ("eval", "held-out prompts")):
            if b.get(split):
                rows.append(("ppo", f"{name}: accuracy (sampled)", b[split]["acc_sampled"], a[split]["acc_sampled"]))
                rows.append(("ppo", f"{name}: accuracy (greedy)", b[split]["acc_greedy"], a[split]["acc_greedy"]))
                rows.append(("ppo", f"{name}: answers that ask back", b[split].get("asks_back"),
                             a[split].get("asks_back")))
                rows.append(("ppo", f"{name}: mean RM score", b[split]["score"], a[split]["score"]))
                rows.append(("ppo", f"{name}: KL to SFT (nats/seq)", b[split]["kl"], a[split]["kl"]))
    w = max(len(r[1]) for r in rows) if rows else 10
    lines = [f"{'stage':<9}{'metric':<{w + 2}}{'before':>9}{'after':>9}", "-" * (w + 29)]
    lines += [f"{s:<9}{m:<{w + 2}}{_fmt(x):>9}{_fmt(y):>9}" for s, m, x, y in rows]
    return "\n".join(lines)


def validate_data(cfg: PipelineConfig) -> None:
    """Check every user data file of the pipeline with the tokenizer and context the stages will use
    (the character tokenizer and cfg.pretrain.model.block_size); raises DataError listing all problems."""
    tok, T = CharTokenizer(), cfg.pretrain.model.block_size
    problems, seen = [], set()
    for stage, path, eval_frac, seed in (("pretrain", cfg.pretrain.data, 0.0, 0),
                                         ("sft", cfg.sft.data, cfg.sft.eval_frac, cfg.sft.seed),
                                         ("reward", cfg.reward.data, cfg.reward.eval_frac, cfg.reward.seed),
                                         ("ppo", cfg.ppo.data, cfg.ppo.eval_frac, cfg.ppo.seed),
                                         ("pretrain", cfg.ppo.pretrain_data, 0.0, 0)):
        if not path or (stage, path) in seen:
            continue
        seen.add((stage, path))
        try:
            load_user_rows(path, stage, tok, T, eval_frac, seed)
        except DataError as e:
            problems += e.problems
    if problems:
        raise DataError(problems)


def run(cfg: PipelineConfig, out: str = "runs/pipeline", resume: bool = False, stages=STAGES) -> dict:
    cfgs = {"pretrain": cfg.pretrain, "sft": cfg.sft, "reward": cfg.reward, "ppo": cfg.ppo}
    for c in cfgs.values():
        for key in ("device", "parallel", "mixed_precision"):
            if getattr(cfg, key) != "auto":
                setattr(c, key, getattr(cfg, key))
        c.seed += cfg.seed
    # chain the stages through <out>/<stage>/model.safetensors
    cfg.sft.init = os.path.join(out, "pretrain", "model.safetensors")
    cfg.reward.init = os.path.join(out, "sft", "model.safetensors")
    cfg.ppo.init = cfg.reward.init
    cfg.ppo.reward_model = os.path.join(out, "reward", "model.safetensors")
    if not cfg.ppo.pretrain_data:
        cfg.ppo.pretrain_data = cfg.pretrain.data
    validate_data(cfg)  # a bad file fails now, not after the stages before it have trained
    modules = modules_by_name()
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes and prints
    results, times = {}, {}
    for stage in stages:
        stage_out = os.path.join(out, stage)
        done = os.path.join(stage_out, "result.json")
        if resume and os.path.exists(done):  # finished before the interruption
            with open(done) as f:
                results[stage] = json.load(f)
            continue
        t0 = time.time()
        results[stage] = modules[stage].train(cfgs[stage], stage_out, resume=resume)
        times[stage] = results[stage]["seconds"] = time.time() - t0
        if main:
            print(f"[{stage}] done in {times[stage]:.1f}s: {stage_result_line(results[stage])}", flush=True)
            with open(done, "w") as f:
                json.dump(results[stage], f, indent=1)
    results["_table"] = summary_table(results)
    results["_png"] = None
    if not main:
        return results
    paths = [os.path.join(out, s, "metrics.jsonl") for s in stages]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for p in paths:
            if os.path.exists(p):
                f.writelines(json.dumps(r) + "\n" for r in read_jsonl(p))
    png = plot_curves(paths, os.path.join(out, "curves.png"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"config": to_dict(cfg), "results": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                                                       for k, v in results.items() if not k.startswith("_")}},
                  f, indent=1)
    results["_png"] = png
    return results


def stage_result_line(r: dict) -> str:
    if r["stage"] == "pretrain":
        return f"loss {_fmt(r['first_loss'])} -> {_fmt(r['last_loss'])}, held-out loss {r['eval_loss_after']:.3f}"
    if r["stage"] == "sft":
        return f"held-out accuracy {r['eval_acc_before']:.2f} -> {r['eval_acc_after']:.2f}"
    if r["stage"] == "reward":
        return f"held-out pairwise accuracy {r['eval_acc_before']:.2f} -> {r['eval_acc_after']:.2f}"
    b, a = r["before"]["train"], r["after"]["train"]
    line = (f"train-prompt accuracy {b['acc_sampled']:.2f} -> {a['acc_sampled']:.2f}, RM score "
            f"{b['score']:.2f} -> {a['score']:.2f}, KL {a['kl']:.2f}")
    if r["before"].get("eval"):
        b, a = r["before"]["eval"], r["after"]["eval"]
        line += (f"; held-out prompts: accuracy {b['acc_sampled']:.2f} -> {a['acc_sampled']:.2f} (sampled), "
                 f"{b['acc_greedy']:.2f} -> {a['acc_greedy']:.2f} (greedy), KL {a['kl']:.2f}")
    return line
