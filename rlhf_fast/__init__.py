"""rlhf_fast: fused loss-side ops for RLHF (log-probs, entropy, KL, GAE, PPO losses) and training stages.

    import rlhf_fast as rf
    logp, ent = rf.logprobs(logits, labels, return_entropy=True)

Backends (reference PyTorch, C++ CPU, CUDA, Triton) are picked per op by device; see
``rf.available_backends()`` and ``rf.use_backend``. Importing never fails because a backend is missing.
"""
from . import _backend, _compiled  # noqa: F401  (registers the compiled backends when built)
from . import ops  # noqa: F401  (registers the Triton backends when triton imports)
from ._backend import BACKENDS, backends_for, use_backend, why_unavailable
from ._checks import checks
from .functional import (
    AGG_MODES,
    aggregate,
    gae,
    grpo_advantages,
    kl,
    kl_penalized_rewards,
    linear_logprobs,
    linear_ppo_loss,
    logprobs,
    masked_mean,
    masked_whiten,
    pairwise_reward_loss,
    ppo_loss_from_logits,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_pp_returns,
    rloo_advantages,
    rollout_correction,
)

__version__ = "0.1.0"


def available_backends() -> dict[str, str]:
    """Each backend -> "ok", "ok: <the only tensors it runs on here>" (Triton on CPU tensors under
    TRITON_INTERPRET=1 when there is no GPU), or the reason it cannot be used in this process (e.g.
    cuda without a CUDA device). A value starting with "ok" means usable. The compiled backends say
    where their extension came from: "ok (built at install: <path>)" or "ok (built on first use, cached
    in <folder>)" (RLHF_FAST_BUILD, see rlhf_fast/_build.py)."""
    av = {b: _backend.availability(b) for b in BACKENDS}
    for b in ("cpu", "cuda"):
        if av[b] == "ok" and _compiled.origin():
            av[b] = f"ok ({_compiled.origin()})"
    return av


__all__ = [
    "AGG_MODES", "BACKENDS", "aggregate", "available_backends", "backends_for", "checks", "use_backend", "gae",
    "grpo_advantages", "kl", "kl_penalized_rewards", "linear_logprobs", "linear_ppo_loss", "logprobs", "masked_mean",
    "masked_whiten",
    "pairwise_reward_loss", "ppo_loss_from_logits", "ppo_policy_loss", "ppo_value_loss",
    "reinforce_pp_returns", "rloo_advantages", "rollout_correction",
]
