"""The host-sync checks switch (issue 10, item 5): ``RLHF_FAST_CHECKS=1|0`` and ``rf.checks(True|False)``,
on by default for CPU tensors and off for CUDA tensors. With checks off no public op, on any backend,
forward or backward, calls aten::_local_scalar_dense (the host sync behind .item(), bool(), int());
with checks on, bad input raises the ValueError it always raised."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_fast as rf
from rlhf_fast import _backend, _checks
from utils import DEVICE, backends


class CountSyncs(TorchDispatchMode):
    """Counts aten::_local_scalar_dense (every .item() / bool() / int() of a tensor goes through it)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _inputs():
    B, T, V, H = 2, 5, 19, 8
    f = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE).requires_grad_()  # noqa: E731
    mask = torch.rand(B, T, device=DEVICE) > 0.3
    mask[:, 0] = True
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[0, 1] = -100
    return B, T, V, H, f, mask, labels


def _calls():
    """(op name, fn(backend) -> a tensor or a tuple to differentiate) for every public op."""
    B, T, V, H, f, mask, labels = _inputs()
    lp, old, adv = -f(B, T).abs(), -f(B, T).abs(), f(B, T)
    return [
        ("logprobs", lambda b: rf.logprobs(f(B, T, V), labels, return_entropy=True, backend=b)),
        ("linear_logprobs", lambda b: rf.linear_logprobs(f(B * T, H), f(V, H), labels.reshape(-1), bias=f(V),
                                                         return_entropy=True, backend=b)),
        ("kl", lambda b: rf.kl(lp, old, estimator="k3", clamp=5.0, backend=b)),
        ("gae", lambda b: rf.gae(f(B, T), f(B, T), mask, gamma=0.9, backend=b)),
        ("reinforce_pp_returns", lambda b: rf.reinforce_pp_returns(f(B, T), mask, backend=b)),
        ("grpo_advantages", lambda b: rf.grpo_advantages(f(8), 4, backend=b)),
        ("rloo_advantages", lambda b: rf.rloo_advantages(f(8), 4, backend=b)),
        ("kl_penalized_rewards", lambda b: rf.kl_penalized_rewards(f(B), lp, old, mask, beta=0.1, backend=b)),
        ("ppo_policy_loss", lambda b: rf.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, backend=b)),
        ("ppo_value_loss", lambda b: rf.ppo_value_loss(f(B, T), f(B, T), f(B, T), mask, backend=b)),
        ("ppo_loss_from_logits", lambda b: rf.ppo_loss_from_logits(f(B, T, V), labels, old, adv, mask, ref_logp=lp,
                                                                   kl_coef=0.1, entropy_coef=0.01, backend=b)),
        ("masked_mean", lambda b: rf.masked_mean(f(B, T), mask)),
        ("masked_whiten", lambda b: rf.masked_whiten(f(B, T), mask)),
        ("pairwise_reward_loss", lambda b: rf.pairwise_reward_loss(f(4), f(4), margin=0.1)),
    ]


def _differentiate(out):
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    outs = [o for x in outs for o in (x.values() if isinstance(x, dict) else [x])]
    total = sum((o.double() * torch.randn_like(o, dtype=torch.float64)).sum() for o in outs if o.requires_grad)
    total.backward()


_CASES = [(name, b) for name, _ in _calls()
          for b in (backends(name) if name in _backend._registry else [None])]


@pytest.mark.parametrize("name,backend", _CASES)
def test_no_host_sync_with_checks_off(name, backend):
    fn = dict(_calls())[name]
    with rf.checks(False), CountSyncs() as mode:
        _differentiate(fn(backend))
    assert mode.n == 0, f"{name} on {backend}: {mode.n} calls of aten::_local_scalar_dense with checks off"


def test_checks_on_sync_and_raise():
    labels = torch.tensor([0, 7, -100], device=DEVICE)
    logits = torch.randn(3, 5, device=DEVICE)
    with rf.checks(True), CountSyncs() as mode:
        rf.logprobs(logits, torch.tensor([0, 4, -100], device=DEVICE))
    assert mode.n > 0  # the check really looks at the data
    with rf.checks(True):
        with pytest.raises(ValueError, match="labels must be in"):
            rf.logprobs(logits, labels)
        with pytest.raises(ValueError, match="labels must be in"):
            z = torch.zeros(1, 3, device=DEVICE)
            rf.ppo_loss_from_logits(logits[None], labels[None], z, z, z + 1)
        with pytest.raises(ValueError, match="at least two"):
            rf.masked_whiten(torch.randn(4, device=DEVICE), torch.tensor([0, 1, 0, 0], device=DEVICE))


def test_checks_off_lets_bad_values_through_to_the_kernel_contract():
    with rf.checks(False), CountSyncs() as mode:
        _checks.labels_in_range(torch.tensor([0, 7, -1]), 5, -100)  # no check, no sync, no error
        out = rf.masked_whiten(torch.randn(4, dtype=torch.float64), torch.tensor([0, 1, 0, 0]))
    assert mode.n == 0
    assert out.isnan().all()  # one element: the unbiased variance is 0/0


def test_default_on_for_cpu_off_for_cuda(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_CHECKS", raising=False)
    assert _checks.enabled(torch.device("cpu"))
    assert not _checks.enabled(torch.device("cuda", 0))  # only the device type is looked at: no GPU needed
    with rf.checks(True):
        assert _checks.enabled(torch.device("cuda", 0))
        with rf.checks(False):
            assert not _checks.enabled(torch.device("cpu"))
        with rf.checks(None):  # back to the default
            assert _checks.enabled(torch.device("cpu")) and not _checks.enabled(torch.device("cuda"))
        assert _checks.enabled(torch.device("cpu"))
    assert not _checks.enabled(torch.device("cuda"))


def test_environment_switch(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_CHECKS", "0")
    assert not _checks.enabled(torch.device("cpu"))
    rf.logprobs(torch.randn(2, 5), torch.tensor([0, 3]))  # runs
    monkeypatch.setenv("RLHF_FAST_CHECKS", "1")
    assert _checks.enabled(torch.device("cuda"))
    with pytest.raises(ValueError, match="labels must be in"):
        rf.logprobs(torch.randn(2, 5), torch.tensor([0, 5]))
    with rf.checks(False):  # the code switch wins over the environment
        assert not _checks.enabled(torch.device("cpu"))
    monkeypatch.setenv("RLHF_FAST_CHECKS", "yes please")
    with pytest.raises(ValueError, match="RLHF_FAST_CHECKS"):
        _checks.enabled(torch.device("cpu"))


def test_checks_rejects_non_bool():
    with pytest.raises(ValueError, match="checks"):
        with rf.checks("off"):
            pass
