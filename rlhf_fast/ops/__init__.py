"""Triton kernels, one file per op. Importing this package registers the "triton" backend of each
op whose module imports; without triton the backend is marked unavailable, never an import error."""
import importlib

from .. import _backend

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    _backend.mark_unavailable("triton", f"triton is not installed ({e}); `pip install triton`")
else:
    # each module registers its ops with _backend.register(..., "triton")
    for _mod in ():
        importlib.import_module(f"{__name__}.{_mod}")
