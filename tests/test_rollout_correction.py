"""rf.rollout_correction: worked examples, verl's compute_rollout_correction_weights as an oracle for each of its
modes, TRL's vLLM importance-sampling formulas (a float64 transcription: TRL has no callable for them), packed
input, long sequences, NaN and empty rows, argument errors. OpenRLHF's gates are checked against its own
PolicyLoss in tests/test_integrations_openrlhf.py (whose fixture imports OpenRLHF's loss module)."""
import importlib.util
import math
import pathlib

import pytest
import torch

import rlhf_fast as rf

from utils import assert_rel

LN = math.log


def _stats(st):
    return {k: float(v) for k, v in st.items()}


def _batch(B=6, T=9, seed=0, dtype=torch.float64, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    roll = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T)
    if B > 3:
        mask[1, 5:] = 0  # right padding
        mask[2, 1:] = 0  # length-1 sequence
        mask[3, :3] = 0  # left padding
    if B > 5:
        mask[5, 2:7] = 0  # a hole
    return old.to(dtype), roll.to(dtype), mask


# ----------------------------------------------------------------------------- worked examples
def _example():
    """Row 0: token ratios 2, 1/2, 4 (product 4, geometric mean 4^(1/3)); row 1: ratio 3, then padding."""
    roll = torch.full((2, 3), -1.5, dtype=torch.float64)
    old = roll + torch.tensor([[LN(2), LN(0.5), LN(4)], [LN(3), 7.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return old, roll, mask


@pytest.mark.parametrize("level,mode,keep,low,high,expect", [
    ("token", "truncate", "unit", None, 2.0, [[2, .5, 2], [2, 0, 0]]),
    ("token", "truncate", "unit", 1.0, 2.0, [[2, 1, 2], [2, 0, 0]]),
    ("sequence", "truncate", "unit", None, 2.0, [[2, 2, 2], [2, 0, 0]]),
    ("sequence", "truncate", "unit", None, 5.0, [[4, 4, 4], [3, 0, 0]]),
    ("geometric", "truncate", "unit", None, 5.0, [[4 ** (1 / 3)] * 3, [3, 0, 0]]),
    ("token", "mask", "unit", 0.45, 2.05, [[2, .5, 0], [0, 0, 0]]),
    ("token", "mask", "token", 0.6, None, [[2, 0, 4], [3, 0, 0]]),
    ("sequence", "mask", "unit", None, 3.5, [[0, 0, 0], [3, 0, 0]]),
    ("geometric", "mask", "unit", 0.5, 2.0, [[4 ** (1 / 3)] * 3, [0, 0, 0]]),
    ("geometric", "mask", "token", 0.5, 2.0, [[2, .5, 4], [0, 0, 0]]),
])
def test_worked_examples(level, mode, keep, low, high, expect):
    old, roll, mask = _example()
    w, st = rf.rollout_correction(old, roll, mask, level=level, mode=mode, keep=keep, low=low, high=high)
    expect = torch.tensor(expect, dtype=torch.float64)
    assert w.dtype == torch.float64
    assert_rel(w, expect, 1e-14, f"{level} {mode} {keep}")
    valid = expect[mask.bool()]
    assert float(st["mean"]) == pytest.approx(float(valid.mean()), rel=1e-14)
    assert float(st["max"]) == pytest.approx(float(valid.max()), rel=1e-14)
    assert float(st["min"]) == pytest.approx(float(valid.min()), rel=1e-14)
    assert float(st["ess"]) == pytest.approx(float(valid.sum() ** 2 / (4 * (valid ** 2).sum())), rel=1e-14)
    assert float(st["batch_norm_factor"]) == 1.0


def test_worked_example_stats():
    old, roll, mask = _example()
    _, st = rf.rollout_correction(old, roll, mask, level="geometric", mode="mask", keep="token", low=0.5, high=2.0)
    st = _stats(st)
    # row 1 (one token) is masked: a quarter of the valid tokens, half of the sequences
    assert st["masked_frac"] == 0.25 and st["masked_seq_frac"] == 0.5
    assert st["mean"] == pytest.approx(6.5 / 4) and st["max"] == 4.0 and st["min"] == 0.0
    assert st["ess"] == pytest.approx(6.5 ** 2 / (4 * (4 + 0.25 + 16)))
    _, st = rf.rollout_correction(old, roll, mask, level="token", high=2.0)
    st = _stats(st)
    assert st["truncated_frac"] == 0.5 and st["truncated_seq_frac"] == 1.0  # tokens with ratio 4 and 3
    assert "masked_frac" not in st


def test_divergence_gates_worked():
    """p = 1/2 (rollout), q = 1/4 (trainer): binary KL = ½ln2 + ½ln(2/3), tv = 1/4; per sequence summed
    (level sequence) or averaged (geometric)."""
    roll = torch.tensor([[LN(0.5), LN(0.5)], [LN(0.5), LN(0.5)]], dtype=torch.float64)
    old = torch.tensor([[LN(0.25), LN(0.5)], [LN(0.5), LN(0.5)]], dtype=torch.float64)
    mask = torch.ones(2, 2)
    bkl = 0.5 * LN(2) + 0.5 * LN(2 / 3)
    for gate, d in (("binary_kl", bkl), ("tv", 0.25)):
        eps = 1e-9
        w, st = rf.rollout_correction(old, roll, mask, level="token", mode="mask", gate=gate, high=d - eps)
        assert_rel(w, torch.tensor([[0, 1.0], [1, 1]], dtype=torch.float64), 1e-14, gate)
        w, _ = rf.rollout_correction(old, roll, mask, level="token", mode="mask", gate=gate, high=d + eps)
        assert_rel(w, torch.tensor([[0.5, 1.0], [1, 1]], dtype=torch.float64), 1e-14, gate)
        # geometric: mean d/2 per row 0; sequence: sum d
        w, _ = rf.rollout_correction(old, roll, mask, level="geometric", mode="mask", gate=gate, high=d / 2 + eps)
        assert_rel(w, torch.tensor([[0.5 ** 0.5] * 2, [1, 1]], dtype=torch.float64), 1e-14, gate)
        w, _ = rf.rollout_correction(old, roll, mask, level="sequence", mode="mask", gate=gate, high=d / 2 + eps)
        assert_rel(w, torch.tensor([[0, 0], [1, 1]], dtype=torch.float64), 1e-14, gate)
        w, _ = rf.rollout_correction(old, roll, mask, level="sequence", mode="mask", gate=gate, keep="token",
                                     high=d + eps)
        assert_rel(w, torch.tensor([[0.5, 1], [1, 1]], dtype=torch.float64), 1e-14, gate)


def test_batch_normalize_worked():
    old, roll, mask = _example()
    w, st = rf.rollout_correction(old, roll, mask, level="token", high=2.0, batch_normalize=True)
    assert_rel(w, torch.tensor([[2, .5, 2], [2, 0, 0]], dtype=torch.float64) / (6.5 / 4), 1e-14, "token")
    assert float(st["batch_norm_factor"]) == pytest.approx(6.5 / 4) and float(st["mean"]) == pytest.approx(1.0)
    # sequences: the mean of each sequence's mean weight, (2 + 3) / 2
    w, st = rf.rollout_correction(old, roll, mask, level="sequence", high=5.0, batch_normalize=True)
    assert_rel(w, torch.tensor([[4, 4, 4], [3, 0, 0]], dtype=torch.float64) / 3.5, 1e-14, "sequence")
    # a zero mean leaves the weights alone
    w, st = rf.rollout_correction(old, roll, mask, level="sequence", mode="mask", high=1.0, batch_normalize=True)
    assert not w.any() and float(st["batch_norm_factor"]) == 1.0


# ----------------------------------------------------------------------------- verl as the oracle
@pytest.mark.parametrize("rollout_is", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, 1.2, "0.5_2.0", "0.7_1.3"])
@pytest.mark.parametrize("batch_normalize", [False, True])
def test_matches_verl(rollout_is, threshold, batch_normalize):
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper",
                                 reason="verl is not installed (pip install verl==0.9.1 --no-deps + its core deps)")
    old, roll, mask = _batch()
    old[4, :] = roll[4, :] + 3.0  # a sequence log-ratio of 27: beyond verl's ±20 bound
    w_v, m = helper.compute_rollout_correction_weights(old - roll, mask, rollout_is, threshold, batch_normalize)
    if isinstance(threshold, str):
        lo, hi = (float(x) for x in threshold.split("_"))
        kw = dict(mode="mask", low=lo, high=hi)
    else:
        kw = dict(mode="truncate", high=threshold)
    w, st = rf.rollout_correction(old, roll, mask, level=rollout_is, batch_normalize=batch_normalize, **kw)
    st = _stats(st)
    assert_rel(w, w_v, 1e-14, "weights")
    assert st["mean"] * st["batch_norm_factor"] == pytest.approx(m["rollout_is_mean"], rel=1e-12)
    assert st["ess"] == pytest.approx(m["rollout_is_eff_sample_size"], rel=1e-6)  # verl adds 1e-8 to the mean
    assert st["batch_norm_factor"] == pytest.approx(m.get("rollout_is_batch_norm_factor", 1.0), rel=1e-12)
    frac = st["masked_frac" if isinstance(threshold, str) else "truncated_frac"]
    assert 0 < frac < 1  # the thresholds bite, and not everywhere
    if isinstance(threshold, str):
        assert frac == pytest.approx(m["rollout_is_oob_ratio"], rel=1e-6)  # verl's metric is float32
    elif rollout_is == "token":  # the token fraction above the threshold (no lower bound: nothing below counts)
        assert frac == pytest.approx(m["rollout_is_ratio_fraction_high"], rel=1e-6)
    else:  # verl counts sequences
        assert st["truncated_seq_frac"] == pytest.approx(m["rollout_is_ratio_fraction_high"], rel=1e-6)
    if rollout_is == "token" and not batch_normalize:
        assert st["max"] == pytest.approx(m["rollout_is_max"]) and st["min"] == pytest.approx(m["rollout_is_min"])


# ----------------------------------------------------------------------------- TRL's formulas
def trl_vllm_is_float64_transcription(old_logp, sampling_logp, mask, mode, clip_min, clip_max):
    """A float64 transcription of trl 1.16's GRPOTrainer._generate_and_score_completions vLLM importance
    sampling block (TRL has no function for it): the ratio [B, T] (token_*) or [B, 1] (sequence_*)."""
    diff = torch.nan_to_num((old_logp - sampling_logp) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def test_trl_transcription_matches_the_installed_source():
    """The lines transcribed above, as they stand in the installed TRL (fails if TRL changes them)."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("TRL is not installed")
    src = (pathlib.Path(spec.submodule_search_locations[0]) / "trainer" / "grpo_trainer.py").read_text()
    src = " ".join(src.split())
    for line in ("per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask",
                 "per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)",
                 'sequence_level_is = self.vllm_importance_sampling_mode in ["sequence_mask", "sequence_truncate"]',
                 "per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)",
                 "vllm_importance_sampling_ratio = torch.exp(logps_diff)",
                 "vllm_importance_sampling_ratio = torch.clamp( vllm_importance_sampling_ratio, "
                 "min=self.vllm_importance_sampling_clip_min, max=self.vllm_importance_sampling_clip_max, )",
                 "else -math.inf",
                 "else math.inf",
                 "invalid_mis_mask = (vllm_importance_sampling_ratio < min_val) | ( vllm_importance_sampling_ratio "
                 "> max_val )",
                 "vllm_importance_sampling_ratio.masked_fill( invalid_mis_mask, value=0.0 )",
                 "per_token_loss = per_token_loss * inputs[\"importance_sampling_ratio\"]"):
        assert line in src, f"TRL's importance sampling changed: {line!r} not found"


@pytest.mark.parametrize("trl_mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 3.0), (0.8, 1.25), (0.9, None)])
def test_matches_trl_formulas(trl_mode, clip_min, clip_max):
    old, roll, mask = _batch(B=8, T=7, seed=1, spread=0.4)
    level, mode = trl_mode.split("_")
    w, st = rf.rollout_correction(old, roll, mask, level=level, mode=mode, low=clip_min, high=clip_max)
    expect = trl_vllm_is_float64_transcription(old, roll, mask.double(), trl_mode, clip_min, clip_max)
    expect = expect.expand_as(old) * mask  # TRL's loss multiplies by the mask; rf's weights are 0 there
    assert_rel(w, expect, 1e-14, trl_mode)
    frac = st["truncated_frac" if mode == "truncate" else "masked_frac"]
    assert 0 < float(frac) < 1  # every band bites, and not everywhere


# ----------------------------------------------------------------------------- layouts, dtypes, edges
CONFIGS = [dict(level=lv, mode="truncate", low=lo, high=2.0) for lv in ("token", "sequence", "geometric")
           for lo in (None, 0.5)] + \
          [dict(level=lv, mode="mask", gate=g, keep=k, low=lo, high=hi) for lv in ("token", "sequence", "geometric")
           for k in ("unit", "token")
           for g, lo, hi in (("ratio", 0.7, 1.4), ("binary_kl", None, 0.002), ("tv", 0.0, 0.02))]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("batch_normalize", [False, True])
def test_packed_equals_padded(cfg, batch_normalize):
    lens = [4, 0, 1, 7, 3]
    S, T = len(lens), max(lens)
    g = torch.Generator().manual_seed(2)
    old = torch.randn(S, T, generator=g, dtype=torch.float64) - 2
    roll = old + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    pad_mask = (torch.arange(T) < torch.tensor(lens)[:, None]).long()
    pad_mask[3, 2] = 0  # a hole inside a packed sequence
    pos = torch.tensor(lens)[:, None] > torch.arange(T)
    cu = torch.tensor([0] + lens).cumsum(0)
    w_pad, st_pad = rf.rollout_correction(old, roll, pad_mask, batch_normalize=batch_normalize, **cfg)
    w, st = rf.rollout_correction(old[pos], roll[pos], pad_mask[pos], cu_seqlens=cu, batch_normalize=batch_normalize,
                                  **cfg)
    assert_rel(w, w_pad[pos], 1e-14, "packed weights")
    for k in st_pad:
        assert float(st[k]) == pytest.approx(float(st_pad[k]), rel=1e-12, abs=1e-15), k


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(cfg, dtype):
    """fp32 / bf16 log-probs: fp32 math, compared with the float64 call on the same (rounded) values."""
    old, roll, mask = _batch(seed=3, spread=0.1)
    old, roll = old.to(dtype), roll.to(dtype)
    w, st = rf.rollout_correction(old, roll, mask, **cfg)
    w64, st64 = rf.rollout_correction(old.double(), roll.double(), mask, **cfg)
    assert w.dtype == torch.float32 and st["mean"].dtype == torch.float32
    # a unit within float32 rounding of a bound may fall the other way: compare where both agree on the gate
    same = (w == 0) == (w64 == 0)
    assert same.float().mean() > 0.9
    assert_rel(w[same], w64[same].float(), 2e-6 if cfg["level"] == "token" else 2e-5, "weights")


def test_long_sequences_do_not_overflow():
    T = 8192
    old = torch.full((2, T), -1.0)
    roll = old - 0.01  # every token ratio e^0.01: the product e^81.92 overflows if taken directly in fp32
    roll[1] = old[1] + 0.01
    mask = torch.ones(2, T)
    w, st = rf.rollout_correction(old, roll, mask, level="sequence", high=2.0)
    assert torch.isfinite(w).all() and torch.equal(w[0], torch.full((T,), 2.0))
    assert_rel(w[1], torch.full((T,), math.exp(-81.92)).clamp(min=math.exp(-20)), 1e-5, "bounded below at e^-20")
    # the gate reads the exact ratio: e^81.92 is above 1e30 although the weight's exponent is bounded at 20
    w, st = rf.rollout_correction(old, roll, mask, level="sequence", mode="mask", low=1e-30, high=1e30)
    assert not w.any() and float(st["masked_frac"]) == 1.0
    w, _ = rf.rollout_correction(old, roll, mask, level="geometric", mode="mask", low=0.5, high=2.0)
    assert_rel(w, torch.tensor([math.exp(0.01), math.exp(-0.01)])[:, None].expand(2, T), 1e-5, "geometric")


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_nan_empty_rows_and_detached(level):
    old, roll, mask = _batch(seed=4)
    mask[0] = 0                      # an empty row
    old[1, 7] = float("nan")         # NaN at a masked token: no effect
    roll[1, 8] = float("inf")
    old = old.requires_grad_()
    w, st = rf.rollout_correction(old, roll, mask, level=level, high=2.0)
    assert not w.requires_grad and all(not v.requires_grad for v in st.values())
    assert torch.isfinite(w).all() and not w[0].any() and not w[mask == 0].any()
    roll2 = roll.clone()
    roll2[4, 2] = float("nan")       # NaN at a valid token: its unit is NaN
    w2, st2 = rf.rollout_correction(old, roll2, mask, level=level, high=2.0)
    nan_at = w2.isnan()
    expect = torch.zeros_like(nan_at)
    if level == "token":
        expect[4, 2] = True
    else:
        expect[4] = mask[4] != 0
    assert torch.equal(nan_at, expect)
    assert torch.equal(w2[~expect], w[~expect])
    # nothing valid at all: zero weights and zero stats
    w, st = rf.rollout_correction(old, roll, torch.zeros_like(mask), level=level, mode="mask", low=0.5, high=2.0,
                                  batch_normalize=True)
    assert not w.any() and all(float(v) == (1.0 if k == "batch_norm_factor" else 0.0) for k, v in st.items())
    w, st = rf.rollout_correction(old[:0], roll[:0], mask[:0], level=level)
    assert w.shape == (0, old.shape[1]) and float(st["ess"]) == 0.0


def test_argument_errors():
    old, roll, mask = _batch(B=2, T=3)
    cases = [
        (dict(level="seq"), "level"), (dict(mode="clip"), "mode"), (dict(gate="kl"), "gate"),
        (dict(keep="sequence"), "keep"), (dict(mode="truncate", gate="tv"), "gate"),
        (dict(mode="truncate", keep="token"), "keep"), (dict(low=None, high=None), "bound"),
        (dict(low=2.0, high=1.0), "low must be <= high"), (dict(low=-1.0), "low"), (dict(high=-2.0), "high"),
        (dict(high="2"), "high"), (dict(low=True), "low"), (dict(batch_normalize=1), "batch_normalize"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            rf.rollout_correction(old, roll, mask, **kw)
    with pytest.raises(ValueError, match="rollout_logp must have the shape"):
        rf.rollout_correction(old, roll[:, :2], mask)
    with pytest.raises(ValueError, match="old_logp must have 2 dimensions"):
        rf.rollout_correction(old.reshape(-1), roll.reshape(-1), mask.reshape(-1))
    with pytest.raises(ValueError, match="cu_seqlens"):
        rf.rollout_correction(old.reshape(-1), roll.reshape(-1), mask.reshape(-1), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="old_logp must have 1 dimensions"):
        rf.rollout_correction(old, roll, mask, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="rollout_logp must be a floating"):
        rf.rollout_correction(old, roll.long(), mask)
