"""Typed configs for the four stages: dataclass defaults < a JSON/TOML file < ``key=value`` overrides.

Nested fields are addressed with dots (``model.n_layer=2``, in the pipeline ``ppo.kl_target=4``).
Values are parsed by the field's declared type, so a typo in a key or a bad value fails loudly.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


def opt(default, help: str):
    """A config field and its one-line meaning, which ``rlhf-fast <stage> --help`` lists."""
    if isinstance(default, type):  # a nested section
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    vocab_size: int = opt(98, "embedding rows (the built-in character tokenizer has 98 symbols)")
    block_size: int = opt(64, "context length in tokens (prompt + response must fit)")
    n_layer: int = opt(2, "transformer blocks")
    n_head: int = opt(4, "attention heads (d_model must be a multiple)")
    d_model: int = opt(128, "hidden width")
    rope_base: float = opt(10000.0, "RoPE base frequency")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")


_INIT = "a checkpoint, or hf:/local/folder for a transformers model"
_SEED = "seed of the data order, initialisation and sampling"
_DEVICE = "auto (cuda when available), cpu, cuda, cuda:1, ..."
_PARALLEL = ("under torchrun: ddp (a full replica per rank), fsdp (FSDP2: parameters, gradients and optimizer "
             "state sharded over the ranks), auto (ddp while a replica fits in a quarter of a rank's memory, else fsdp)")
_MP = "fsdp only: bf16 (bf16 parameters, fp32 reduction and master weights), fp32, auto (bf16 on CUDA, fp32 on CPU)"
_STOP = "end this run after this many steps (0 = run to the end); continue later with --resume"


@dataclass
class PretrainConfig:
    model: ModelConfig = opt(ModelConfig, "the model's shape")
    data: str = opt("", 'JSONL with {"text"} per line; "" = the built-in capitals corpus')
    steps: int = opt(500, "optimizer steps")
    batch_size: int = opt(32, "windows of block_size tokens per step")
    lr: float = opt(3e-3, "peak learning rate (AdamW)")
    min_lr: float = opt(3e-4, "learning rate at the end of the cosine decay")
    warmup: int = opt(30, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    eval_every: int = opt(100, "steps between held-out loss evaluations")
    save_every: int = opt(200, "steps between resumable checkpoints")
    stop_after: int = opt(0, _STOP)
    seed: int = opt(1234, _SEED)
    device: str = opt("auto", _DEVICE)
    parallel: str = opt("auto", _PARALLEL)
    mixed_precision: str = opt("auto", _MP)


@dataclass
class SFTConfig:
    init: str = opt("runs/pretrain/model.safetensors", f"starting model: {_INIT}")
    data: str = opt("", 'JSONL with {"prompt", "response"}; "" = the built-in capital questions')
    steps: int = opt(100, "optimizer steps")
    batch_size: int = opt(32, "demonstrations per step")
    lr: float = opt(3e-4, "peak learning rate (gentle: higher memorises the training answers and forgets the rest)")
    min_lr: float = opt(3e-5, "learning rate at the end of the cosine decay")
    warmup: int = opt(5, "linear warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    eval_frac: float = opt(0.1, "fraction of a data file held out for evaluation (0 = none; "
                                "built-in: the held-out countries)")
    save_every: int = opt(100, "steps between resumable checkpoints")
    stop_after: int = opt(0, _STOP)
    seed: int = opt(1235, _SEED)
    device: str = opt("auto", _DEVICE)
    parallel: str = opt("auto", _PARALLEL)
    mixed_precision: str = opt("auto", _MP)


@dataclass
class RewardConfig:
    init: str = opt("runs/sft/model.safetensors",
                    f"starting body, a new scalar head on it (InstructGPT: the SFT model): {_INIT}")
    data: str = opt("", 'JSONL with {"prompt", "chosen", "rejected"}; "" = the built-in pairs')
    steps: int = opt(150, "optimizer steps")
    batch_size: int = opt(32, "preference pairs per step")
    lr: float = opt(2e-4, "peak learning rate")
    min_lr: float = opt(2e-5, "learning rate at the end of the cosine decay")
    warmup: int = opt(10, "linear warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    margin: float = opt(0.0, "Bradley-Terry margin: loss = -log sigmoid(s_chosen - s_rejected - margin) (0 = none)")
    eval_frac: float = opt(0.1, "fraction of a data file held out for evaluation (0 = none)")
    save_every: int = opt(100, "steps between resumable checkpoints")
    stop_after: int = opt(0, _STOP)
    seed: int = opt(1236, _SEED)
    device: str = opt("auto", _DEVICE)
    parallel: str = opt("auto", _PARALLEL)
    mixed_precision: str = opt("auto", _MP)


@dataclass
class PPOConfig:
    init: str = opt("runs/sft/model.safetensors", f"policy start and frozen KL reference: {_INIT}")
    reward_model: str = opt("runs/reward/model.safetensors", "the reward model, also the critic's start")
    data: str = opt("", 'JSONL with {"prompt"} (+ optional "answer": the true reward for reporting); "" = built-in')
    pretrain_data: str = opt("", 'ptx corpus, JSONL with {"text"}; "" = the built-in corpus')
    iterations: int = opt(30, "rollout + update rounds")
    rollout_size: int = opt(64, "prompts per rollout")
    minibatch_size: int = opt(32, "sequences per gradient step")
    ppo_epochs: int = opt(4, "passes over each rollout")
    max_new_tokens: int = opt(16, "longest response sampled")
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same)")
    lr: float = opt(5e-5, "policy learning rate (3e-4 already over-optimises the RM)")
    critic_lr: float = opt(1e-3, "critic learning rate")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    clip: float = opt(0.2, "PPO ratio clip epsilon")
    value_clip: float = opt(0.2, "value clip around the rollout values (0 = none)")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient")
    loss_impl: str = opt("linear", 'policy loss: "linear" (rf.linear_ppo_loss on the packed hidden states) or '
                                   '"logits" (rf.ppo_loss_from_logits on materialised logits)')
    ptx_coef: float = opt(0.5, "PPO-ptx: loss += ptx_coef * pretraining NLL (0 = off)")
    ptx_batch_size: int = opt(16, "pretraining windows per update (ptx)")
    kl_coef: float = opt(0.2, "initial beta of the per-token KL penalty to the reference")
    adaptive_kl: bool = opt(True, "adapt beta towards kl_target (Ziegler et al. 2019)")
    kl_target: float = opt(1.0, "target KL to the reference, nats per sequence")
    kl_horizon: int = opt(500, "sequences over which the adaptive controller moves beta")
    no_eos_penalty: float = opt(-1.0, "score given to responses that never emit EOS")
    eval_frac: float = opt(0.1, "fraction of a data file held out for evaluation (0 = none)")
    save_every: int = opt(10, "iterations between resumable checkpoints")
    stop_after: int = opt(0, _STOP)
    seed: int = opt(1237, _SEED)
    device: str = opt("auto", _DEVICE)
    parallel: str = opt("auto", _PARALLEL)
    mixed_precision: str = opt("auto", _MP)


@dataclass
class PipelineConfig:
    pretrain: PretrainConfig = opt(PretrainConfig, "stage 1")
    sft: SFTConfig = opt(SFTConfig, "stage 2")
    reward: RewardConfig = opt(RewardConfig, "stage 3")
    ppo: PPOConfig = opt(PPOConfig, "stage 4")
    device: str = opt("auto", f"applied to every stage: {_DEVICE}")
    parallel: str = opt("auto", "applied to every stage unless auto: ddp, fsdp, auto")
    mixed_precision: str = opt("auto", "applied to every stage unless auto: bf16, fp32, auto")
    seed: int = opt(0, "added to every stage's seed (runs with other seeds: seed=1, seed=2, ...)")


STAGE_CONFIGS = {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig,
                 "pipeline": PipelineConfig}


def _parse(value: str, typ: Any, key: str):
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    try:
        if typ is bool:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        return value
    except ValueError:
        raise ValueError(f"config override {key}={value!r}: expected a {typ.__name__}") from None


def _set(cfg, key: str, value, *, from_string: bool, path: str = ""):
    head, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    full = f"{path}{head}"
    if head not in fields:
        raise ValueError(f"unknown config key {full!r} for {type(cfg).__name__}; known: {', '.join(fields)}")
    cur = getattr(cfg, head)
    if dataclasses.is_dataclass(cur):
        if rest:
            return _set(cur, rest, value, from_string=from_string, path=full + ".")
        if not isinstance(value, dict):
            raise ValueError(f"config key {full!r} is a section; expected a table, got {value!r}")
        for k, v in value.items():
            _set(cur, k, v, from_string=False, path=full + ".")
        return
    if rest:
        raise ValueError(f"config key {full!r} is not a section (cannot set {full}.{rest})")
    typ = fields[head].type
    if from_string:
        value = _parse(value, typ, full)
    else:  # from a file: check the JSON/TOML type (ints are accepted for floats)
        want = {"int": int, "float": (int, float), "bool": bool, "str": str}[typ]
        if not isinstance(value, want) or (typ == "int" and isinstance(value, bool)):
            raise ValueError(f"config key {full!r}: expected {typ}, got {value!r}")
        value = float(value) if typ == "float" else value
    setattr(cfg, head, value)


def load_config(cls, path: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """An instance of ``cls`` from its defaults, then ``path`` (.json or .toml), then ``key=value`` strings."""
    cfg = cls()
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        if path.endswith(".toml"):
            import tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
        else:
            raise ValueError(f"config file {path}: expected a .json or .toml file")
        for k, v in data.items():
            _set(cfg, k, v, from_string=False)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"config override {item!r}: expected key=value")
        _set(cfg, key.strip(), value, from_string=True)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every settable key of the config class ``cls``, nested keys dotted."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += describe(type(default), f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f.type if isinstance(f.type, str) else f.type.__name__, json.dumps(default),
                        f.metadata.get("help", "")))
    return out


def keys_help(cls) -> str:
    """The ``--help`` text of the config keys of ``cls``: one line per key."""
    rows = describe(cls)
    w = max(len(k) for k, *_ in rows)
    wt = max(len(f"{t} = {d}") for _, t, d, _ in rows)
    return "\n".join(f"  {k:<{w}}  {f'{t} = {d}':<{wt}}  {h}" for k, t, d, h in rows)
