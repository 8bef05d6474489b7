"""Checkpoints, written atomically so a reader never picks up half of one.

Two kinds:
- A model file (``model.safetensors``: the stage's result, the next stage's input, the export): named
  modules ("model", ...) and a JSON ``meta`` (stage, step, model config) in the safetensors metadata; temp
  file in the same folder + os.replace. ``save_model`` gathers an FSDP-sharded model whole first.
- A stage's resumable state (``save_state`` / ``load_state``): a torch.distributed.checkpoint (DCP)
  folder ``<out>/ckpt-<step>/`` of models and optimizers keyed by parameter name, each rank writing
  its own shards (``__<rank>_0.distcp``, ``.metadata``), plus ``rng-<rank>.safetensors`` (each rank's
  RNG states) and ``state.json`` (step, meta). Written into ``.tmp-ckpt-<step>/`` and renamed when
  whole; older ckpt-* folders are removed after. DCP reshards on load, so a checkpoint written by N
  ranks (DDP, FSDP or one process) loads with any number of ranks and either wrapping.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch

META_KEY = "rlhf_fast"


def _unwrap(m):
    return getattr(m, "module", m)  # DistributedDataParallel -> the model


def save(path: str, modules: dict, *, meta: dict | None = None):
    """Named modules (or their state dicts) and a JSON ``meta`` in one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, m in modules.items():  # a module, or its state dict
        for k, v in (m if isinstance(m, dict) else _unwrap(m).state_dict()).items():
            v = v.detach().contiguous().cpu()
            ptr = v.untyped_storage().data_ptr()
            # tied weights (a Hugging Face model's lm_head = embedding) share storage, which
            # safetensors refuses: store a copy under the second name; loading fills both again
            tensors[f"{name}.{k}"] = v.clone() if ptr in seen else v
            seen.add(ptr)
    metadata = {META_KEY: json.dumps({"meta": meta or {}})}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read(path: str) -> tuple[dict, dict]:
    """(tensors, metadata dict) of a checkpoint; a clear error when it is missing or not ours."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not an rlhf_fast checkpoint (no '{META_KEY}' metadata)")
    return load_file(path), json.loads(raw)


def meta(path: str) -> dict:
    return read(path)[1]["meta"]


def module_state(tensors: dict, name: str) -> dict:
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}


def set_rng_state(states: dict, generators: dict[str, torch.Generator]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    for k, g in generators.items():
        if k in states:  # (a rank the writing run did not have keeps its fresh seed for its own streams)
            g.set_state(states[k])


# ---- distributed: the consolidated model and the resumable (sharded) state ---------------------------------

def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def _single() -> bool:
    import torch.distributed as dist
    return not dist.is_initialized()


def _dcp(fn, state, path):
    """dcp.save / dcp.load; in one process without its warning that it assumes one process."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(state, checkpoint_id=path, no_dist=_single())


def _barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def save_model(path: str, model, meta: dict | None = None):
    """``model``'s full weights to ``path`` (safetensors, ``{"model": ...}``). Every rank calls it (an
    FSDP model is gathered whole, on the CPU); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(_unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() == 0:
        save(path, {"model": sd}, meta=meta)
    _barrier()


_CKPT = re.compile(r"ckpt-(\d+)$")


def latest_state(out: str) -> str | None:
    """The newest whole resumable checkpoint folder in ``out`` (``ckpt-<step>``), or None."""
    steps = [int(m.group(1)) for f in (os.listdir(out) if os.path.isdir(out) else ())
             if (m := _CKPT.match(f)) and os.path.exists(os.path.join(out, f, "state.json"))]
    return os.path.join(out, f"ckpt-{max(steps)}") if steps else None


def _dcp_state(modules: dict, optimizers: dict) -> dict:
    """{"model": {name: state dict}, "optim": {name: state dict}} keyed by parameter names (sharded
    DTensors under FSDP), the form DCP saves and loads in place; each optimizer goes with the module
    that owns its parameters."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    models = {k: get_model_state_dict(_unwrap(m)) for k, m in modules.items()}  # (FSDP: back to the shards)
    optims = {k: get_optimizer_state_dict(_owner(modules, o), o) for k, o in optimizers.items()}
    return {"model": models, "optim": optims}


def _owner(modules: dict, opt):
    first = opt.param_groups[0]["params"][0]
    return next(_unwrap(m) for m in modules.values() if any(p is first for p in _unwrap(m).parameters()))


def save_state(out: str, step: int, modules: dict, optimizers: dict, rng: dict, meta: dict) -> str:
    """Write ``<out>/ckpt-<step>/`` (see the module docstring). Every rank calls it with its own RNG states."""
    import torch.distributed.checkpoint as dcp
    final, tmp = os.path.join(out, f"ckpt-{step}"), os.path.join(out, f".tmp-ckpt-{step}")
    rank = _rank()
    if rank == 0:  # a temp folder left by a killed run is never read: clear it
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(out):
            if f.startswith(".tmp-ckpt-"):
                shutil.rmtree(os.path.join(out, f))
    _barrier()
    os.makedirs(tmp, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.cpu() for k, v in rng.items()}, os.path.join(tmp, f"rng-{rank}.safetensors"))
    _dcp(dcp.save, _dcp_state(modules, optimizers), tmp)
    _barrier()
    if rank == 0:
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_initialized() else 1
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"meta": meta, "world": world}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)  # whole, or not there at all
        for f in os.listdir(out):
            m = _CKPT.match(f)
            if m and int(m.group(1)) != step:
                shutil.rmtree(os.path.join(out, f))
    _barrier()
    return final


def load_state(path: str, modules: dict, optimizers: dict) -> dict:
    """Load a ``save_state`` folder into the (wrapped or plain) modules and optimizers, whatever number of
    ranks wrote it. Returns its meta with this rank's RNG states under "rng" (rank 0's when the writing
    run had fewer ranks: the data order is the same on every rank)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    with open(os.path.join(path, "state.json")) as f:
        saved = json.load(f)
    state = _dcp_state(modules, optimizers)
    _dcp(dcp.load, state, path)
    for k, m in modules.items():
        set_model_state_dict(_unwrap(m), state["model"][k])
    for k, o in optimizers.items():
        set_optimizer_state_dict(_owner(modules, o), o, state["optim"][k])
    mine = os.path.join(path, f"rng-{_rank()}.safetensors")
    if os.path.exists(mine):
        rng = load_file(mine)
    else:  # a rank the writing run did not have
        rng = {"data": load_file(os.path.join(path, "rng-0.safetensors"))["data"]}
    return {**saved["meta"], "rng": rng}
