"""Stage 1, pretraining: next-token cross-entropy on a text stream, loss = mean(-rf.logprobs(...)).

Batches are random windows of the token stream drawn from a seeded generator whose state is saved
in the checkpoint, so ``--resume`` continues with exactly the batches an uninterrupted run would see.
Under torchrun every rank draws the same global batch and keeps its own slice of it.
"""
from __future__ import annotations

import os

import torch

import rlhf_fast as rf

from . import checkpoint
from .config import PretrainConfig
from .data import CharTokenizer, corpus_tokens, shard, stream_batch
from .model import Transformer
from .runtime import StageState, adamw, all_mean, barrier, lr_at, model_meta, progress, set_lr, setup, wrap


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of windows x [B, T + 1]."""
    logits = model(x[:, :-1])
    return -rf.logprobs(logits, x[:, 1:]).mean()


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    losses = [lm_loss(model, windows[i:i + batch_size]).item() * len(windows[i:i + batch_size])
              for i in range(0, len(windows), batch_size)]
    model.train()
    return sum(losses) / len(windows)


def train(cfg: PretrainConfig, out: str = "runs/pretrain", resume: bool = False) -> dict:
    d = setup(cfg.device)
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({d.world})")
    torch.manual_seed(cfg.seed)
    tok = CharTokenizer()
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    T = cfg.model.block_size
    data = corpus_tokens(cfg.data, tok, T, cfg.seed)
    n_val = max(T + 2, len(data) // 20)  # last 5% of the stream for evaluation
    train_data, val_data = data[:-n_val], data[-n_val:]
    if len(train_data) <= T + 1:
        raise ValueError(f"pretraining corpus too small: {len(data)} tokens for block_size={T}")
    val_starts = torch.randint(len(val_data) - T - 1, (128,), generator=torch.Generator().manual_seed(0))
    val_windows = stream_batch(val_data, val_starts, T).to(d.device)

    model = Transformer(cfg.model, head="lm").to(d.device)
    (net,) = wrap(d, [model], parallel=cfg.parallel, mixed_precision=cfg.mixed_precision)  # DDP / FSDP / as is
    opt = adamw(model, cfg.lr, cfg.weight_decay)  # after wrap: FSDP's parameters are the shards
    gen = torch.Generator().manual_seed(cfg.seed)  # the data order
    run = StageState(out, "pretrain", d, {"model": model}, {"opt": opt}, {"data": gen})
    step = run.restore(resume)["step"]
    log = run.log
    first_eval = eval_loss(model, val_windows)
    if step == 0:
        log.log(0, eval_loss=first_eval)

    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    bar = progress(end, "pretrain", d, initial=step)
    first_loss = loss_val = None
    while step < end:
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup))
        starts = torch.randint(len(train_data) - T - 1, (cfg.batch_size,), generator=gen)
        x = stream_batch(train_data, shard(starts, d.rank, d.world), T).to(d.device)
        loss = lm_loss(net, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_val = all_mean(loss.item(), d)
        first_loss = loss_val if first_loss is None else first_loss
        metrics = {"loss": loss_val, "lr": opt.param_groups[0]["lr"]}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["eval_loss"] = eval_loss(model, val_windows)
        log.log(step, **metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}")
        if step % cfg.save_every == 0 or step == end:
            run.save(step)
    bar.close()
    last_eval = eval_loss(model, val_windows)
    if step >= cfg.steps:  # every rank: FSDP gathers the full weights
        checkpoint.save_model(os.path.join(out, "model.safetensors"), model,
                              model_meta(model, "pretrain", {"step": step}))
    log.close()
    barrier(d)
    return {"stage": "pretrain", "steps": step, "first_loss": first_loss, "last_loss": loss_val,
            "eval_loss_before": first_eval, "eval_loss_after": last_eval}
