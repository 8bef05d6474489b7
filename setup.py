"""Build rlhf_fast, with its compiled extension ``rlhf_fast._C`` when torch imports at build time.

The package always installs. The extension is built here (ahead of time) when torch can be imported
by this script: `pip install --no-build-isolation .` (or `make setup`, an editable install). A plain
`pip install .` / `pip install rlhf_fast-<v>.tar.gz` builds in pip's isolated environment, which has no
torch: then the package installs without it and the first import builds it with ninja into the user's
cache (rlhf_fast/_build.py, which holds the sources, flags and switches shared by both paths). The C++
and CUDA sources are installed in the package (rlhf_fast/_csrc) for that.

The C++ CPU sources (csrc/*.cpp) are always built. The CUDA sources (csrc/*.cu) are added when torch
has CUDA and a CUDA toolkit is found. Switches (environment):
  RLHF_FAST_BUILD=auto|aot|jit|none   auto (default): build here if torch imports; aot: build here or fail;
                                      jit / none: build nothing here
  RLHF_FAST_CUDA=auto|1|0             auto (default), force the CUDA build (fail if impossible), skip it
  RLHF_FAST_NO_EXT=1                  the same as RLHF_FAST_BUILD=none
  TORCH_CUDA_ARCH_LIST                honoured; default "9.0" (H100/H200) when unset
  MAX_JOBS                            parallel compile jobs; set to the core count only when unset
"""
import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("rlhf_fast_build", os.path.join(ROOT, "rlhf_fast", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)  # by path: importing the package would import torch


class BuildPyWithSources(build_py):
    """Install csrc/ in the package as rlhf_fast/_csrc: the first-use build compiles from it."""

    def run(self):
        for stale in glob.glob(os.path.join(self.build_lib, "rlhf_fast", "_C*.so")):
            os.remove(stale)  # an earlier in-tree build's: build_ext writes a fresh one when it builds
        super().run()
        dst = os.path.join(self.build_lib, "rlhf_fast", "_csrc")
        os.makedirs(dst, exist_ok=True)
        for pattern in _build.SOURCE_GLOBS:
            for p in glob.glob(os.path.join(ROOT, "csrc", pattern)):
                shutil.copy2(p, dst)


def _extensions():
    mode = "none" if os.environ.get("RLHF_FAST_NO_EXT") == "1" else _build.build_mode()
    if mode in ("jit", "none"):
        return [], {}
    try:
        import torch
    except ImportError:
        if mode == "aot":
            raise RuntimeError("RLHF_FAST_BUILD=aot but torch does not import in this build environment: install "
                               "torch first and build with `pip install --no-build-isolation .`") from None
        print("rlhf_fast: torch does not import at build time (pip's isolated build): the C++ extension will be "
              "built on first use")
        return [], {}
    cuda = _build.with_cuda(torch)
    if cuda:
        os.environ["CUDA_HOME"] = _build.find_cuda_home()  # before cpp_extension is imported: it reads it then
    from torch.utils import cpp_extension as ce

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _build.DEFAULT_ARCH)
    csrc = os.path.join(ROOT, "csrc")
    stamp_src = _build.write_stamp_source(os.path.join(ROOT, "build", "stamp", "build_stamp.cpp"),
                                          _build.stamp(torch.__version__, cuda, _build.source_hash(csrc)))
    # setuptools wants source paths relative to setup.py; include dirs absolute
    sources = [os.path.relpath(p, ROOT) for p in _build.source_files(csrc, cuda) + [stamp_src]]
    kwargs = dict(name="rlhf_fast._C", sources=sources, include_dirs=[csrc],
                  extra_compile_args={"cxx": _build.CXX_FLAGS + (["-DWITH_CUDA"] if cuda else [])},
                  extra_link_args=list(_build.LDFLAGS))
    if cuda:
        kwargs["extra_compile_args"]["nvcc"] = list(_build.NVCC_FLAGS)
    ext = ce.CUDAExtension(**kwargs) if cuda else ce.CppExtension(**kwargs)
    print(f"rlhf_fast: building the C++ CPU extension{' with CUDA sources' if cuda else ''} "
          f"against torch {torch.__version__}")
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(exclude=("csrc", "tests", "tests.*", "benchmarks", "benchmarks.*")),
    package_data={"rlhf_fast.train": ["data/*"]},
    include_package_data=False,  # package_data is the whole list (csrc goes in by BuildPyWithSources)
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPyWithSources},
)
