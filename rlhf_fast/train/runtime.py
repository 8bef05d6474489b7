"""What every stage needs around its loop: device, torch.distributed and how the models are spread over
the processes (``wrap``: DDP or FSDP2), optimizer and schedule, loading a model from a checkpoint (or a
local Hugging Face model), the resumable state, progress bars."""
from __future__ import annotations

import contextlib
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
    parallel: str = "none"  # what ``wrap`` picked: "none" (one process), "ddp" or "fsdp"

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


PARALLEL = ("auto", "ddp", "fsdp")
MIXED_PRECISION = ("auto", "bf16", "fp32")
AUTO_DDP_FRACTION = 0.25  # parallel=auto: DDP while a full replica needs at most this share of a rank's memory


def replica_bytes(trained, frozen=()) -> int:
    """Bytes one rank holds under DDP: every parameter, plus a gradient and AdamW's two moments per
    trained parameter (activations not counted)."""
    def nbytes(models, per_param):
        return sum(p.numel() * p.element_size() * per_param for m in models for p in m.parameters())
    return nbytes(trained, 4) + nbytes(frozen, 1)


def rank_memory_bytes(d: Dist) -> int:
    """Memory of one rank: the GPU's, or on a CPU the machine's RAM over the processes on this node;
    the smallest over all ranks, so every rank picks the same way."""
    if d.device.type == "cuda":
        mem = torch.cuda.get_device_properties(d.device).total_memory
    else:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if d.world > 1:
        t = torch.tensor([mem], dtype=torch.float64, device=d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        mem = int(t.item())
    return mem


def pick_parallel(parallel: str, d: Dist, trained, frozen=()) -> str:
    """"none" for one process; else ``parallel``, where "auto" is DDP while a full replica of the stage's
    models (replica_bytes) fits in AUTO_DDP_FRACTION of a rank's memory, and FSDP otherwise."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if d.world == 1:
        return "none"
    if parallel == "auto":
        return "ddp" if replica_bytes(trained, frozen) <= AUTO_DDP_FRACTION * rank_memory_bytes(d) else "fsdp"
    return parallel


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers FSDP shards one by one: Transformer.blocks, or a Hugging Face model's decoder
    layers (the classes it lists in ``_no_split_modules``)."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    names = set(getattr(getattr(model, "hf", model), "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer blocks to shard (no .blocks and no "
                         "_no_split_modules); use parallel=ddp")
    return blocks


def mixed_precision_policy(mixed_precision: str, device: torch.device):
    """FSDP's MixedPrecisionPolicy: bf16 parameters in forward/backward with fp32 gradient reduction
    (the sharded master weights and the optimizer stay fp32); "auto" = bf16 on CUDA, fp32 on a CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if mixed_precision == "auto":
        mixed_precision = "bf16" if device.type == "cuda" else "fp32"
    if mixed_precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap(d: Dist, trained: list, frozen: list = (), parallel: str = "auto", mixed_precision: str = "auto") -> list:
    """The one place that spreads a stage's models over the processes; returns the trained models as
    the loss must call them (same order). Sets d.parallel to what was picked (see pick_parallel).

    none   one process: the models as they are.
    ddp    trained models in DistributedDataParallel (a full replica per rank, gradients all-reduced);
           frozen ones replicated as they are.
    fsdp   every model FSDP2-sharded in place (torch.distributed.fsdp.fully_shard on each transformer
           block, then the root): each rank keeps 1/world of every parameter, and of the gradients and
           optimizer state of the trained ones (build the optimizer after wrap); frozen models are
           sharded too and never get optimizer state. mixed_precision: see mixed_precision_policy.
    """
    d.parallel = pick_parallel(parallel, d, trained, frozen)
    if d.parallel == "none":
        return list(trained)
    if d.main:
        print(f"[rlhf-fast] parallel={d.parallel} over {d.world} processes ({dist.get_backend()})", flush=True)
    if d.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return [DistributedDataParallel(m, device_ids=[d.device.index] if d.device.type == "cuda" else None)
                for m in trained]
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # a value head returns values [B, T] as a squeezed view; FSDP warns that an in-place op on it would skip
    # its backward hook. No stage writes into a model's output in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = mixed_precision_policy(mixed_precision, d.device)
    for m in (*trained, *frozen):
        for block in transformer_blocks(m):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(m, mesh=mesh, mp_policy=mp)
    return list(trained)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Within the block an FSDP model keeps its whole parameters gathered (one all-gather per block
    on entry, none per forward), so a generation loop may run a different number of steps on each
    rank; freed again on exit. A no-op for a model that is not FSDP-sharded."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    blocks = mods[1:] if mods and mods[0] is model else mods  # the root never reshards after forward
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)


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
        with unsharded(model):
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
    """A stage's resumable state: models, optimizers, data generators and the step in a DCP checkpoint
    ``<out>/ckpt-<step>/`` (checkpoint.save_state: every rank writes its shards, atomically), read back
    by ``restore`` (exact resume, with any number of ranks), and the stage's metric log, cut back to the
    restored step so a resumed curve has no duplicates."""

    def __init__(self, out: str, stage: str, d: "Dist", modules: dict, optimizers: dict, generators: dict):
        self.out, self.stage, self.d = out, stage, d
        self.modules, self.optimizers, self.generators = modules, optimizers, generators

    def restore(self, resume: bool) -> dict:
        """Load the newest checkpoint when resuming; returns its meta ({"step": 0} when starting afresh)."""
        from .metrics import MetricLog, truncate_after

        state = {"step": 0}
        path = checkpoint.latest_state(self.out) if resume else None
        if path:
            state = checkpoint.load_state(path, self.modules, self.optimizers)
            checkpoint.set_rng_state(state["rng"], self.generators)
            if self.d.main:
                truncate_after(os.path.join(self.out, "metrics.jsonl"), state["step"])
        barrier(self.d)  # the log is cut before rank 0 appends to it
        self.log = MetricLog(self.out, self.stage, enabled=self.d.main, append=resume and state["step"] > 0)
        return state

    def save(self, step: int, **meta) -> None:
        first = next(iter(self.modules.values()))
        checkpoint.save_state(self.out, step, self.modules, self.optimizers, checkpoint.rng_state(self.generators),
                              model_meta(first, self.stage, {"step": step, **meta}))
