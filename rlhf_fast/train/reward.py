"""Stage 3, reward model: the SFT model's body with a scalar value head, trained on preference pairs
with the Bradley-Terry loss rf.pairwise_reward_loss(score(chosen), score(rejected), margin).
The score of a sequence is the value head at its last token (the EOS).

Reported: pairwise accuracy (score(chosen) > score(rejected)) on held-out pairs.
"""
from __future__ import annotations

import os

import torch

import rlhf_fast as rf

from . import checkpoint
from .config import RewardConfig
from .data import builtin_preferences, load_user_rows, pair_batch, shard
from .model import sequence_scores
from .runtime import StageState, adamw, all_mean, barrier, load_model, lr_at, model_meta, progress, set_lr, setup, wrap


def pair_scores(model, rows, tok, device):
    chosen, rejected = pair_batch(rows, tok)
    return (sequence_scores(model, chosen.ids.to(device), chosen.mask.to(device)),
            sequence_scores(model, rejected.ids.to(device), rejected.mask.to(device)))


@torch.no_grad()
def pairwise_accuracy(model, rows, tok, device, batch_size: int = 256) -> float:
    if not rows:  # eval_frac=0
        return float("nan")
    model.eval()
    right = 0
    for i in range(0, len(rows), batch_size):
        sc, sr = pair_scores(model, rows[i:i + batch_size], tok, device)
        right += (sc > sr).sum().item()
    model.train()
    return right / len(rows)


def train(cfg: RewardConfig, out: str = "runs/reward", resume: bool = False) -> dict:
    d = setup(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.init, "value", d.device)
    if cfg.data:
        train_rows, eval_rows = load_user_rows(cfg.data, "reward", tok, model.cfg.block_size, cfg.eval_frac, cfg.seed)
    else:
        train_rows, eval_rows = builtin_preferences("train", cfg.seed), builtin_preferences("eval", cfg.seed)
    # does the preference generalise? pairs about countries no stage trained on (built-in task only)
    new_rows = [] if cfg.data else builtin_preferences("new_countries", cfg.seed)
    new_wrong = [] if cfg.data else builtin_preferences("new_countries_wrong", cfg.seed)
    (net,) = wrap(d, [model], parallel=cfg.parallel, mixed_precision=cfg.mixed_precision)  # DDP / FSDP / as is
    opt = adamw(model, cfg.lr, cfg.weight_decay)  # after wrap: FSDP's parameters are the shards
    gen = torch.Generator().manual_seed(cfg.seed)
    run = StageState(out, "reward", d, {"model": model}, {"opt": opt}, {"data": gen})
    step = run.restore(resume)["step"]
    log = run.log
    acc_before = pairwise_accuracy(model, eval_rows, tok, d.device)
    margin = cfg.margin or None

    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    bar = progress(end, "reward", d, initial=step)
    first_loss = loss_val = None
    while step < end:
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup))
        pick = torch.randint(len(train_rows), (cfg.batch_size,), generator=gen)
        sc, sr = pair_scores(net, [train_rows[i] for i in shard(pick, d.rank, d.world).tolist()], tok, d.device)
        loss = rf.pairwise_reward_loss(sc, sr, margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_val = all_mean(loss.item(), d)
        first_loss = loss_val if first_loss is None else first_loss
        metrics = {"loss": loss_val, "acc": all_mean((sc > sr).float().mean().item(), d),
                   "lr": opt.param_groups[0]["lr"]}
        if step % 50 == 0 or step == cfg.steps:
            metrics["eval_acc"] = pairwise_accuracy(model, eval_rows, tok, d.device)
        log.log(step, **metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}")
        if step % cfg.save_every == 0 or step == end:
            run.save(step)
    bar.close()
    acc_after = pairwise_accuracy(model, eval_rows, tok, d.device)
    acc_new = pairwise_accuracy(model, new_rows, tok, d.device) if new_rows else None
    acc_wrong = pairwise_accuracy(model, new_wrong, tok, d.device) if new_wrong else None
    log.log(step, eval_acc=acc_after, **({"new_countries_acc": acc_new, "new_countries_wrong_acc": acc_wrong}
                                         if new_rows else {}))
    if step >= cfg.steps:  # every rank: FSDP gathers the full weights
        checkpoint.save_model(os.path.join(out, "model.safetensors"), model,
                              model_meta(model, "reward", {"step": step}))
    log.close()
    barrier(d)
    return {"stage": "reward", "steps": step, "first_loss": first_loss, "last_loss": loss_val,
            "eval_acc_before": acc_before, "eval_acc_after": acc_after, "new_countries_acc": acc_new,
            "new_countries_wrong_acc": acc_wrong}
