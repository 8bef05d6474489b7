"""Backend choice, the compiled ops' torch.library registration (opcheck, torch.compile), import safety."""
import subprocess
import sys

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import _backend, _compiled

needs_ext = pytest.mark.skipif(not _compiled.LOADED, reason="compiled extension not built")


def test_reference_always_available():
    assert rf.available_backends()["reference"] == "ok"
    assert "reference" in rf.backends_for("logprobs", "cpu")


def test_explicit_backend_is_strict():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="unknown backend"):
        rf.logprobs(x, torch.zeros(2, dtype=torch.long), backend="tpu")
    with pytest.raises(RuntimeError, match="unavailable"):
        rf.logprobs(x, torch.zeros(2, dtype=torch.long), backend="cuda")  # CPU tensor on the cuda backend


def test_use_backend_context_selects_and_restores():
    calls = []
    _backend.register("_probe", "reference")(lambda x: calls.append("reference"))
    _backend.register("_probe", "triton")(lambda x: calls.append("triton"))
    cpu = torch.device("cpu")
    _backend.select("_probe", cpu)(0)
    with rf.use_backend("reference"):
        _backend.select("_probe", cpu)(0)
    assert calls == ["reference", "reference"]
    with rf.use_backend("cpu"):  # _probe has no cpu backend: automatic choice
        _backend.select("_probe", cpu)(0)
    assert _backend.current_override() is None


@needs_ext
def test_cpu_tensors_default_to_the_compiled_backend():
    assert _backend.select("logprobs", torch.device("cpu")) is _backend._registry["logprobs"]["cpu"]
    assert _backend.select("gae", torch.device("cpu")) is _backend._registry["gae"]["cpu"]


@needs_ext
def test_opcheck_compiled_ops():
    ops = torch.ops.rlhf_fast
    logits = torch.randn(5, 37, requires_grad=True)
    labels = torch.tensor([0, 36, -100, 5, 9])
    torch.library.opcheck(ops.logprobs_fwd, (logits, labels, 1.25, -100))
    logp, ent, lse = ops.logprobs_fwd(logits.detach(), labels, 1.25, -100)
    torch.library.opcheck(ops.logprobs_bwd, (torch.randn(5), torch.randn(5), logits.detach(), labels, lse, ent, 1.25, -100))
    r, v = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    m = torch.rand(3, 8) > 0.3
    torch.library.opcheck(ops.gae_fwd, (r, v, m, 0.99, 0.95))
    torch.library.opcheck(ops.gae_bwd, (torch.randn(3, 8), torch.randn(3, 8), m, 0.99, 0.95))


@needs_ext
def test_torch_compile_through_compiled_ops():
    logits = torch.randn(6, 50, requires_grad=True)
    labels = torch.randint(0, 50, (6,))

    def f(x):
        lp, ent = rf.logprobs(x, labels, return_entropy=True, backend="cpu")
        return (lp + 0.1 * ent).sum()

    out = torch.compile(f, fullgraph=True)(logits)
    (g,) = torch.autograd.grad(out, logits)
    out_e = f(logits)
    (g_e,) = torch.autograd.grad(out_e, logits)
    assert torch.allclose(out, out_e) and torch.allclose(g, g_e, atol=1e-6)


def test_import_without_extension_explains():
    # a fresh interpreter where rlhf_fast._C cannot be imported: the package still works on the reference
    code = (
        "import sys; sys.modules['rlhf_fast._C'] = None\n"
        "import torch, rlhf_fast as rf\n"
        "print(rf.available_backends()['cpu'])\n"
        "print(float(rf.logprobs(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))[0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "did not load" in out and "rebuild" in out
    assert float(out.strip().splitlines()[-1]) == pytest.approx(-1.3862943611198906)
