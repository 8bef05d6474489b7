"""How the compiled extension (csrc/) is built: one description for both paths.

* Ahead of time (AOT): setup.py builds ``rlhf_fast/_C*.so`` when torch imports at build time
  (``pip install --no-build-isolation``, ``make setup``). setup.py loads this file by path: nothing
  here imports torch at module level.
* On first use (JIT): when no usable AOT build is installed (plain ``pip install``: pip builds in an
  isolated environment without torch), the first import of rlhf_fast compiles the sources with ninja
  (``torch.utils.cpp_extension.load``) into a per-user cache, one folder per torch version, Python,
  CPU/CUDA, CUDA archs and source hash, and later imports load it from there.

Every build embeds a stamp (torch version, CUDA or not, source hash) in the library; a library whose
stamp names another torch is never loaded.

Environment:
  RLHF_FAST_BUILD=auto|aot|jit|none   at import: auto (default) loads the AOT build if it matches this
                                      torch, else builds on first use; aot: only the AOT build; jit: only the
                                      cache; none: no compiled extension (reference + Triton backends).
                                      At build time (setup.py): aot fails if torch does not import; jit and
                                      none build nothing.
  RLHF_FAST_CUDA=auto|1|0             compile the CUDA sources: when torch has CUDA and a toolkit is found
                                      (auto), force it (fail if impossible), or skip it
  RLHF_FAST_CACHE_DIR                 the JIT cache (default $XDG_CACHE_HOME/rlhf_fast, else ~/.cache/rlhf_fast)
  TORCH_CUDA_ARCH_LIST, MAX_JOBS, CXX honoured
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import sys

# flags of the C++ sources, and of the CUDA sources (benchmarks/static_profile.py reads NVCC_FLAGS from
# this file's text: keep it a literal list)
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "-std=c++20", "-DWITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
LDFLAGS = ["-fopenmp"]
DEFAULT_ARCH = "9.0"  # H100/H200, when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible
MODES = ("auto", "aot", "jit", "none")
STAMP_MARK = "rlhf_fast build stamp: "
SOURCE_GLOBS = ("*.cpp", "*.cu", "*.h", "*.cuh")
JIT_NAME = "rlhf_fast_C"  # the JIT library: <cache>/<key>/rlhf_fast_C.so


def build_mode() -> str:
    mode = os.environ.get("RLHF_FAST_BUILD", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"RLHF_FAST_BUILD must be one of {'|'.join(MODES)}, got {mode!r}")
    return mode


def csrc_dir() -> str | None:
    """The C++/CUDA sources: the copy installed in the package (rlhf_fast/_csrc) or a source checkout's csrc/."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if glob.glob(os.path.join(d, "*.cpp")):
            return d
    return None


def source_files(csrc: str, with_cuda: bool) -> list[str]:
    """The extension's translation units: every .cpp, and the .cu files with CUDA."""
    return sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + (
        sorted(glob.glob(os.path.join(csrc, "*.cu"))) if with_cuda else [])


def source_hash(csrc: str) -> str:
    """sha256 (12 hex digits) of every source and header's name and bytes, and of the flags."""
    h = hashlib.sha256(repr((CXX_FLAGS, NVCC_FLAGS, LDFLAGS)).encode())
    for p in sorted(p for g in SOURCE_GLOBS for p in glob.glob(os.path.join(csrc, g))):
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else the first toolkit that has the runtime header: nvcc's grandparent or
    /usr/local/cuda. (torch guesses nvcc's grandparent, wrong when nvcc is a wrapper or link in
    /usr/local/bin: then cudart does not link.) A build sets CUDA_HOME to it before cpp_extension is
    imported (it reads it then)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    guesses = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    found = [g for g in guesses if os.path.exists(os.path.join(g, "include", "cuda_runtime.h"))]
    return found[0] if found else None


def with_cuda(torch) -> bool:
    """Whether the CUDA sources are compiled: torch has CUDA and a toolkit is found (RLHF_FAST_CUDA=auto),
    forced (=1: raises if impossible) or skipped (=0)."""
    mode = os.environ.get("RLHF_FAST_CUDA", "auto").lower()
    home = find_cuda_home()
    ok = torch.version.cuda is not None and home is not None
    if mode in ("1", "true", "force") and not ok:
        raise RuntimeError("RLHF_FAST_CUDA=1 but the CUDA build is impossible: "
                           f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={home}")
    return ok and mode not in ("0", "false", "skip")


def arch_key() -> str:
    """The CUDA architectures as the cache knows them: TORCH_CUDA_ARCH_LIST, or "native" (the GPUs of the
    machine that built it; set TORCH_CUDA_ARCH_LIST where one cache serves machines with other GPUs)."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or "native"


def build_archs() -> str:
    """TORCH_CUDA_ARCH_LIST, else the visible GPUs' compute capabilities (asked in a child process: the
    importing process must not initialise CUDA, or a later fork could not use it), else DEFAULT_ARCH."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    code = ("import torch\nif torch.cuda.is_available():\n    print(';'.join(sorted({'%d.%d' % "
            "torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))")
    import subprocess
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or DEFAULT_ARCH


def stamp(torch_version: str, cuda: bool, src: str) -> str:
    return f"torch={torch_version};cuda={int(cuda)};src={src}"


def write_stamp_source(path: str, text: str) -> str:
    """A translation unit holding ``text`` as a string in the library (read back by read_stamp)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = ('// generated by rlhf_fast/_build.py: what this library was built against\n'
            f'extern "C" __attribute__((used)) const char rlhf_fast_build_stamp[] = "{STAMP_MARK}{text};";\n')
    if not os.path.exists(path) or open(path).read() != body:  # unchanged: ninja keeps the object
        with open(path, "w") as f:
            f.write(body)
    return path


def read_stamp(lib: str) -> dict | None:
    """The stamp of a built library as a dict (torch, cuda, src), None when it has none, without loading it."""
    import mmap
    with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        i = m.find(STAMP_MARK.encode())
        if i < 0:
            return None
        j = m.find(b";\0", i)
        text = m[i + len(STAMP_MARK):j].decode(errors="replace")
    return dict(kv.split("=", 1) for kv in text.split(";") if "=" in kv)


def cache_root() -> str:
    override = os.environ.get("RLHF_FAST_CACHE_DIR")
    if override:
        return os.path.abspath(os.path.expanduser(override))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "rlhf_fast")


def cache_key(torch_version: str, cuda: bool, archs: str, src: str) -> str:
    """The cache folder's name; ``archs``: arch_key() (CUDA builds only)."""
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    dev = f"cuda{re.sub(r'[^A-Za-z0-9.+]', '_', archs)}" if cuda else "cpu"
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", f"torch{torch_version}-{py}-{dev}-{src}")


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive lock between processes (torchrun ranks starting at once); released when the holder
    exits, even if it is killed."""
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def missing_tool() -> str | None:
    """Why a JIT build cannot start here (no C++ compiler, no ninja), or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; set CXX or install g++/clang)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary in its bin dir)
        except ImportError:
            return "ninja is not installed (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


def jit_build(torch, build_dir: str, csrc: str, cuda: bool, text: str) -> str:
    """Compile the extension into ``build_dir`` with ninja (loading it); returns the library's path."""
    archs = ""
    import logging
    if cuda:
        os.environ["CUDA_HOME"] = find_cuda_home()
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about CUDA_HOME even for a CPU-only build
    try:
        from torch.utils import cpp_extension as ce
    finally:
        log.setLevel(level)
    if cuda:
        ce.CUDA_HOME = os.environ["CUDA_HOME"]  # imported earlier by someone else: its guess may be wrong
        archs = build_archs()
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    old_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        sources = source_files(csrc, cuda) + [write_stamp_source(os.path.join(build_dir, "build_stamp.cpp"), text)]
        ce.load(name=JIT_NAME, sources=sources, extra_cflags=CXX_FLAGS + (["-DWITH_CUDA"] if cuda else []),
                extra_cuda_cflags=list(NVCC_FLAGS), extra_ldflags=list(LDFLAGS), extra_include_paths=[csrc],
                build_directory=build_dir, with_cuda=cuda, is_python_module=False, verbose=False)
    finally:
        if old_archs is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_archs
    return os.path.join(build_dir, JIT_NAME + ".so")
