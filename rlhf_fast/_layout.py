"""How the logits ops see their input: [..., V] as a [B, T, V] view of the same memory.

Every logits kernel (Triton, C++, CUDA) takes [B, T, V] with any strides over B and T and unit
stride over V (row r at (r // T)·s0 + (r % T)·s1), so a time slice ``logits[:, :-1]`` of a model
output is read where it lies instead of being copied. Their gradients are allocated with the
logits' own strides (``grad_like``), so input and gradient rows share their 16-byte phase (the
CUDA backward uses 16-byte loads and stores only then). csrc/logits_layout.h is the C++ twin.
"""
from __future__ import annotations

import torch


def logits_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [B, T, V], a view whenever the leading dims collapse to two strided dims.

    Copies only when the vocabulary is strided or the leading dims cannot be viewed as two.
    """
    V = logits.shape[-1]
    if logits.stride(-1) != 1 and V > 1:
        logits = logits.contiguous()
    groups: list[list[int]] = []  # [size, stride] of the leading dims, merged where they are one run
    for n, s in zip(logits.shape[:-1], logits.stride()[:-1]):
        if n == 1:
            continue
        if groups and groups[-1][1] == s * n:
            groups[-1] = [groups[-1][0] * n, s]
        else:
            groups.append([n, s])
    if logits.numel() == 0 or len(groups) > 2:
        return logits.reshape(1, -1, V)
    sizes = [1] * (2 - len(groups)) + [g[0] for g in groups]
    return logits.view(sizes[0], sizes[1], V)


def non_overlapping(x: torch.Tensor) -> bool:
    """True when no two elements of x share memory (x may have gaps, e.g. a sliced view)."""
    extent = 1
    for n, s in sorted(((n, s) for n, s in zip(x.shape, x.stride()) if n > 1), key=lambda p: p[1]):
        if s < extent:
            return False
        extent += (n - 1) * s
    return True


def grad_like(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised gradient for logits x: x's strides when they do not overlap, else contiguous.

    A view with gaps gets a gradient with the same gaps (``logits[:, :-1]``: one row per sequence;
    ``logits[:, ::2]``: half the buffer), the price of rows that share the logits' 16-byte phase.
    """
    if non_overlapping(x):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
