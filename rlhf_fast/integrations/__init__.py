"""Drop-in adapters that run other trainers' loss-side functions on rlhf_fast ops.

    from rlhf_fast.integrations import trl as rf_trl;  rf_trl.patch()      # TRL 1.16
    from rlhf_fast.integrations import verl as rf_verl; rf_verl.register()  # verl 0.9.1, then switch by config
    from rlhf_fast.integrations import openrlhf as rf_orl; rf_orl.patch()  # OpenRLHF 0.11

Each module imports its peer lazily (importing this package never needs the peer), keeps the peer's
argument order, defaults and metric names at the boundary, and restores what it replaced exactly on
``unpatch()``. ``calls`` in each module counts the rf replacements that ran (and the calls handed back
to the peer's own function, for options rf does not cover).
"""
from __future__ import annotations

import importlib
import sys
from collections import Counter


def require(module: str, pip: str):
    """Import ``module`` or raise an ImportError that says how to install the peer."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"rlhf_fast.integrations needs {module!r} ({e}); install it with: pip install {pip}") from e


class Patcher:
    """Swaps objects by identity in every loaded module under some package prefixes, and restores them."""

    def __init__(self, *prefixes: str):
        self.prefixes = prefixes
        self.swapped: list[tuple[object, str, object]] = []
        self.calls: Counter = Counter()

    @property
    def active(self) -> bool:
        return bool(self.swapped)

    def swap(self, replacements: dict[int, tuple[object, object]]) -> None:
        """replacements: id(original) -> (original, replacement). Every module attribute (any name) that
        is the original becomes the replacement, in modules loaded now whose name starts with a prefix."""
        for name, mod in list(sys.modules.items()):
            if mod is None or not name.startswith(self.prefixes):
                continue
            for attr, val in list(vars(mod).items()):
                hit = replacements.get(id(val))
                if hit is not None and hit[0] is val:
                    setattr(mod, attr, hit[1])
                    self.swapped.append((mod, attr, val))

    def set(self, obj, attr: str, value) -> None:
        self.swapped.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def restore(self) -> None:
        for obj, attr, val in reversed(self.swapped):
            setattr(obj, attr, val)
        self.swapped.clear()
