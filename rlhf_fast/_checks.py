"""Input checks shared by the public functions: each error names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def floating(name, x):
    tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")


def integer(name, x):
    tensor(name, x)
    if x.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")


def mask(name, m):
    tensor(name, m)
    if m.dtype not in FLOAT_DTYPES + INT_DTYPES + (torch.bool,):
        raise ValueError(f"{name} must be bool, integer or floating, got {m.dtype}")


def same_shape(ref_name, ref, **others):
    for name, x in others.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def same_device(ref_name, ref, **others):
    for name, x in others.items():
        if isinstance(x, torch.Tensor) and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def ndim(name, x, n):
    if x.dim() != n:
        raise ValueError(f"{name} must have {n} dimensions, got shape {tuple(x.shape)}")


def positive(name, v):
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")


def choice(name, v, options):
    if v not in options:
        raise ValueError(f"{name} must be one of {options}, got {v!r}")


def _tracing(x) -> bool:
    """True under torch.compile / fake tensors, where data-dependent host checks are skipped."""
    return torch.compiler.is_compiling() or x.device.type == "meta"


def labels_in_range(labels, V, ignore_index):
    """Host-side check (one small reduction and a sync) that every label is in [0, V) or ignored."""
    if labels.numel() == 0 or _tracing(labels):
        return
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        vals = labels[bad]
        raise ValueError(f"labels must be in [0, V) or ignore_index={ignore_index}; got values in "
                         f"[{int(vals.min())}, {int(vals.max())}] for V={V}")


def at_least_two(name, m):
    if _tracing(m):
        return
    n = int((m != 0).sum())
    if n < 2:
        raise ValueError(f"{name} must select at least two elements to whiten (unbiased variance), got {n}")
