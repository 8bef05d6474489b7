"""``rlhf-fast``: the InstructGPT stages on the rlhf_fast ops.

    rlhf-fast pipeline                      pretrain -> SFT -> reward model -> PPO-ptx on the built-in task
    rlhf-fast pretrain|sft|reward|ppo       one stage (each reads the previous stage's runs/<stage>/model.safetensors)

Options: --config FILE (.json/.toml), --data FILE (JSONL for that stage), --out DIR (default runs/<command>),
--resume (continue from <out>'s checkpoint), --threads N, then key=value overrides
(``steps=100``, ``model.n_layer=2``; in the pipeline ``ppo.iterations=10``). Multi-process: ``torchrun
--nproc_per_node=2 -m rlhf_fast.cli pretrain parallel=fsdp`` (gloo on CPU, nccl on CUDA; parallel=ddp|fsdp|auto,
see docs/distributed.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    from .train.config import STAGE_CONFIGS, keys_help  # no torch import: --help stays fast
    p = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"pipeline": "all four stages on the built-in task (or your data via <stage>.data=FILE)",
             "pretrain": "stage 1: next-token pretraining", "sft": "stage 2: supervised fine-tuning",
             "reward": "stage 3: reward model on preference pairs", "ppo": "stage 4: PPO-ptx against the reward model"}
    for name, h in helps.items():
        s = sub.add_parser(name, help=h, description=h, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"config keys (key=value overrides; type = default):\n{keys_help(STAGE_CONFIGS[name])}")
        s.add_argument("--config", help="a .json or .toml file of config values")
        if name != "pipeline":
            s.add_argument("--data", help="JSONL data for this stage (see rlhf_fast/train/data.py for the fields)")
        s.add_argument("--out", help=f"output folder (default runs/{name})")
        s.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
        s.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (default 1: the models are tiny and a shared CPU thrashes; 0 = torch's default)")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def _error(prefix: str, e: Exception) -> None:
    """One line per problem (a DataError holds several), no traceback."""
    for line in str(e).splitlines() or [type(e).__name__]:
        print(f"{prefix}: {line}", file=sys.stderr)


def _remove_empty_folders(top: str) -> None:
    for root, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):  # deepest first
        try:
            os.rmdir(root)  # fails, and keeps the folder, when anything is left in it
        except OSError:
            pass


def _progress(res: dict, cfg) -> tuple[int, int]:
    """(steps done, steps configured) of a stage's result; PPO counts iterations."""
    return (res["iterations"], cfg.iterations) if "iterations" in res else (res["steps"], cfg.steps)


def _mark_finished(out: str, res: dict | None) -> None:
    """<out>/result.json marks a stage run that reached its end (as the pipeline marks its stages); a run
    that stopped early (stop_after) removes a stale one."""
    import json
    path = os.path.join(out, "result.json")
    if res is None:
        if os.path.exists(path):
            os.remove(path)
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump({k: v for k, v in res.items() if k != "history"}, f, indent=1)


def _finished(command: str, out: str, rank0: bool, cfg) -> bool:
    """--resume of a run that already reached its end: say so (with its summary) instead of training. A
    stage resumed with more steps (iterations) than its finished run had is not finished: it continues."""
    import json

    from .train import pipeline
    stages = pipeline.STAGES if command == "pipeline" else (None,)
    done = [os.path.join(out, *([s] if s else []), "result.json") for s in stages]
    if not all(os.path.exists(p) for p in done):
        return False
    results = {}
    for p in done:
        with open(p) as f:
            r = json.load(f)
        results[r["stage"]] = r
    if command != "pipeline":
        steps, total = _progress(results[command], cfg)
        if steps < total:
            return False
    if rank0:
        r = results.get(command, {})
        n = r.get("iterations", r.get("steps"))
        detail = "every stage" if n is None else f"{'iteration' if 'iterations' in r else 'step'} {n} of {n}"
        print(f"[{command}] {out} is complete ({detail}): nothing to resume. Run without --resume (or with "
              "another --out) to train again.")
        print(pipeline.summary_table(results))
    return True


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from .train import pipeline
    from .train.config import STAGE_CONFIGS, load_config, to_dict
    from .train.metrics import plot_curves

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data={args.data}")
    try:
        cfg = load_config(STAGE_CONFIGS[args.command], args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        _error("rlhf-fast", e)
        return 2
    out = args.out or os.path.join("runs", args.command)
    # the stages create `out` only once their inputs have been read and checked; if a run still fails
    # on bad input, empty folders it created are removed (never a file, never a folder that was there)
    created = not os.path.exists(out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.resume and _finished(args.command, out, rank0, cfg):
        return 0
    t0 = time.time()
    try:
        if args.command == "pipeline":
            res = pipeline.run(cfg, out, resume=args.resume)
            if rank0:
                print("\n" + res["_table"])
                print(f"\npipeline wall time {time.time() - t0:.1f}s; metrics: {out}/metrics.jsonl"
                      + (f", curves: {res['_png']}" if res["_png"] else "") + f", summary: {out}/summary.json")
            return 0
        res = pipeline.modules_by_name()[args.command].train(cfg, out, resume=args.resume)
    except (ValueError, FileNotFoundError, ImportError) as e:
        _error(f"rlhf-fast {args.command}", e)
        if created:
            _remove_empty_folders(out)
        return 1
    steps, total = _progress(res, cfg)
    if res.get("first_loss") is None and not res.get("history"):  # resumed where this invocation ends
        if rank0:
            print(f"[{args.command}] no step to run: {out} is at step {steps} of {total} and stop_after="
                  f"{cfg.stop_after}; raise stop_after (0 = to the end) to continue")
        return 0
    if rank0:
        _mark_finished(out, res if steps >= total else None)
        res["seconds"] = time.time() - t0
        png = plot_curves([os.path.join(out, "metrics.jsonl")], os.path.join(out, "curves.png"))
        print(f"[{args.command}] done in {res['seconds']:.1f}s: {pipeline.stage_result_line(res)}")
        print(pipeline.summary_table({args.command: res}))
        print(f"metrics: {out}/metrics.jsonl" + (f", curves: {png}" if png else ""))
        import json
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
