"""What every stage needs around its loop: device, torch.distributed, optimizer and schedule,
loading a model from a checkpoint (or a local Hugging Face model), progress bars."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import checkpoint
from .config import ModelConfig
from .data import CharTokenizer
from .model import Transformer


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        return Dist(rank, world, torch.device(device))
    return Dist(0, 1, torch.device(device))


def wrap_ddp(model: torch.nn.Module, d: Dist):
    if d.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def all_mean(x: float, d: Dist) -> float:
    """Mean of a scalar over ranks (for logging the same number everywhere)."""
    if d.world == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (lr - min_lr)


def set_lr(opt: torch.optim.Optimizer, lr: float):
    for g in opt.param_groups:
        g["lr"] = lr


def progress(total: int, desc: str, d: Dist, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, disable=not d.main, dynamic_ncols=True, leave=False)


def load_model(init: str, head: str, device) -> tuple[torch.nn.Module, CharTokenizer]:
    """A model with ``head`` initialised from ``init``: an rlhf_fast checkpoint (any head: the body is
    shared and a new head starts fresh) or ``hf:/local/path`` for a transformers causal LM."""
    if init.startswith("hf:"):
        from .hf import load_hf
        return load_hf(init[3:], head, device)
    if not os.path.exists(init):
        raise FileNotFoundError(f"init checkpoint {init} does not exist; run the previous stage first "
                                "(e.g. `rlhf-fast pretrain`) or set init=PATH")
    tensors, md = checkpoint.read(init)
    meta = md["meta"]
    if "hf_path" in meta:  # a fine-tuned Hugging Face model: rebuild it, then load the weights
        from .hf import load_hf
        model, tok = load_hf(meta["hf_path"], head, "cpu")
    else:
        model, tok = Transformer(ModelConfig(**meta["model_config"]), head=head), CharTokenizer()
    sd = checkpoint.module_state(tensors, "model")
    if meta.get("head") != head:  # same body, other head: keep the new head's initialisation
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    else:
        model.load_state_dict(sd)
    return model.to(device), tok


def model_meta(model: torch.nn.Module, stage: str, extra: dict | None = None) -> dict:
    m = getattr(model, "module", model)
    from dataclasses import asdict
    arch = {"hf_path": m.hf_path} if hasattr(m, "hf_path") else {"model_config": asdict(m.cfg)}
    return {"stage": stage, "head": m.head_kind, **arch, **(extra or {})}


@torch.no_grad()
def answers(model, prompts: list[str], tok: CharTokenizer, device, *, max_new_tokens: int = 16,
            temperature: float = 0.0, generator: torch.Generator | None = None, batch_size: int = 128) -> list[str]:
    """The model's answer to each prompt: generated text up to EOS or a newline, stripped."""
    from .data import left_pad
    from .model import generate
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad([tok.encode(p) for p in prompts[i:i + batch_size]], tok.pad_id)
        resp, _ = generate(model, ids.to(device), mask.to(device), max_new_tokens, tok.eos_id, tok.pad_id,
                           temperature, generator)
        out += [tok.decode(r.tolist()).split("\n")[0].strip() for r in resp]
    model.train(was_training)
    return out


def answer_accuracy(model, rows: list[dict], tok: CharTokenizer, device, **kw) -> float:
    """Fraction of rows whose answer equals row["answer"] (or the stripped row["response"])."""
    rows = [r for r in rows if "answer" in r or "response" in r]
    if not rows:
        return float("nan")
    got = answers(model, [r["prompt"] for r in rows], tok, device, **kw)
    want = [r.get("answer", r.get("response", "")).strip() for r in rows]
    return sum(g == w for g, w in zip(got, want)) / len(rows)


class StageState:
    """A stage's resumable state in ``<out>/ckpt.safetensors``: models, optimizers, data generators
    and the step, written atomically by ``save`` and read back by ``restore`` (exact resume), and the
    stage's metric log, cut back to the restored step so a resumed curve has no duplicates."""

    def __init__(self, out: str, stage: str, d: "Dist", modules: dict, optimizers: dict, generators: dict):
        self.out, self.stage, self.d = out, stage, d
        self.path = os.path.join(out, "ckpt.safetensors")
        self.modules, self.optimizers, self.generators = modules, optimizers, generators

    def restore(self, resume: bool) -> dict:
        """Load the checkpoint when resuming; returns its meta ({"step": 0} when starting afresh)."""
        from .metrics import MetricLog, truncate_after

        state = {"step": 0}
        if resume and os.path.exists(self.path):
            state = checkpoint.load(self.path, self.modules, optimizers=self.optimizers)
            checkpoint.set_rng_state(state["rng"], self.generators)
            if self.d.main:
                truncate_after(os.path.join(self.out, "metrics.jsonl"), state["step"])
        self.log = MetricLog(self.out, self.stage, enabled=self.d.main, append=resume and state["step"] > 0)
        return state

    def save(self, step: int, **meta) -> None:
        if self.d.main:
            first = next(iter(self.modules.values()))
            checkpoint.save(self.path, self.modules, optimizers=self.optimizers,
                            rng=checkpoint.rng_state(self.generators),
                            meta=model_meta(first, self.stage, {"step": step, **meta}))
        barrier(self.d)
