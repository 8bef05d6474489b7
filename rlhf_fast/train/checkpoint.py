"""Checkpoints in safetensors, written atomically (temp file in the same folder + os.replace).

A checkpoint holds named modules ("model", "critic", ...), optionally optimizers and RNG states as
tensors, and a JSON ``meta`` (stage, step, data position, configs) in the safetensors metadata.
Optimizer state is flattened to tensors ``optim.<name>.<param index>.<key>`` with the param groups
in the metadata, so a resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

META_KEY = "rlhf_fast"


def _unwrap(m):
    return getattr(m, "module", m)  # DistributedDataParallel -> the model


def save(path: str, modules: dict, *, optimizers: dict | None = None, rng: dict | None = None, meta: dict | None = None):
    from safetensors.torch import save_file

    tensors, optim_meta, seen = {}, {}, set()
    for name, m in modules.items():
        for k, v in _unwrap(m).state_dict().items():
            v = v.detach().contiguous().cpu()
            ptr = v.untyped_storage().data_ptr()
            # tied weights (a Hugging Face model's lm_head = embedding) share storage, which
            # safetensors refuses: store a copy under the second name; loading fills both again
            tensors[f"{name}.{k}"] = v.clone() if ptr in seen else v
            seen.add(ptr)
    for name, opt in (optimizers or {}).items():
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                v = v if torch.is_tensor(v) else torch.tensor(v)
                tensors[f"optim.{name}.{pid}.{k}"] = v.detach().contiguous().cpu()
        optim_meta[name] = sd["param_groups"]
    for name, state in (rng or {}).items():
        tensors[f"rng.{name}"] = state.cpu()
    metadata = {META_KEY: json.dumps({"meta": meta or {}, "optim": optim_meta})}
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


def load(path: str, modules: dict, *, optimizers: dict | None = None, strict: bool = True) -> dict:
    """Load modules (and optimizers) in place; returns the meta dict (and the RNG states under "rng")."""
    tensors, md = read(path)
    for name, m in modules.items():
        sd = module_state(tensors, name)
        if not sd:
            raise ValueError(f"checkpoint {path} has no module {name!r}")
        _unwrap(m).load_state_dict(sd, strict=strict)
    for name, opt in (optimizers or {}).items():
        groups = md["optim"].get(name)
        if groups is None:
            raise ValueError(f"checkpoint {path} has no optimizer {name!r}")
        state = {}
        prefix = f"optim.{name}."
        for k, v in tensors.items():
            if k.startswith(prefix):
                pid, key = k[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[key] = v
        opt.load_state_dict({"state": state, "param_groups": groups})
    out = dict(md["meta"])
    out["rng"] = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return out


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}


def set_rng_state(states: dict, generators: dict[str, torch.Generator]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    for k, g in generators.items():
        g.set_state(states[k])
