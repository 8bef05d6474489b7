"""Stage 2, supervised fine-tuning: cross-entropy on the response tokens only
(rf.logprobs with ignore_index=-100 on the prompt and padding), starting from the pretrained model.

Reported: answer accuracy on held-out prompts (greedy decoding) before and after.
"""
from __future__ import annotations

import os

import torch

import rlhf_fast as rf

from . import checkpoint
from .config import SFTConfig
from .data import builtin_sft, load_user_rows, sft_batch, shard
from .runtime import (StageState, adamw, all_mean, answer_accuracy, barrier, load_model, lr_at, model_meta, progress, set_lr,
                      setup, wrap)


def sft_loss(model, batch, device) -> torch.Tensor:
    """Mean -log p over the response tokens of a right-padded batch."""
    ids, mask, labels = batch.ids.to(device), batch.mask.to(device), batch.labels.to(device)
    logp = rf.logprobs(model(ids, mask), labels, ignore_index=-100)
    return -(logp.sum() / (labels != -100).sum())


def train(cfg: SFTConfig, out: str = "runs/sft", resume: bool = False) -> dict:
    d = setup(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.init, "lm", d.device)
    T = model.cfg.block_size
    if cfg.data:
        train_rows, eval_rows = load_user_rows(cfg.data, "sft", tok, T, cfg.eval_frac, cfg.seed)
    else:
        train_rows, eval_rows = builtin_sft("train"), builtin_sft("eval")
    (net,) = wrap(d, [model], parallel=cfg.parallel, mixed_precision=cfg.mixed_precision)  # DDP / FSDP / as is
    opt = adamw(model, cfg.lr, cfg.weight_decay)  # after wrap: FSDP's parameters are the shards
    gen = torch.Generator().manual_seed(cfg.seed)
    run = StageState(out, "sft", d, {"model": model}, {"opt": opt}, {"data": gen})
    step = run.restore(resume)["step"]
    log = run.log
    acc_before = answer_accuracy(model, eval_rows, tok, d.device)
    eval_batch = sft_batch(eval_rows, tok) if eval_rows else None  # eval_frac=0: no held-out rows

    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    bar = progress(end, "sft", d, initial=step)
    first_loss = loss_val = None
    while step < end:
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup))
        pick = torch.randint(len(train_rows), (cfg.batch_size,), generator=gen)
        batch = sft_batch([train_rows[i] for i in shard(pick, d.rank, d.world).tolist()], tok)
        loss = sft_loss(net, batch, d.device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_val = all_mean(loss.item(), d)
        first_loss = loss_val if first_loss is None else first_loss
        metrics = {"loss": loss_val, "lr": opt.param_groups[0]["lr"]}
        if eval_batch is not None and (step % 50 == 0 or step == cfg.steps):
            with torch.no_grad():
                model.eval()
                metrics["eval_loss"] = sft_loss(model, eval_batch, d.device).item()
                model.train()
        log.log(step, **metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}")
        if step % cfg.save_every == 0 or step == end:
            run.save(step)
    bar.close()
    acc_after = answer_accuracy(model, eval_rows, tok, d.device)
    train_acc = answer_accuracy(model, train_rows, tok, d.device)
    log.log(step, eval_acc=acc_after, train_acc=train_acc)
    if step >= cfg.steps:  # every rank: FSDP gathers the full weights
        checkpoint.save_model(os.path.join(out, "model.safetensors"), model,
                              model_meta(model, "sft", {"step": step}))
    log.close()
    barrier(d)
    return {"stage": "sft", "steps": step, "first_loss": first_loss, "last_loss": loss_val,
            "eval_acc_before": acc_before, "eval_acc_after": acc_after, "train_acc_after": train_acc}
