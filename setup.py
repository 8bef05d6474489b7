"""Build rlhf_fast with its compiled extension ``rlhf_fast._C``.

The C++ CPU sources (csrc/*.cpp) are always built. The CUDA sources (csrc/*.cu) are added when
torch has CUDA and a CUDA toolkit is found. Switches (environment):
  RLHF_FAST_CUDA=auto|1|0   auto (default), force the CUDA build (fail if impossible), skip it
  RLHF_FAST_NO_EXT=1        build no extension at all (pure-Python install; reference + Triton)
  TORCH_CUDA_ARCH_LIST      honoured; default "9.0" (H100/H200) when unset
  MAX_JOBS                  parallel compile jobs; set to the core count only when unset
Install with `pip install --no-build-isolation -e .` so the extension is built against the torch
already installed.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# nvcc flags of the CUDA sources (also read by benchmarks/static_profile.py, which compiles them to cubins)
NVCC_FLAGS = ["-O3", "-std=c++20", "-DWITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]


def _extensions():
    if os.environ.get("RLHF_FAST_NO_EXT") == "1":
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        # torch guesses CUDA_HOME as nvcc's grandparent, wrong when nvcc is a wrapper or link in
        # /usr/local/bin (then cudart does not link): take the first toolkit that has the runtime.
        nvcc = shutil.which("nvcc")
        guesses = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
        found = [g for g in guesses if os.path.exists(os.path.join(g, "include", "cuda_runtime.h"))]
        if found:
            os.environ["CUDA_HOME"] = found[0]  # before cpp_extension is imported: it reads it then
    import torch
    from torch.utils import cpp_extension as ce

    mode = os.environ.get("RLHF_FAST_CUDA", "auto").lower()
    cuda_ok = torch.version.cuda is not None and ce.CUDA_HOME is not None
    if mode in ("1", "true", "force") and not cuda_ok:
        raise RuntimeError(
            "RLHF_FAST_CUDA=1 but the CUDA build is impossible: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={ce.CUDA_HOME}")
    with_cuda = cuda_ok and mode not in ("0", "false", "skip")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

    csrc = os.path.join(ROOT, "csrc")
    # setuptools wants source paths relative to setup.py; include dirs absolute
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(csrc, "*.cpp")))
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    kwargs = dict(name="rlhf_fast._C", sources=sources, include_dirs=[csrc],
                  extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if with_cuda:
        kwargs["sources"] += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(csrc, "*.cu")))
        kwargs["extra_compile_args"]["cxx"].append("-DWITH_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = list(NVCC_FLAGS)
        ext = ce.CUDAExtension(**kwargs)
    else:
        ext = ce.CppExtension(**kwargs)
    print(f"rlhf_fast: building the C++ CPU extension{' with CUDA sources' if with_cuda else ''}")
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(exclude=("csrc", "tests", "tests.*", "benchmarks", "benchmarks.*")),
    package_data={"rlhf_fast.train": ["data/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
