"""Glue for the compiled ops (csrc/): load the extension, register fake implementations and
autograd with ``torch.library`` (so the ops work under ``torch.compile`` and pass
``torch.library.opcheck``), and register the "cpu" and "cuda" backends.

The extension comes from one of two places (rlhf_fast/_build.py says how each is built):
  ``aot``  ``rlhf_fast/_C*.so``, built at install when torch imported at build time
           (``pip install --no-build-isolation``, ``make setup``);
  ``jit``  built on first use with ninja into the per-user cache (plain ``pip install``).
RLHF_FAST_BUILD=auto|aot|jit|none picks (auto: aot if it was built against this torch, else jit). A
library stamped with another torch version is never loaded. The schemas live in csrc/ops.cpp. If no
extension loads, the package still imports and the backends are marked unavailable with the reason.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys

import torch

from . import _backend, _build
from ._layout import grad_like, logits_rows

ORIGIN: str | None = None  # "aot" or "jit": where the loaded extension came from
LIBRARY: str | None = None  # its path
_REBUILD_AOT = "`pip install --no-build-isolation .` (or `make setup`)"


def _say(line: str) -> None:
    print(f"rlhf_fast: {line}", file=sys.stderr, flush=True)


def _aot_library() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(os.path.join(here, "_C" + suffix)):
            return os.path.join(here, "_C" + suffix)
    return None


def _stamp_mismatch(lib: str) -> str | None:
    """Why the library at ``lib`` must not be loaded into this torch, or None."""
    st = _build.read_stamp(lib)
    if st is None:
        return "it carries no build stamp (built by an older rlhf_fast): its torch version is unknown"
    if st.get("torch") != torch.__version__:
        return f"it was built against torch {st.get('torch')}, this is torch {torch.__version__}"
    return None


def _load_aot(lib: str, mode: str) -> str | None:
    """Import the AOT build; None when loaded, else why not."""
    global ORIGIN, LIBRARY
    why = _stamp_mismatch(lib)
    if why is None:
        try:
            from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
        except ImportError as e:
            return f"{lib} did not load ({type(e).__name__}: {e})"
        ORIGIN, LIBRARY = "aot", lib
        return None
    return f"{lib} is not loaded: {why}"


def _load_jit() -> str | None:
    """Load the first-use build from the cache, building it if needed; None when loaded, else why not."""
    global ORIGIN, LIBRARY
    csrc = _build.csrc_dir()
    if csrc is None:
        return "no C++ sources to build from (rlhf_fast/_csrc is missing from this installation)"
    try:
        cuda = _build.with_cuda(torch)
    except RuntimeError as e:
        return str(e)
    archs = _build.arch_key() if cuda else ""
    src = _build.source_hash(csrc)
    d = os.path.join(_build.cache_root(), _build.cache_key(torch.__version__, cuda, archs, src))
    lib, ok, failed = os.path.join(d, _build.JIT_NAME + ".so"), os.path.join(d, "ok"), os.path.join(d, "failed")
    meanwhile = "the ops run on the reference/Triton backends meanwhile"
    if not os.path.exists(ok):
        missing = _build.missing_tool()
        if missing:
            _say(f"cannot build the C++ extension on first use: {missing}; {meanwhile}")
            return f"not built: {missing}"
        with _build.file_lock(os.path.join(d + ".lock")):  # one builder; the others wait, then load its result
            if not os.path.exists(ok):
                if os.path.exists(failed):
                    _say(f"the first-use build in {d} failed before (see {d}/build.log); {meanwhile}; "
                         f"delete {d} to retry")
                    return f"the first-use build failed (see {d}/build.log)"
                if os.path.exists(os.path.join(d, "lock")):
                    os.remove(os.path.join(d, "lock"))  # torch's build baton, left by a killed build
                what = "C++ CPU and CUDA" if cuda else "C++ CPU"
                _say(f"compiling the {what} extension for torch {torch.__version__} into {d} "
                     f"(first use; once, a few minutes)")
                try:
                    _build.jit_build(torch, d, csrc, cuda, _build.stamp(torch.__version__, cuda, src))
                except Exception as e:  # a compile error: keep the log, say where, run on the other backends
                    os.makedirs(d, exist_ok=True)
                    with open(os.path.join(d, "build.log"), "w") as f:
                        f.write(f"{type(e).__name__}: {e}\n")
                    open(failed, "w").close()
                    _say(f"building the C++ extension failed (see {d}/build.log); {meanwhile}")
                    return f"the first-use build failed (see {d}/build.log)"
                open(ok, "w").close()
                ORIGIN, LIBRARY = "jit", lib
                return None
    why = _stamp_mismatch(lib)
    if why is not None:
        return f"{lib} is not loaded: {why}"
    torch.ops.load_library(lib)
    ORIGIN, LIBRARY = "jit", lib
    return None


def _load() -> str | None:
    """Load the extension as RLHF_FAST_BUILD says; None when loaded, else why it is not."""
    mode = _build.build_mode()
    if mode == "none":
        return "RLHF_FAST_BUILD=none: the compiled extension is off"
    aot = _aot_library() if mode in ("auto", "aot") else None
    if aot is not None:
        why = _load_aot(aot, mode)
        if why is None or mode == "aot" or "did not load" in why:
            return why and f"{why}; rebuild with {_REBUILD_AOT}"
        _say(f"{why}; building it on first use instead")
    elif mode == "aot":
        return f"RLHF_FAST_BUILD=aot but no extension was built at install; rebuild with {_REBUILD_AOT}"
    return _load_jit()


LOAD_ERROR = _load()
LOADED = LOAD_ERROR is None


def origin() -> str | None:
    """Where the loaded extension came from, for rf.available_backends()."""
    if ORIGIN == "aot":
        return f"built at install: {LIBRARY}"
    if ORIGIN == "jit":
        return f"built on first use, cached in {os.path.dirname(LIBRARY)}"
    return None


def has_kernel(op: str, key: str) -> bool:
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"rlhf_fast::{op}", key)


if not LOADED:
    _msg = f"the compiled extension did not load: {LOAD_ERROR}"
    _backend.mark_unavailable("cpu", _msg)
    _backend.mark_unavailable("cuda", _msg)
elif not has_kernel("gae_fwd", "CUDA"):
    _backend.mark_unavailable("cuda", f"the compiled extension ({LIBRARY}) was built without CUDA sources "
                                      "(torch without CUDA, no CUDA toolkit found, or RLHF_FAST_CUDA=0)")

if LOADED:
    ops = torch.ops.rlhf_fast

    # ------------------------------------------------------------------ logprobs
    # logits [N, V] or [B, T, V] with any leading strides (csrc/logits_layout.h); gradients in their layout
    def _n_rows(logits):
        torch._check(logits.dim() in (2, 3), lambda: "logits must be [N, V] or [B, T, V]")
        return logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[1]

    @torch.library.register_fake("rlhf_fast::logprobs_fwd")
    def _(logits, labels, inv_temperature, ignore_index):
        dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n = _n_rows(logits)
        return logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt)

    @torch.library.register_fake("rlhf_fast::logprobs_bwd")
    def _(grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index):
        _n_rows(logits)
        return grad_like(logits)

    @torch.library.register_fake("rlhf_fast::logprobs_bwd_")
    def _(logits, grad_logp, grad_entropy, labels, lse, entropy, inv_temperature, ignore_index):
        _n_rows(logits)
        return None

    def _logprobs_setup(ctx, inputs, output):
        logits, labels, inv_t, ignore_index = inputs
        _, entropy, lse = output
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.inv_t, ctx.ignore_index = inv_t, ignore_index

    def _logprobs_backward(ctx, g_logp, g_entropy, _g_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_logits = ops.logprobs_bwd(g_logp.contiguous(), g_entropy, logits, labels, lse, entropy,
                                    ctx.inv_t, ctx.ignore_index)
        return g_logits, None, None, None

    torch.library.register_autograd("rlhf_fast::logprobs_fwd", _logprobs_backward,
                                    setup_context=_logprobs_setup)

    def logprobs(logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False):
        """logits [N, V] or [B, T, V] (any leading strides), labels of the leading shape."""
        logp, entropy, _ = ops.logprobs_fwd(logits, labels.reshape(-1), 1.0 / temperature, ignore_index)
        logp, entropy = logp.view(labels.shape), entropy.view(labels.shape)
        return (logp, entropy) if return_entropy else logp

    # ------------------------------------------------------------------ gae
    @torch.library.register_fake("rlhf_fast::gae_fwd")
    def _(rewards, values, mask, gamma, lam):
        torch._check(rewards.shape == values.shape and rewards.shape == mask.shape)
        return torch.empty_like(rewards), torch.empty_like(rewards)

    @torch.library.register_fake("rlhf_fast::gae_bwd")
    def _(grad_advantages, grad_returns, mask, gamma, lam):
        return torch.empty_like(grad_advantages), torch.empty_like(grad_advantages)

    def _gae_setup(ctx, inputs, output):
        _, _, mask, gamma, lam = inputs
        ctx.save_for_backward(mask)
        ctx.gamma, ctx.lam = gamma, lam

    def _gae_backward(ctx, g_adv, g_ret):
        (mask,) = ctx.saved_tensors
        g_adv = torch.zeros_like(mask, dtype=(g_ret if g_adv is None else g_adv).dtype) if g_adv is None else g_adv
        g_ret = torch.zeros_like(g_adv) if g_ret is None else g_ret
        d_rew, d_val = ops.gae_bwd(g_adv.contiguous(), g_ret.contiguous(), mask, ctx.gamma, ctx.lam)
        return d_rew, d_val, None, None, None

    torch.library.register_autograd("rlhf_fast::gae_fwd", _gae_backward, setup_context=_gae_setup)

    def gae(rewards, values, mask, gamma=1.0, lam=0.95):
        math = _math_dtype(rewards, values)  # outputs in the math dtype, as every op
        return ops.gae_fwd(rewards.to(math), values.to(math), mask.bool(), float(gamma), float(lam))

    # ------------------------------------------------------------------ elementwise losses
    # Each forward returns d out / d input beside the output; the backward scales it by the upstream
    # gradient. Those gradient outputs (and the statistics) are not differentiable.
    def _math_dtype(*ts):
        return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32

    def _weights(mask, dtype):
        """bool masks stay bool; any other mask is a weight, as in reference.masked_mean."""
        return mask if mask.dtype == torch.bool else mask.to(dtype)

    @torch.library.register_fake("rlhf_fast::kl_fwd")
    def _(logp, ref_logp, estimator, clamp):
        torch._check(logp.shape == ref_logp.shape, lambda: "kl: logp and ref_logp must share one shape")
        return torch.empty_like(logp), torch.empty_like(logp)

    def _kl_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    def _kl_backward(ctx, g_out, _g_grad):
        (grad,) = ctx.saved_tensors
        g = g_out * grad
        return g, -g, None, None

    torch.library.register_autograd("rlhf_fast::kl_fwd", _kl_backward, setup_context=_kl_setup)

    def kl(logp, ref_logp, estimator="k3", clamp=None):
        dt = _math_dtype(logp, ref_logp)
        out, _ = ops.kl_fwd(logp.to(dt), ref_logp.to(dt), estimator, None if clamp is None else float(clamp))
        return out

    def _loss_fake(x, mask, n_stats):
        torch._check(x.shape == mask.shape, lambda: "mask must have the inputs' shape")
        return x.new_empty(()), x.new_empty(n_stats), torch.empty_like(x), torch.empty_like(x)

    @torch.library.register_fake("rlhf_fast::ppo_policy_loss_fwd")
    def _(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, loss_type=0, seq_log_ratio=None):
        return _loss_fake(logp, mask, 3)

    @torch.library.register_fake("rlhf_fast::ppo_value_loss_fwd")
    def _(values, old_values, returns, mask, clip, agg):
        return _loss_fake(values, mask, 1)

    def _loss_setup(ctx, inputs, output):
        _, stats, g1, g2 = output
        ctx.mark_non_differentiable(stats, g1, g2)
        ctx.save_for_backward(g1, g2)
        ctx.n_inputs = len(inputs)
        # ppo_policy_loss_fwd: gspo and cispo (loss_type 1, 2) detach the ratio, no gradient to old_logp
        ctx.old_grad = len(inputs) < 9 or inputs[8] == 0

    def _policy_backward(ctx, g_loss, *_):
        d_logp, d_adv = ctx.saved_tensors
        g_logp = g_loss * d_logp
        g_old = -g_logp if ctx.old_grad else torch.zeros_like(g_logp)
        return g_logp, g_old, g_loss * d_adv, *([None] * (ctx.n_inputs - 3))

    def _value_backward(ctx, g_loss, *_):
        d_v, d_old = ctx.saved_tensors
        g_v, g_old = g_loss * d_v, g_loss * d_old
        return g_v, g_old, -(g_v + g_old), None, None, None

    torch.library.register_autograd("rlhf_fast::ppo_policy_loss_fwd", _policy_backward, setup_context=_loss_setup)
    torch.library.register_autograd("rlhf_fast::ppo_value_loss_fwd", _value_backward, setup_context=_loss_setup)

    _LOSS_CODES = {"ppo": 0, "gspo": 1, "cispo": 2}

    def ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=None, dual_clip=None,
                        agg="token-mean", loss_type="ppo", seq_log_ratio=None):
        clip_high = clip_low if clip_high is None else clip_high
        dt = _math_dtype(logp, old_logp, advantages)
        loss, stats, _, _ = ops.ppo_policy_loss_fwd(
            logp.to(dt), old_logp.to(dt), advantages.to(dt), _weights(mask, dt), float(clip_low), float(clip_high),
            None if dual_clip is None else float(dual_clip), agg, _LOSS_CODES[loss_type],
            None if seq_log_ratio is None else seq_log_ratio.to(dt).detach())
        return loss, {"clipfrac": stats[0], "approx_kl": stats[1], "dual_clipfrac": stats[2]}

    def ppo_value_loss(values, old_values, returns, mask, clip=0.2, agg="token-mean"):
        dt = _math_dtype(values, old_values, returns)
        loss, stats, _, _ = ops.ppo_value_loss_fwd(
            values.to(dt), old_values.to(dt), returns.to(dt), _weights(mask, dt), None if clip is None else float(clip),
            agg)
        return loss, {"vf_clipfrac": stats[0]}

    for _name, _fn in (("logprobs", logprobs), ("gae", gae), ("kl", kl), ("ppo_policy_loss", ppo_policy_loss),
                       ("ppo_value_loss", ppo_value_loss)):
        _backend.register(_name, "cpu")(_fn)
        _backend.register(_name, "cuda")(_fn)

    # ------------------------------------------------------------------ group advantages, shaped rewards
    # (advantages_cpu.cpp / advantages_cuda.cu). Math in fp32 (fp64 if an input is fp64), as the reference.
    @torch.library.register_fake("rlhf_fast::grpo_advantages_fwd")
    def _(scores, group_size, normalize_std, eps):
        torch._check(scores.dim() == 1, lambda: "grpo_advantages: scores must be 1-D")
        return torch.empty_like(scores)

    @torch.library.register_fake("rlhf_fast::grpo_advantages_bwd")
    def _(grad, scores, group_size, normalize_std, eps):
        return torch.empty_like(scores)

    @torch.library.register_fake("rlhf_fast::rloo_advantages_fwd")
    def _(scores, group_size):
        torch._check(scores.dim() == 1, lambda: "rloo_advantages: scores must be 1-D")
        return torch.empty_like(scores)

    def _grpo_setup(ctx, inputs, output):
        scores, ctx.group_size, ctx.normalize_std, ctx.eps = inputs
        ctx.save_for_backward(scores)

    def _grpo_backward(ctx, g):
        (scores,) = ctx.saved_tensors
        return ops.grpo_advantages_bwd(g.contiguous(), scores, ctx.group_size, ctx.normalize_std, ctx.eps), \
            None, None, None

    def _rloo_setup(ctx, inputs, output):
        ctx.group_size = inputs[1]

    def _rloo_backward(ctx, g):  # a symmetric linear map: its own adjoint
        return ops.rloo_advantages_fwd(g.contiguous(), ctx.group_size), None

    torch.library.register_autograd("rlhf_fast::grpo_advantages_fwd", _grpo_backward, setup_context=_grpo_setup)
    torch.library.register_autograd("rlhf_fast::rloo_advantages_fwd", _rloo_backward, setup_context=_rloo_setup)

    def grpo_advantages(scores, group_size, normalize_std=True, eps=1e-6):
        return ops.grpo_advantages_fwd(scores.to(_math_dtype(scores)), int(group_size), bool(normalize_std),
                                       float(eps))

    def rloo_advantages(scores, group_size):
        return ops.rloo_advantages_fwd(scores.to(_math_dtype(scores)), int(group_size))

    def reinforce_pp_returns(rewards, mask, gamma=1.0):
        # reference: gae with values = 0, lam = 1 (its advantages are the discounted returns)
        r = rewards.to(_math_dtype(rewards))
        adv, _ = ops.gae_fwd(r, torch.zeros_like(r), mask.bool(), float(gamma), 1.0)
        return adv

    @torch.library.register_fake("rlhf_fast::kl_penalized_rewards_fwd")
    def _(score, logp, ref_logp, mask, beta, estimator):
        torch._check(logp.dim() == 2 and logp.shape == ref_logp.shape and logp.shape == mask.shape,
                     lambda: "kl_penalized_rewards: logp, ref_logp, mask must be [B, T] of one shape")
        return torch.empty_like(logp), torch.empty_like(logp), logp.new_empty(logp.shape[0], dtype=torch.int64)

    @torch.library.register_fake("rlhf_fast::kl_penalized_rewards_bwd")
    def _(grad_rewards, d_logp, last):
        return d_logp.new_empty(d_logp.shape[0]), torch.empty_like(d_logp), torch.empty_like(d_logp)

    def _kl_rewards_setup(ctx, inputs, output):
        _, d_logp, last = output
        ctx.mark_non_differentiable(d_logp, last)
        ctx.save_for_backward(d_logp, last)

    def _kl_rewards_backward(ctx, g, _g_d, _g_last):
        d_logp, last = ctx.saved_tensors
        g_score, g_lp, g_ref = ops.kl_penalized_rewards_bwd(g.contiguous(), d_logp, last)
        return g_score, g_lp, g_ref, None, None, None

    torch.library.register_autograd("rlhf_fast::kl_penalized_rewards_fwd", _kl_rewards_backward,
                                    setup_context=_kl_rewards_setup)

    def kl_penalized_rewards(score, logp, ref_logp, mask, beta, estimator="k1"):
        dt = _math_dtype(score, logp, ref_logp)
        out, _, _ = ops.kl_penalized_rewards_fwd(score.to(dt), logp.to(dt), ref_logp.to(dt), mask.bool(), float(beta),
                                                 estimator)
        return out

    for _name, _fn in (("grpo_advantages", grpo_advantages), ("rloo_advantages", rloo_advantages),
                       ("reinforce_pp_returns", reinforce_pp_returns),
                       ("kl_penalized_rewards", kl_penalized_rewards)):
        _backend.register(_name, "cpu")(_fn)
        _backend.register(_name, "cuda")(_fn)

    # ------------------------------------------------------------------ ppo_loss_from_logits
    # Forward: one read of the logits (per-row softmax statistics), then the per-token PPO / KL / entropy
    # terms and their aggregation, saving per token the backward's coefficients ([N, 8], see
    # csrc/ppo_from_logits_math.h). Backward: one read of the logits and one write of grad_logits.
    @torch.library.register_fake("rlhf_fast::ppo_from_logits_fwd")
    def _(logits, labels, old_logp, advantages, mask, ref_logp, kl_coef, kl_estimator, entropy_coef, inv_temperature,
          clip_low, clip_high, dual_clip, agg):
        return old_logp.new_empty(()), old_logp.new_empty(6), old_logp.new_empty(_n_rows(logits), 8)

    @torch.library.register_fake("rlhf_fast::ppo_from_logits_bwd")
    def _(grad_loss, logits, labels, saved, inv_temperature):
        _n_rows(logits)
        return grad_like(logits)

    def _from_logits_setup(ctx, inputs, output):
        logits, labels, old_logp, advantages, _, ref_logp = inputs[:6]
        _, stats, saved = output
        ctx.mark_non_differentiable(stats, saved)
        ctx.save_for_backward(logits, labels, saved)
        ctx.inv_t = inputs[9]
        ctx.shapes = [None if t is None else t.shape for t in (old_logp, advantages, ref_logp)]

    def _from_logits_backward(ctx, g_loss, *_):
        logits, labels, saved = ctx.saved_tensors
        g = g_loss.to(saved.dtype)
        need = ctx.needs_input_grad
        d_logits = ops.ppo_from_logits_bwd(g, logits, labels, saved, ctx.inv_t) if need[0] else None
        d_old, d_adv, d_ref = ((g * saved[:, c]).view(s) if s is not None and need[i] else None
                               for c, s, i in zip((5, 6, 7), ctx.shapes, (2, 3, 5)))
        return d_logits, None, d_old, d_adv, None, d_ref, *([None] * 8)

    torch.library.register_autograd("rlhf_fast::ppo_from_logits_fwd", _from_logits_backward,
                                    setup_context=_from_logits_setup)

    def ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, ref_logp=None, kl_coef=0.0,
                             kl_estimator="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=None,
                             dual_clip=None, agg="token-mean"):
        clip_high = clip_low if clip_high is None else clip_high
        dt = _math_dtype(logits, old_logp, advantages, *(() if ref_logp is None else (ref_logp,)))
        x = logits_rows(logits)  # [B, T, V] view: a time slice logits[:, :-1] is not copied
        loss, st, _ = ops.ppo_from_logits_fwd(
            x, labels.reshape(-1).long(), old_logp.to(dt), advantages.to(dt), _weights(mask, dt),
            None if ref_logp is None else ref_logp.to(dt), float(kl_coef), kl_estimator, float(entropy_coef),
            1.0 / temperature, float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip), agg)
        stats = {"clipfrac": st[1], "approx_kl": st[2], "dual_clipfrac": st[3], "pg_loss": st[0], "entropy": st[4]}
        if ref_logp is not None:
            stats["kl"] = st[5]
        return loss, stats

    _backend.register("ppo_loss_from_logits", "cpu")(ppo_loss_from_logits)
    _backend.register("ppo_loss_from_logits", "cuda")(ppo_loss_from_logits)
