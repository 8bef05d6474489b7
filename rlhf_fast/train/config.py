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


@dataclass
class ModelConfig:
    vocab_size: int = 98           # the built-in character tokenizer has 98 symbols
    block_size: int = 64           # context length in tokens
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = ""                 # JSONL with {"text": ...}; "" = the built-in capitals corpus
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 200
    stop_after: int = 0            # end this run after this many steps (0 = run to `steps`); resume later
    seed: int = 1234
    device: str = "auto"


@dataclass
class SFTConfig:
    init: str = "runs/pretrain/model.safetensors"  # a checkpoint, or "hf:/local/path" for a transformers model
    data: str = ""                 # JSONL with {"prompt", "response"}; "" = built-in capital questions
    steps: int = 50
    batch_size: int = 32
    lr: float = 3e-4               # gentle: a higher rate memorises the training answers and forgets the rest
    min_lr: float = 3e-5
    warmup: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_frac: float = 0.1         # held-out fraction of a user's file (built-in: held-out countries)
    save_every: int = 100
    stop_after: int = 0
    seed: int = 1235
    device: str = "auto"


@dataclass
class RewardConfig:
    init: str = "runs/sft/model.safetensors"       # the RM starts from the SFT model (as InstructGPT)
    data: str = ""                 # JSONL with {"prompt", "chosen", "rejected"}
    steps: int = 150
    batch_size: int = 32
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    margin: float = 0.0            # Bradley-Terry margin (0 = none)
    eval_frac: float = 0.1
    save_every: int = 100
    stop_after: int = 0
    seed: int = 1236
    device: str = "auto"


@dataclass
class PPOConfig:
    init: str = "runs/sft/model.safetensors"       # policy and reference
    reward_model: str = "runs/reward/model.safetensors"  # the RM, also the critic's start
    data: str = ""                 # JSONL with {"prompt"} (+ optional "answer" for the true reward)
    pretrain_data: str = ""        # ptx corpus, {"text"} JSONL; "" = the built-in corpus
    iterations: int = 30           # rollout + update rounds
    rollout_size: int = 64         # prompts per rollout
    minibatch_size: int = 32
    ppo_epochs: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    lr: float = 5e-5               # 3e-4 already over-optimises the RM (score up, true accuracy down)
    critic_lr: float = 1e-3
    grad_clip: float = 1.0
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    entropy_coef: float = 0.0
    loss_impl: str = "linear"      # policy loss: "linear" (rf.linear_ppo_loss on hidden states, packed) | "logits"
    ptx_coef: float = 0.5          # γ of PPO-ptx: loss -= ptx_coef · mean log π(x_pretrain)
    ptx_batch_size: int = 16
    kl_coef: float = 0.1           # initial β
    adaptive_kl: bool = True       # Ziegler et al. proportional controller towards kl_target
    kl_target: float = 1.0         # nats per sequence
    kl_horizon: int = 2000
    no_eos_penalty: float = -1.0   # score given to responses that never emit EOS
    eval_frac: float = 0.1
    save_every: int = 10
    stop_after: int = 0
    seed: int = 1237
    device: str = "auto"


@dataclass
class PipelineConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    device: str = "auto"           # applied to every stage


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
