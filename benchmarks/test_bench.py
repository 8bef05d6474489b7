"""The benchmark cases as pytest-benchmark tests: `pytest benchmarks/` (not part of `pytest tests`).

Each op × backend/peer × dtype × size is one test timing the full step (fwd+bwd, or fwd for
forward-only ops) at the small CPU sizes, or the GPU sizes with RLHF_FAST_BENCH_DEVICE=cuda.
Compare runs with pytest-benchmark's own flags (--benchmark-autosave, --benchmark-compare).
"""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed; `pip install pytest-benchmark`")

from benchmarks import harness as H  # noqa: E402

DEVICE = os.environ.get("RLHF_FAST_BENCH_DEVICE", "cpu")
PRESET = os.environ.get("RLHF_FAST_BENCH_SIZES", "tiny" if DEVICE == "cpu" else "gpu")
# torch.compile is left out on the CPU: minutes of compiling on a small machine
_OPTS = H.Options(device=DEVICE, preset=PRESET,
                  peers=None if DEVICE != "cpu" else ["python-loop", "trl", "liger", "flash-attn"])


def _cases():
    for bench in H.load_benches():
        impls = H.impls_for(bench, _OPTS)
        for dname in bench.dtypes["cuda" if DEVICE.startswith("cuda") else "cpu"]:
            for shape in bench.sizes[PRESET]:
                for impl in impls:
                    yield pytest.param(bench, impl, dname, shape,
                                       id=f"{bench.op}-{impl.name}-{dname}-{H.shape_label(shape).replace(' ', ',')}")


@pytest.mark.parametrize("bench,impl,dname,shape", list(_cases()))
def test_bench(benchmark, bench, impl, dname, shape):
    if impl.fn is None:
        pytest.skip(impl.note)
    torch.manual_seed(0)
    inp = bench.make_inputs(shape, H.DTYPES[dname], DEVICE)
    leaves = [inp[k] for k in bench.grad_inputs]
    grad_cache: dict = {}

    def step():
        for t in leaves:
            t.grad = None
        out = impl.fn(inp)
        if bench.has_backward:
            outs = bench.outputs(out)
            torch.autograd.backward(outs, H.grads_for(outs, grad_cache))
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(op=bench.op, impl=impl.name, kind=impl.kind, dtype=dname, shape=shape,
                                device=H.device_name(DEVICE))
    benchmark(step)
