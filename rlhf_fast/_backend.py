"""The one place that decides which backend runs an op.

Backends:
  ``reference``  rlhf_fast.reference, plain PyTorch, any device (the source of truth)
  ``cpu``        the compiled C++ extension (csrc/*.cpp), CPU tensors
  ``cuda``       the compiled CUDA extension (csrc/*.cu), CUDA tensors
  ``triton``     Triton kernels (rlhf_fast/ops/*.py), CUDA tensors, or CPU tensors under
                 ``TRITON_INTERPRET=1`` (how CI runs them)

Automatic choice, by the device of the op's first tensor: CUDA → triton, cuda, reference;
CPU → cpu, reference; anything else → reference. An op without an implementation for a backend
simply skips it. Override per call with ``backend=`` (strict: raises if that backend cannot run
the op) or for a block with ``use_backend(name)`` (strict for ops that have that backend, the
automatic choice for ops that do not).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
# Triton before CUDA C++ on GPUs for now: the Triton kernels' math is run in CI (interpreter), the
# CUDA kernels are only compiled there; revisit with GPU benchmarks (benchmarks/gpu_run.sh).
_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

_registry: dict[str, dict[str, Callable]] = {}
_local = threading.local()
_unavailable: dict[str, str] = {}  # backend -> why it cannot run


def register(op: str, backend: str):
    """Decorator: ``fn`` implements ``op`` on ``backend`` (same signature as the reference)."""
    assert backend in BACKENDS, backend

    def deco(fn):
        _registry.setdefault(op, {})[backend] = fn
        return fn

    return deco


def mark_unavailable(backend: str, reason: str) -> None:
    _unavailable[backend] = reason


def why_unavailable(backend: str) -> str | None:
    """None if ``backend`` can be used at all here, else a sentence saying why not."""
    why = _unavailable.get(backend)
    if why is None and backend == "cuda" and not torch.cuda.is_available():
        why = ("built, but there is no CUDA device here (torch.cuda.is_available() is False): CUDA tensors "
               "cannot be made in this process")
    return why


def availability(backend: str) -> str:
    """What ``rf.available_backends()`` reports: "ok", "ok: <the only tensors it runs on here>", or
    why ``backend`` cannot run in this process."""
    why = why_unavailable(backend)
    if why is not None:
        return why
    if backend == "triton" and not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("ok: CPU tensors only, through the Triton interpreter (TRITON_INTERPRET=1, slow: for "
                    "tests); there is no CUDA device here")
        return ("no CUDA device here, and Triton runs on CPU tensors only under TRITON_INTERPRET=1 (the "
                "interpreter, for tests), which is not set")
    return "ok"


def device_guard(device: torch.device):
    """Context for a Triton launch: ``device`` made the current CUDA device (Triton launches on the
    current device's stream, so tensors on cuda:1 work without ``torch.cuda.set_device``); nothing for
    CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _runs_on(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    why = why_unavailable(backend)
    if why is not None:
        return why
    if backend == "cpu" and device.type != "cpu":
        return f"the 'cpu' backend takes CPU tensors, got {device.type}"
    if backend == "cuda" and device.type != "cuda":
        return f"the 'cuda' backend takes CUDA tensors, got {device.type}"
    if backend == "triton" and device.type != "cuda":
        if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
            return f"Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"
    return None


def backends_for(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device`` now (tests and benchmarks iterate over this)."""
    device = torch.device(device)
    return [b for b in BACKENDS if b in _registry.get(op, {}) and _runs_on(b, device) is None]


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the ops in this block on backend ``name`` (None: automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    prev = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = prev


def current_override() -> str | None:
    return getattr(_local, "backend", None)


def select(op: str, device: torch.device, backend: str | None = None) -> Callable:
    """The implementation of ``op`` that runs for tensors on ``device``."""
    impls = _registry[op]
    strict = backend is not None
    if backend is None:
        backend = current_override()
        strict = backend is not None and backend in impls
    if strict:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend not in impls:
            raise NotImplementedError(f"{op} has no {backend!r} backend; it has {sorted(impls)}")
        why = _runs_on(backend, device)
        if why is not None:
            raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {why}")
        return impls[backend]
    for b in _PREFERENCE.get(device.type, ("reference",)):
        if b in impls and _runs_on(b, device) is None:
            return impls[b]
    return impls["reference"]
