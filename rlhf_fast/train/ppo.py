"""Stage 4, PPO-ptx (InstructGPT): the SFT policy is optimised against the reward model with a
per-token KL penalty to the frozen SFT reference, plus a pretraining-likelihood term.

One iteration:
  rollout   sample prompts; the policy generates (KV cache, temperature sampling); the RM scores the
            sequences; old log-probs, reference log-probs and critic values are recorded.
  rewards   r = rf.kl_penalized_rewards(score, logp, ref_logp, mask, beta=β): -β·KL per token, the
            score on the last response token; β fixed or adapted towards a KL target (Ziegler et al. 2019).
  advantage rf.gae(r, values, mask), then rf.masked_whiten over the batch.
  update    ppo_epochs passes over minibatches: rf.ppo_policy_loss - entropy_coef·H + ptx_coef·NLL(x_pretrain)
            for the policy, rf.ppo_value_loss for the critic (initialised from the RM).

loss_impl="linear" (default) computes the policy terms with rf.linear_ppo_loss on the policy's last
hidden states and its lm head, over the response tokens packed into one [N] axis (cu_seqlens): no
[B, T, V] logits and no padding in the update; the old and reference log-probs come from
rf.linear_logprobs. loss_impl="logits" is the same loss from materialised logits (for comparison).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import rlhf_fast as rf

from . import checkpoint
from .config import PPOConfig
from .data import builtin_prompts, corpus_tokens, left_pad, load_user_rows, shard, stream_batch
from .model import generate, sequence_scores
from .pretrain import lm_loss
from .runtime import StageState, all_mean, barrier, load_model, model_meta, progress, setup, unsharded, wrap


class KLController:
    """β for the KL penalty: fixed, or the adaptive controller of Ziegler et al. (2019):
    β ← β·(1 + clip(KL/target - 1, ±0.2)·n/horizon) after each batch of n sequences."""

    def __init__(self, init: float, target: float, horizon: int, adaptive: bool):
        self.value, self.target, self.horizon, self.adaptive = init, target, horizon, adaptive

    def update(self, kl: float, n: int):
        if self.adaptive:
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + err * n / self.horizon


@dataclass
class Rollout:
    seq: torch.Tensor        # [B, P + R] left-padded prompt, then response
    seq_mask: torch.Tensor   # [B, P + R]
    P: int                   # prompt width: response token t sits at column P + t
    mask: torch.Tensor       # [B, R] response tokens (up to and including EOS)
    logp: torch.Tensor       # [B, R] policy log-probs when sampled
    ref_logp: torch.Tensor
    values: torch.Tensor     # [B, R] critic values (None-free: zeros when no critic)
    score: torch.Tensor      # [B] RM score (no_eos_penalty for unfinished responses)
    true_reward: torch.Tensor  # [B] 1 = the right answer (nan when the row has no "answer")
    kl: torch.Tensor         # [B] Σ_t logp - ref_logp over the response


LOSS_IMPLS = ("linear", "logits")


def _head(model):
    return getattr(model, "module", model).output_head()  # (through DistributedDataParallel)


def response_logprobs(model, r: Rollout, temperature: float, return_entropy: bool = False, impl: str = "logits"):
    """Log-probs of the response tokens: logits at column P - 1 + t predict response token t
    (impl="linear": from the hidden states and the lm head, rf.linear_logprobs, no [B, R, V] logits)."""
    labels = r.seq[:, r.P:]
    if impl == "linear":
        hidden = model(r.seq, r.seq_mask, return_hidden=True)[:, r.P - 1:-1]
        weight, bias = _head(model)
        out = rf.linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), bias=bias,
                                 temperature=temperature, return_entropy=return_entropy)
        return tuple(o.view(labels.shape) for o in out) if return_entropy else out.view(labels.shape)
    logits = model(r.seq, r.seq_mask)[:, r.P - 1:-1]
    return rf.logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy)


def policy_loss(model, sub: Rollout, adv: torch.Tensor, cfg: PPOConfig):
    """pg_loss - entropy_coef·H over the response tokens -> (loss, stats: pg_loss, entropy, clipfrac, approx_kl).

    "linear": the valid response tokens of the minibatch packed into [N] (sequence i = row i's
    tokens, cu_seqlens), rf.linear_ppo_loss on their hidden states; "logits": rf.ppo_policy_loss on
    the log-probs of the materialised logits. Both take the token mean over the response tokens."""
    if cfg.loss_impl == "linear":
        valid = sub.mask.bool()
        hidden = model(sub.seq, sub.seq_mask, return_hidden=True)[:, sub.P - 1:-1][valid]  # [N, C]
        cu = torch.nn.functional.pad(valid.sum(1).cumsum(0), (1, 0))
        weight, bias = _head(model)
        loss, st = rf.linear_ppo_loss(hidden, weight, sub.seq[:, sub.P:][valid], sub.logp[valid], adv[valid],
                                      torch.ones_like(sub.logp[valid], dtype=torch.bool), bias=bias,
                                      entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
                                      clip_low=cfg.clip, cu_seqlens=cu)
        return loss, st
    logp, ent = response_logprobs(model, sub, cfg.temperature, return_entropy=True)
    pg_loss, st = rf.ppo_policy_loss(logp, sub.logp, adv, sub.mask, clip_low=cfg.clip)
    st["pg_loss"], st["entropy"] = pg_loss.detach(), rf.masked_mean(ent, sub.mask)
    return pg_loss - cfg.entropy_coef * st["entropy"], st


@torch.no_grad()
def rollout(policy, ref, rm, critic, rows: list[dict], tok, cfg: PPOConfig, device, gen, temperature=None) -> Rollout:
    temperature = cfg.temperature if temperature is None else temperature
    policy.eval()
    ids, pmask = left_pad([tok.encode(r["prompt"]) for r in rows], tok.pad_id)
    ids, pmask = ids.to(device), pmask.to(device)
    with unsharded(policy):  # FSDP: gathered once, then the ranks may sample different lengths
        resp, mask = generate(policy, ids, pmask, cfg.max_new_tokens, tok.eos_id, tok.pad_id, temperature,
                              gen if temperature > 0 else None)
    policy.train()
    seq, seq_mask, P = torch.cat([ids, resp], 1), torch.cat([pmask, mask], 1), ids.shape[1]
    r = Rollout(seq, seq_mask, P, mask, *(None,) * 6)
    t = cfg.temperature
    r.logp = response_logprobs(policy, r, t, impl=cfg.loss_impl)
    r.ref_logp = response_logprobs(ref, r, t, impl=cfg.loss_impl)
    r.values = critic(seq, seq_mask)[:, P - 1:-1] if critic is not None else torch.zeros_like(r.logp)
    finished = ((resp == tok.eos_id) & mask.bool()).any(1)
    r.score = torch.where(finished, sequence_scores(rm, seq, seq_mask), torch.full_like(r.logp[:, 0], cfg.no_eos_penalty))
    said = [tok.decode(x.tolist()).split("\n")[0].strip() for x in resp]
    r.true_reward = torch.tensor([float(s == row["answer"].strip()) if "answer" in row else float("nan")
                                  for s, row in zip(said, rows)], device=device)
    r.kl = (rf.kl(r.logp, r.ref_logp, estimator="k1") * mask).sum(1)
    return r


def _mean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return x.mean().item() if x.numel() else float("nan")


@torch.no_grad()
def evaluate(policy, ref, rm, rows, tok, cfg, device, gen, repeats: int = 8) -> dict:
    """Sampled (at cfg.temperature, ``repeats`` answers per prompt) and greedy answers on ``rows``: true
    accuracy, RM score, KL to the reference, and how often the answer is a question ("asks_back")."""
    if not rows:
        return {}
    sampled = rollout(policy, ref, rm, None, rows * repeats, tok, cfg, device, gen)
    greedy = rollout(policy, ref, rm, None, rows, tok, cfg, device, gen, temperature=0.0)
    said = [tok.decode(x.tolist()).split("\n")[0].strip() for x in sampled.seq[:, sampled.P:]]
    return {"acc_sampled": _mean(sampled.true_reward), "acc_greedy": _mean(greedy.true_reward),
            "score": _mean(sampled.score), "kl": _mean(sampled.kl),
            "asks_back": sum(s.endswith("?") for s in said) / len(said)}


def train(cfg: PPOConfig, out: str = "runs/ppo", resume: bool = False) -> dict:
    if cfg.loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {cfg.loss_impl!r}")
    d = setup(cfg.device)
    if cfg.rollout_size % d.world or cfg.minibatch_size % d.world:
        raise ValueError(f"rollout_size={cfg.rollout_size} and minibatch_size={cfg.minibatch_size} must split "
                         f"evenly over {d.world} processes")
    torch.manual_seed(cfg.seed)
    policy, tok = load_model(cfg.init, "lm", d.device)
    ref, _ = load_model(cfg.init, "lm", d.device)
    rm, _ = load_model(cfg.reward_model, "value", d.device)
    critic, _ = load_model(cfg.reward_model, "value", d.device)  # the critic starts from the RM (InstructGPT)
    for m in (ref, rm):
        m.requires_grad_(False).eval()
    T = policy.cfg.block_size
    if cfg.data:
        train_rows, eval_rows = load_user_rows(cfg.data, "ppo", tok, T, cfg.eval_frac, cfg.seed)
    else:
        train_rows, eval_rows = builtin_prompts("train"), builtin_prompts("eval")
    ptx_data = corpus_tokens(cfg.pretrain_data, tok, T, cfg.seed) if cfg.ptx_coef else None

    # DDP / FSDP / as is; FSDP shards the frozen reference and reward model too (no optimizer state)
    net_policy, net_critic = wrap(d, [policy, critic], frozen=[ref, rm], parallel=cfg.parallel,
                                  mixed_precision=cfg.mixed_precision)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    opt_critic = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.95), weight_decay=0.0)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
    data_gen = torch.Generator().manual_seed(cfg.seed)                        # prompts, minibatches, ptx windows
    sample_gen = torch.Generator(device=d.device).manual_seed(cfg.seed + d.rank)  # token sampling
    eval_gen = torch.Generator(device=d.device).manual_seed(cfg.seed + 1000)
    gens = {"data": data_gen, "sample": sample_gen}
    run = StageState(out, "ppo", d, {"policy": policy, "critic": critic}, {"policy": opt, "critic": opt_critic}, gens)
    state = run.restore(resume)
    it, kl_ctl.value = state["step"], state.get("kl_coef", kl_ctl.value)
    log = run.log
    before = {"eval": evaluate(policy, ref, rm, eval_rows, tok, cfg, d.device, eval_gen.manual_seed(cfg.seed + 1000)),
              "train": evaluate(policy, ref, rm, train_rows, tok, cfg, d.device, eval_gen.manual_seed(cfg.seed + 2000), 2)}

    end = min(cfg.iterations, cfg.stop_after) if cfg.stop_after else cfg.iterations
    bar = progress(end, "ppo", d, initial=it)
    history = []
    while it < end:
        # ---- rollout: every rank draws the same global prompt list and keeps its slice
        pick = torch.randint(len(train_rows), (cfg.rollout_size,), generator=data_gen)
        rows = [train_rows[i] for i in shard(pick, d.rank, d.world).tolist()]
        r = rollout(policy, ref, rm, critic, rows, tok, cfg, d.device, sample_gen)
        rewards = rf.kl_penalized_rewards(r.score, r.logp, r.ref_logp, r.mask, beta=kl_ctl.value)
        adv, ret = rf.gae(rewards, r.values, r.mask, gamma=cfg.gamma, lam=cfg.lam)
        adv = rf.masked_whiten(adv, r.mask)

        # ---- PPO epochs over minibatches
        B, mb = len(rows), cfg.minibatch_size // d.world
        stats = {"pg_loss": 0.0, "vf_loss": 0.0, "entropy": 0.0, "ptx_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
        n_updates = 0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=data_gen)
            for s in range(0, B, mb):
                i = perm[s:s + mb].to(d.device)
                sub = Rollout(r.seq[i], r.seq_mask[i], r.P, r.mask[i], r.logp[i], r.ref_logp[i], r.values[i],
                              r.score[i], r.true_reward[i], r.kl[i])
                loss, pg_stats = policy_loss(net_policy, sub, adv[i], cfg)
                pg_loss, entropy = pg_stats["pg_loss"], pg_stats["entropy"]
                if ptx_data is not None:  # PPO-ptx: keep the pretraining likelihood up
                    starts = torch.randint(len(ptx_data) - T - 1, (cfg.ptx_batch_size,), generator=data_gen)
                    ptx_loss = lm_loss(net_policy, stream_batch(ptx_data, shard(starts, d.rank, d.world), T).to(d.device))
                    loss = loss + cfg.ptx_coef * ptx_loss
                    stats["ptx_loss"] += ptx_loss.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                opt.step()

                values = net_critic(sub.seq, sub.seq_mask)[:, r.P - 1:-1]
                vf_loss, _ = rf.ppo_value_loss(values, sub.values, ret[i], sub.mask, clip=cfg.value_clip or None)
                opt_critic.zero_grad(set_to_none=True)
                vf_loss.backward()
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
                opt_critic.step()

                stats["pg_loss"] += pg_loss.item()
                stats["vf_loss"] += vf_loss.item()
                stats["entropy"] += entropy.item()
                stats["clipfrac"] += float(pg_stats["clipfrac"])
                stats["approx_kl"] += float(pg_stats["approx_kl"])
                n_updates += 1
        it += 1
        kl_mean = all_mean(r.kl.mean().item(), d)
        kl_ctl.update(kl_mean, cfg.rollout_size)
        metrics = {k: all_mean(v / n_updates, d) for k, v in stats.items()}
        metrics.update(mean_score=all_mean(r.score.mean().item(), d), true_reward=all_mean(_mean(r.true_reward), d),
                       kl=kl_mean, kl_coef=kl_ctl.value, response_len=all_mean(r.mask.sum(1).float().mean().item(), d))
        history.append(metrics)
        log.log(it, **metrics)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['mean_score']:.2f}", acc=f"{metrics['true_reward']:.2f}", kl=f"{kl_mean:.2f}")
        if it % cfg.save_every == 0 or it == end:
            run.save(it, kl_coef=kl_ctl.value)
    bar.close()
    after = {"eval": evaluate(policy, ref, rm, eval_rows, tok, cfg, d.device, eval_gen.manual_seed(cfg.seed + 1000)),
             "train": evaluate(policy, ref, rm, train_rows, tok, cfg, d.device, eval_gen.manual_seed(cfg.seed + 2000), 2)}
    for split in ("eval", "train"):
        log.log(it, **{f"{split}_{k}": v for k, v in after[split].items()})
    if it >= cfg.iterations:  # every rank: FSDP gathers the full weights
        checkpoint.save_model(os.path.join(out, "model.safetensors"), policy,
                              model_meta(policy, "ppo", {"step": it}))
    log.close()
    barrier(d)
    return {"stage": "ppo", "iterations": it, "before": before, "after": after, "history": history,
            "kl_coef": kl_ctl.value}
