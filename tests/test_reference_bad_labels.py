"""The reference backend with the checks off (issue 20, item 6): an out-of-range label gives a NaN row
(logp, entropy, gradient), nothing is read out of bounds, every other row is unchanged, eagerly and under
torch.compile (which used to abort the process in the generated code: run in a child process)."""
import os
import subprocess
import sys
import textwrap

import torch

import rlhf_fast as rf

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(fn, x, labels):
    x = x.detach().requires_grad_()
    lp, ent = fn(x, labels)
    g = torch.linspace(-1, 1, lp.numel(), dtype=lp.dtype).view_as(lp)
    (gx,) = torch.autograd.grad((lp * g).sum() + (ent * g.flip(0)).sum(), x)
    return lp.detach(), ent.detach(), gx


def _inputs(V=37):
    torch.manual_seed(0)
    x = torch.randn(6, V) * 3
    labels = torch.randint(0, V, (6,))
    labels[3] = -100
    bad = labels.clone()
    bad[2], bad[4] = -1, V
    return x, labels, bad


def _assert_poisoned(clean, dirty, rows=(2, 4)):
    others = [r for r in range(clean[0].shape[0]) if r not in rows]
    for i, (c, d) in enumerate(zip(clean, dirty)):
        assert torch.equal(c[others], d[others]), f"output {i}: a bad label changed another row"
        for r in rows:
            assert d[r].isnan().all(), f"output {i}: row {r} with a bad label is {d[r]}, not NaN"


def test_reference_logprobs_bad_labels_checks_off():
    x, labels, bad = _inputs()

    def fn(x, y):
        return rf.logprobs(x, y, return_entropy=True, temperature=0.7, backend="reference")
    with rf.checks(False):
        _assert_poisoned(_run(fn, x, labels), _run(fn, x, bad))


def test_reference_ppo_loss_from_logits_bad_labels_checks_off():
    x, labels, bad = _inputs()
    old, adv = -torch.rand(6) * 4, torch.randn(6)

    def fn(y):
        xx = x.clone().requires_grad_()
        loss, st = rf.ppo_loss_from_logits(xx, y, old, adv, torch.ones(6, dtype=torch.bool), ref_logp=old,
                                           kl_coef=0.1, entropy_coef=0.1, backend="reference")
        loss.backward()
        return loss.detach(), st["entropy"], xx.grad
    with rf.checks(False):
        clean, dirty = fn(labels), fn(bad)
    assert clean[0].isfinite() and dirty[0].isnan() and dirty[1].isnan()
    assert torch.equal(clean[2][[0, 1, 3, 5]], dirty[2][[0, 1, 3, 5]])
    assert dirty[2][[2, 4]].isnan().all()


def test_reference_bad_labels_under_torch_compile():
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        import rlhf_fast as rf
        from test_reference_bad_labels import _inputs, _run, _assert_poisoned
        x, labels, bad = _inputs()
        def fn(x, y):
            return rf.logprobs(x, y, return_entropy=True, temperature=0.7, backend="reference")
        cfn = torch.compile(fn, fullgraph=True)
        with rf.checks(False):
            clean, dirty = _run(cfn, x, labels), _run(cfn, x, bad)
        _assert_poisoned(clean, dirty)
        print("ok")
    """ % HERE)
    root = os.path.dirname(HERE)
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": root})
    assert p.returncode == 0 and "ok" in p.stdout, f"rc {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
