"""rlhf_fast.integrations.verl against the installed verl 0.9.1: the rf_* estimators and rf_vanilla through
verl's own registries and dispatch (ray_trainer.compute_advantage), against verl's builtin ones; the patched
compute_value_loss and kl_penalty against verl's originals, forward and backward."""
import sys
import warnings

import numpy as np
import pytest
import torch

core = pytest.importorskip("verl.trainer.ppo.core_algos",
                           reason="verl is not installed (pip install verl==0.9.1 --no-deps + its core deps)")
OmegaConf = pytest.importorskip("omegaconf").OmegaConf

from rlhf_fast.integrations import verl as rf_verl  # noqa: E402

from utils import assert_rel  # noqa: E402

ORIG_VALUE_LOSS, ORIG_KL = core.compute_value_loss, core.kl_penalty


@pytest.fixture
def registered():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rf_verl.register()
    yield
    rf_verl.unregister()
    assert "rf_gae" not in core.ADV_ESTIMATOR_REGISTRY and core.compute_value_loss is ORIG_VALUE_LOSS


def _batch(B=8, T=11, seed=0, holes=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    if holes:  # multi-turn: observation tokens inside the response
        mask[:, 2:4] = 0
        mask[:, 0] = 1
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), (lengths - 1).clamp(min=0)] = torch.randn(B, generator=g)
    rewards += 0.01 * torch.randn(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g)
    uid = np.array(["a", "a", "a", "b", "b", "c", "d", "d"][:B], dtype=object)  # uneven groups, a singleton
    return rewards, values, mask, uid


def _where(mask, x):
    return x * mask


@pytest.mark.parametrize("holes", [False, True])
def test_advantage_estimators_match_verl(registered, holes):
    rewards, values, mask, uid = _batch(holes=holes)
    cfg = OmegaConf.create({"gamma": 0.97, "lam": 0.9, "norm_adv_by_std_in_grpo": True})
    a, r = core.get_adv_estimator_fn("rf_gae")(rewards, mask, config=cfg, values=values, gamma=0.97, lam=0.9)
    ea, er = core.compute_gae_advantage_return(rewards, values, mask, 0.97, 0.9)
    assert_rel(a, _where(mask, ea), 1e-5, "rf_gae advantages")
    assert_rel(_where(mask, r), _where(mask, er), 1e-5, "rf_gae returns")
    for norm in (True, False):
        cfg.norm_adv_by_std_in_grpo = norm
        a, _ = core.get_adv_estimator_fn("rf_grpo")(rewards, mask, index=uid, config=cfg)
        ea, _ = core.compute_grpo_outcome_advantage(rewards.clone(), mask, uid, norm_adv_by_std_in_grpo=norm)
        assert_rel(a, ea, 1e-6, f"rf_grpo norm={norm}")
    a, _ = core.get_adv_estimator_fn("rf_rloo")(rewards, mask, index=uid, config=cfg)
    assert_rel(a, core.compute_rloo_outcome_advantage(rewards.clone(), mask, uid, config=cfg)[0], 1e-6, "rf_rloo")
    a, r = core.get_adv_estimator_fn("rf_reinforce_plus_plus")(rewards, mask, config=cfg)
    ea, er = core.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=cfg)
    assert_rel(a, ea, 1e-5, "rf_reinforce_plus_plus advantages")
    assert_rel(r, er, 1e-6, "rf_reinforce_plus_plus returns")


def test_rf_gae_end_to_end_through_ray_trainer_dispatch(registered):
    rt = pytest.importorskip("verl.trainer.ppo.ray_trainer")
    from verl.protocol import DataProto
    rewards, values, mask, uid = _batch(seed=3)

    def data():
        return DataProto.from_dict(tensors={"token_level_rewards": rewards.clone(), "values": values.clone(),
                                            "response_mask": mask.clone()}, non_tensors={"uid": uid.copy()})

    cfg = OmegaConf.create({"gamma": 0.95, "lam": 0.9, "use_pf_ppo": False, "norm_adv_by_std_in_grpo": True})
    before = rf_verl.calls["rf_gae"]
    out = rt.compute_advantage(data(), "rf_gae", gamma=0.95, lam=0.9, config=cfg)
    assert rf_verl.calls["rf_gae"] == before + 1
    expect = rt.compute_advantage(data(), core.AdvantageEstimator.GAE, gamma=0.95, lam=0.9, config=cfg)
    assert_rel(out.batch["advantages"], _where(mask, expect.batch["advantages"]), 1e-5, "advantages")
    assert_rel(_where(mask, out.batch["returns"]), _where(mask, expect.batch["returns"]), 1e-5, "returns")
    # the other estimators still go through verl's own branches, and the rf ones through the registry
    g = rt.compute_advantage(data(), "rf_grpo", config=cfg)
    e = rt.compute_advantage(data(), core.AdvantageEstimator.GRPO, config=cfg)
    assert_rel(g.batch["advantages"], e.batch["advantages"], 1e-6, "rf_grpo via dispatch")
    # rf_gae starts a critic, as gae does
    from verl.trainer.ppo import utils as ppo_utils
    conf = OmegaConf.create({"critic": {"enable": None}, "algorithm": {"adv_estimator": "rf_gae"}})
    assert ppo_utils.need_critic(conf) and rt.need_critic(conf)
    assert rt.compute_advantage.__wrapped__ is not None


def test_rf_gae_without_values_says_how():
    with pytest.raises(ValueError, match="register"):
        rf_verl.compute_rf_gae(torch.zeros(2, 3), torch.ones(2, 3))


def _actor_cfg(agg_info):
    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
                             "global_batch_info": agg_info})


def _rf_and_verl(core, loss, old, lp, adv, mask, agg, cfg, w):
    """(loss, metrics, grads of old, lp, adv) of verl's registered policy loss rf_<loss>, then of its own <loss>."""
    res = []
    for name in (f"rf_{loss}", loss):
        leaves = [t.clone().requires_grad_() for t in (old, lp, adv)]
        out, metrics = core.get_policy_loss_fn(name)(*leaves, mask, loss_agg_mode=agg, config=cfg,
                                                     rollout_is_weights=w)
        out.backward()
        res.append((out, metrics, [t.grad for t in leaves]))
    return res


INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 70, "global_batch_size": 13, "loss_scale_factor": None},
         {"dp_size": 1, "batch_num_tokens": 40, "global_batch_size": 9, "loss_scale_factor": 16}]


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                                 "seq-mean-token-mean"])
@pytest.mark.parametrize("info", range(len(INFOS)))
@pytest.mark.parametrize("is_weights", [False, True])
def test_rf_vanilla_matches_vanilla(registered, agg, info, is_weights):
    g = torch.Generator().manual_seed(4)
    B, T = 6, 10
    lp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3)
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    mask[0] = 0
    w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 if is_weights else None
    cfg = _actor_cfg(INFOS[info])
    (l1, m1, g1), (l2, m2, g2) = _rf_and_verl(core, "vanilla", old, lp, adv, mask, agg, cfg, w)
    tol = 1e-7 if agg == "seq-mean-token-mean" else 1e-10  # verl divides by (row count + 1e-8), rf by the count
    assert_rel(l1, l2, tol, f"{agg} loss")
    assert set(m1) == set(m2) and all(isinstance(v, float) for v in m1.values())
    for k in m1:
        assert abs(m1[k] - m2[k]) < 1e-8, (k, m1[k], m2[k])
    for a, b, n in zip(g1, g2, ("old", "logp", "adv")):
        assert_rel(a, b, tol, f"{agg} d {n}")


def _verl_actor_cfg(agg_info):
    """verl's gspo / cispo assert an ActorConfig (an OmegaConf dict is refused)."""
    from verl.workers.config.actor import ActorConfig
    cfg = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                      ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=2, rollout_n=1)
    cfg.global_batch_info.update(agg_info)
    return cfg


@pytest.mark.parametrize("loss", ["gspo", "cispo"])
@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                                 "seq-mean-token-mean"])
@pytest.mark.parametrize("info", range(len(INFOS)))
@pytest.mark.parametrize("is_weights", [False, True])
def test_rf_gspo_and_cispo_match_verl(registered, loss, agg, info, is_weights):
    """rf_gspo / rf_cispo through verl's registry against verl's own gspo / cispo: loss, metrics and the gradients
    of log_prob, old_log_prob and advantages, with global_batch_info and rollout_is_weights."""
    g = torch.Generator().manual_seed(5)
    B, T = 6, 10
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    old[3, :] = lp[3, :] - 12.0  # a sequence log-ratio above gspo's clamp at 10
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    mask[0] = 0
    mask[2, 1:] = 0  # a one-token sequence
    w = None
    if is_weights:  # verl's rollout correction weights (IcePop at the token level), computed by rf
        w, _ = rf_verl.F.rollout_correction(old, old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64),
                                            mask, mode="mask", low=0.8, high=1.25)
    cfg = _verl_actor_cfg(INFOS[info])
    (l1, m1, g1), (l2, m2, g2) = _rf_and_verl(core, loss, old, lp, adv, mask, agg, cfg, w)
    assert rf_verl.calls[f"rf_{loss}"] > 0
    assert l1.dtype == torch.float64 and float(l2.detach()) != 0
    tol = 1e-7 if agg == "seq-mean-token-mean" else 1e-10  # verl divides by (row count + 1e-8), rf by the count
    assert_rel(l1, l2, tol, f"{loss} {agg} loss")
    assert set(m1) == set(m2) and all(isinstance(v, float) for v in m1.values())
    for k in m1:
        assert abs(m1[k] - m2[k]) < 1e-8, (k, m1[k], m2[k])
    assert m1["actor/pg_clipfrac"] > 0  # the clip bites
    for a, b, n in zip(g1, g2, ("old", "logp", "adv")):
        if b is None:  # verl's gspo / cispo pass no gradient to old_log_prob
            assert a is None or not a.any(), n
            continue
        assert_rel(a, b, tol, f"{loss} {agg} d {n}")


def test_policy_loss_dp_without_global_counts_raises(registered):
    x = torch.zeros(2, 3)
    cfg = _actor_cfg({"dp_size": 2})
    with pytest.raises(ValueError, match="batch_num_tokens"):
        core.get_policy_loss_fn("rf_vanilla")(x, x, x, torch.ones(2, 3), config=cfg)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_value_loss_patched_in_both_modules(registered, agg):
    losses = sys.modules.get("verl.workers.utils.losses")
    assert core.compute_value_loss is rf_verl.compute_value_loss
    if losses is not None:
        assert losses.compute_value_loss is rf_verl.compute_value_loss and losses.kl_penalty is rf_verl.kl_penalty
    g = torch.Generator().manual_seed(5)
    vp, ret, val = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(5, 7, generator=g) > 0.3).double()
    kw = dict(loss_agg_mode=agg, dp_size=2, batch_num_tokens=30, global_batch_size=8, loss_scale_factor=None)
    out = []
    for fn in (core.compute_value_loss, ORIG_VALUE_LOSS):
        leaves = [t.clone().requires_grad_() for t in (vp, ret, val)]
        loss, clipfrac = fn(*leaves, mask, 0.2, **kw)
        loss.backward()
        out.append((loss, clipfrac, [t.grad for t in leaves]))
    tol = 1e-7 if agg == "seq-mean-token-mean" else 1e-10  # verl's + 1e-8 in the row count
    assert_rel(out[0][0], out[1][0], tol, "value loss")
    assert abs(float(out[0][1]) - float(out[1][1])) < 1e-8  # verl's masked_mean adds 1e-8 to the count
    for a, b in zip(out[0][2], out[1][2]):
        assert_rel(a, b, tol, "value grad")


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+",
                                  "k2+", "abs+"])
def test_kl_penalty_matches_verl(registered, name):
    g = torch.Generator().manual_seed(6)
    lp = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3
    rl = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3
    lp[0, 0], rl[0, 0] = -15.0, 1.0  # k3 beyond verl's ±10 bound
    res = []
    for fn in (core.kl_penalty, ORIG_KL):
        a, b = lp.clone().requires_grad_(), rl.clone().requires_grad_()
        out = fn(a, b, name)
        out.sum().backward()
        res.append((out, a.grad, b.grad))
    for x, y, what in zip(res[0], res[1], ("value", "d logprob", "d ref")):
        assert_rel(x, y, 1e-12, f"{name} {what}")
    with pytest.raises(NotImplementedError):
        core.kl_penalty(lp, rl, "full")
