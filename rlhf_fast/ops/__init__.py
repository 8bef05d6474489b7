"""Triton kernels, one file per op. Importing this package imports every module in it, and each
registers its "triton" backends with ``_backend.register``; without triton the backend is marked
unavailable, never an import error."""
import importlib
import pkgutil

from .. import _backend

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    _backend.mark_unavailable("triton", f"triton is not installed ({e}); `pip install triton`")
else:
    for _m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{_m.name}")
