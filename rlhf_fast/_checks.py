"""Input checks shared by the public functions: each error names the argument and what was expected.

Checks of shapes, dtypes and Python arguments are free and always run. The checks that look at the
data (labels in range, at least two elements to whiten) need a host sync, so they are switchable:
``rf.checks(True|False)`` in code, else ``RLHF_FAST_CHECKS=1|0`` in the environment, else on for CPU
tensors (where a sync costs nothing) and off for CUDA tensors (a stall per call, and no CUDA-graph
capture). With them off, bad values get the kernels' contracts instead of a ValueError: a NaN result
for that row / token, never a read or write out of bounds.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

_local = threading.local()


@contextlib.contextmanager
def checks(enabled: bool | None):
    """Run the data checks (host syncs) in this block: True always, False never, None the default
    (``RLHF_FAST_CHECKS``, else on for CPU tensors and off for CUDA tensors)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"checks takes True, False or None, got {enabled!r}")
    prev = getattr(_local, "checks", None)
    _local.checks = enabled
    try:
        yield
    finally:
        _local.checks = prev


def enabled(device: torch.device) -> bool:
    """Whether the data checks run for tensors on ``device`` (see the module docstring)."""
    on = getattr(_local, "checks", None)
    if on is None:
        env = os.environ.get("RLHF_FAST_CHECKS")
        if env is not None and env.strip() != "":
            if env.strip() not in ("0", "1"):
                raise ValueError(f"RLHF_FAST_CHECKS must be 1 or 0, got {env!r}")
            on = env.strip() == "1"
    return device.type == "cpu" if on is None else on

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


def _skip_data_checks(x) -> bool:
    """True where the data checks do not run: switched off, or under torch.compile / fake tensors."""
    return torch.compiler.is_compiling() or x.device.type == "meta" or not enabled(x.device)


def labels_in_range(labels, V, ignore_index):
    """Data check (one small reduction and a host sync) that every label is in [0, V) or ignored."""
    if labels.numel() == 0 or _skip_data_checks(labels):
        return
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        vals = labels[bad]
        raise ValueError(f"labels must be in [0, V) or ignore_index={ignore_index}; got values in "
                         f"[{int(vals.min())}, {int(vals.max())}] for V={V}")


def nonnegative(name, x):
    """Data check (a host sync) that every element of ``x`` is >= 0."""
    if x.numel() == 0 or _skip_data_checks(x):
        return
    if bool((x < 0).any()):
        raise ValueError(f"{name} must be >= 0, got min {float(x.min())}")


def at_least_two(name, m):
    """Data check (a host sync) that mask ``m`` selects at least two elements."""
    if _skip_data_checks(m):
        return
    n = int((m != 0).sum())
    if n < 2:
        raise ValueError(f"{name} must select at least two elements to whiten (unbiased variance), got {n}")
