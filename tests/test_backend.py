"""Backend choice, the compiled ops' torch.library registration (opcheck, torch.compile), import safety."""
import os
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
    env = {**os.environ, "RLHF_FAST_BUILD": "aot"}  # only the install's build: no first-use build here
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert "did not load" in out and "rebuild" in out
    assert float(out.strip().splitlines()[-1]) == pytest.approx(-1.3862943611198906)


def test_available_backends_without_a_gpu(monkeypatch):
    # what a machine without a GPU reports (this one, or a GPU machine made to look like one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    av = rf.available_backends()
    assert av["reference"] == "ok"
    assert not av["cuda"].startswith("ok")
    if _compiled.LOADED and _compiled.has_kernel("gae_fwd", "CUDA"):  # built with CUDA: no device is the reason
        assert "no CUDA device" in av["cuda"] and "cannot be made" in av["cuda"]
    if rf.why_unavailable("triton") is None:  # triton installed: usable here only through the interpreter
        assert av["triton"].startswith("ok") and "CPU tensors only" in av["triton"]
        assert "TRITON_INTERPRET=1" in av["triton"] and "no CUDA device" in av["triton"]
        assert "triton" in rf.backends_for("gae", "cpu")
        monkeypatch.delenv("TRITON_INTERPRET")
        av = rf.available_backends()
        assert not av["triton"].startswith("ok") and "only under TRITON_INTERPRET=1" in av["triton"]
        assert "triton" not in rf.backends_for("gae", "cpu")
    assert "cuda" not in rf.backends_for("gae", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_available_backends_with_a_gpu():
    av = rf.available_backends()
    assert av["triton"] == "ok" or rf.why_unavailable("triton") is not None
    assert av["cuda"] == "ok" or not _compiled.has_kernel("gae_fwd", "CUDA")


def test_device_guard():
    import contextlib
    assert isinstance(_backend.device_guard(torch.device("cpu")), contextlib.nullcontext)
    guard = _backend.device_guard(torch.device("cuda", 1))  # built, not entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


_TRITON_MODULES = ("kl", "ppo_loss", "gae", "advantages")


@pytest.mark.skipif(rf.why_unavailable("triton") is not None, reason="triton not installed")
def test_every_triton_launch_runs_under_the_device_guard(monkeypatch):
    """Each launcher of ops/{kl,ppo_loss,gae,advantages}.py launches inside _backend.device_guard of its
    tensors' device (on a GPU: torch.cuda.device, so tensors on cuda:1 need no set_device)."""
    import contextlib
    import importlib

    from utils import DEVICE

    if "triton" not in rf.backends_for("gae", DEVICE):
        pytest.skip("the triton backend cannot run on this device here")
    state = {"inside": 0, "devices": set()}
    launches = []

    @contextlib.contextmanager
    def guard(device):
        state["devices"].add(torch.device(device))
        state["inside"] += 1
        try:
            yield
        finally:
            state["inside"] -= 1

    class Spy:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launch = self.fn[grid]

            def run(*args, **kwargs):
                launches.append((self.name, state["inside"] > 0))
                return launch(*args, **kwargs)
            return run

    monkeypatch.setattr(_backend, "device_guard", guard)
    for mod_name in _TRITON_MODULES:
        mod = importlib.import_module(f"rlhf_fast.ops.{mod_name}")
        for name in dir(mod):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, Spy(name, getattr(mod, name)))

    f = lambda *s: torch.randn(*s, device=DEVICE, requires_grad=True)  # noqa: E731
    mask = torch.rand(2, 6, device=DEVICE) > 0.3
    outs = [
        rf.kl(f(2, 6), f(2, 6), clamp=1.0, backend="triton"),
        *rf.gae(f(2, 6), f(2, 6), mask, backend="triton"),
        rf.reinforce_pp_returns(f(2, 6), mask, backend="triton"),
        rf.grpo_advantages(f(8), 4, backend="triton"),
        rf.rloo_advantages(f(8), 4, backend="triton"),
        rf.kl_penalized_rewards(f(2), f(2, 6), f(2, 6), mask, beta=0.1, backend="triton"),
        rf.ppo_policy_loss(f(2, 6), f(2, 6), f(2, 6), mask, backend="triton")[0],
        rf.ppo_value_loss(f(2, 6), f(2, 6), f(2, 6), mask, backend="triton")[0],
    ]
    sum(o.sum() for o in outs).backward()
    names = {n for n, _ in launches}
    assert names == {"_kl_fwd_kernel", "_gae_fwd_kernel", "_gae_bwd_kernel", "_group_kernel",
                     "_kl_rewards_kernel", "_policy_fwd_kernel", "_value_fwd_kernel"}, names
    assert all(inside for _, inside in launches), [n for n, inside in launches if not inside]
    assert {d.type for d in state["devices"]} == {torch.device(DEVICE).type}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_ops_on_the_second_gpu():
    from rlhf_fast import reference as ref
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    x, y = torch.randn(3, 40, device=dev), torch.randn(3, 40, device=dev)
    mask = torch.rand(3, 40, device=dev) > 0.2
    assert torch.allclose(rf.kl(x, y, backend="triton"), ref.kl(x, y), atol=1e-5)
    a, r = rf.gae(x, y, mask, backend="triton")
    a_ref, r_ref = ref.gae(x, y, mask)
    assert torch.allclose(a, a_ref, atol=1e-4) and torch.allclose(r, r_ref, atol=1e-4)
    loss, _ = rf.ppo_policy_loss(x, y, x, mask, backend="triton")
    assert torch.allclose(loss, ref.ppo_policy_loss(x, y, x, mask)[0], atol=1e-5)
