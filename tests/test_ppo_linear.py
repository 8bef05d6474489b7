"""The PPO stage on rf.linear_ppo_loss (packed response tokens, hidden states + lm head) gives the
loss curve of the logits path on the same seed."""
import pytest
import torch

from rlhf_fast.train import ppo
from rlhf_fast.train.config import PPOConfig, load_config
from rlhf_fast.train.model import Transformer
from test_train import tiny_run  # noqa: F401  (the module-scoped tiny pipeline fixture)

LOSSES = ("pg_loss", "vf_loss", "entropy", "ptx_loss", "kl", "mean_score", "clipfrac", "approx_kl")


def _overrides(out):
    return [f"init={out}/sft/model.safetensors", f"reward_model={out}/reward/model.safetensors", "iterations=2",
            "rollout_size=8", "minibatch_size=4", "ppo_epochs=2", "ptx_batch_size=4", "max_new_tokens=6",
            "entropy_coef=0.01", "device=cpu"]


def test_linear_and_logits_impls_give_the_same_loss_curve(tiny_run, tmp_path, monkeypatch):  # noqa: F811
    out, _ = tiny_run
    runs, lm_logits = {}, {}
    forward = Transformer.forward

    def counting_forward(self, idx, *a, **kw):  # counts lm-head logits computed by the policy update
        res = forward(self, idx, *a, **kw)
        if self.head_kind == "lm" and not kw.get("return_hidden") and torch.is_grad_enabled():
            lm_logits[impl] = lm_logits.get(impl, 0) + 1
        return res

    monkeypatch.setattr(Transformer, "forward", counting_forward)
    for impl in ("logits", "linear"):
        cfg = load_config(PPOConfig, overrides=_overrides(out) + [f"loss_impl={impl}", "ptx_coef=0"])
        runs[impl] = ppo.train(cfg, str(tmp_path / impl))["history"]
    assert len(runs["linear"]) == 2
    for a, b in zip(runs["linear"], runs["logits"]):
        for k in LOSSES:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert lm_logits.get("logits", 0) > 0 and lm_logits.get("linear", 0) == 0  # no [B, T, V] logits with grad


def test_linear_impl_with_ptx(tiny_run, tmp_path):  # noqa: F811
    out, _ = tiny_run
    hist = {impl: ppo.train(load_config(PPOConfig, overrides=_overrides(out) + [f"loss_impl={impl}"]),
                            str(tmp_path / impl))["history"] for impl in ("logits", "linear")}
    for a, b in zip(hist["linear"], hist["logits"]):
        for k in LOSSES:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_bad_loss_impl(tiny_run, tmp_path):  # noqa: F811
    out, _ = tiny_run
    with pytest.raises(ValueError, match="loss_impl"):
        ppo.train(load_config(PPOConfig, overrides=_overrides(out) + ["loss_impl=fused"]), str(tmp_path / "x"))
