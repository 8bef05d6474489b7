"""rlhf_fast.integrations.trl against the installed TRL: each replaced function against TRL's own (forward and
backward, float64 reference where TRL runs in half precision), patch/unpatch identity, and a real GRPOTrainer
on a tiny random Llama, patched vs unpatched."""
import sys

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils", reason="TRL is not installed (pip install trl==1.16.0)")

from rlhf_fast.integrations import trl as rf_trl  # noqa: E402
from rlhf_fast import reference as ref  # noqa: E402

from utils import assert_rel  # noqa: E402

ORIG = {n: getattr(trl_utils, n) for n in rf_trl._NAMES}


@pytest.fixture
def patched():
    with rf_trl.patched():
        yield
    assert not rf_trl.is_patched()


def test_patch_reaches_every_reference_and_restores_exactly():
    import trl.kernels
    import trl.trainer.grpo_trainer  # noqa: F401  (imports its helpers by name)
    holders = {(name, attr) for name, mod in list(sys.modules.items()) if name.startswith("trl") and mod is not None
               for attr, v in vars(mod).items() if any(v is o for o in ORIG.values())}
    assert ("trl.kernels", "ChunkedLogProbFunction") in holders
    with rf_trl.patched():
        for name, attr in holders:
            v = getattr(sys.modules[name], attr)
            assert v in (rf_trl.ChunkedLogProbFunction, rf_trl.selective_log_softmax, rf_trl.entropy_from_logits), \
                (name, attr)
    for name, attr in holders:
        assert any(getattr(sys.modules[name], attr) is o for o in ORIG.values()), (name, attr)
    assert trl_utils._ChunkedLogProbFunction is ORIG["_ChunkedLogProbFunction"]


def test_no_trl_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)
    with pytest.raises(ImportError, match="pip install trl"):
        rf_trl.patch()


@pytest.mark.parametrize("temperature,scale,softcap", [(1.0, 1.0, None), (0.7, 1.0, None), (0.9, 0.5, None),
                                                       (1.0, 1.0, 30.0), (0.8, 2.0, 5.0)])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprob_matches_trl(patched, temperature, scale, softcap, bias):
    g = torch.Generator().manual_seed(0)
    N, H, V = 37, 24, 301
    h = torch.randn(N, H, generator=g) * 2
    w = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    gl, ge = torch.randn(N, generator=g), torch.randn(N, generator=g)
    outs, grads = [], []
    for fn in (trl_utils._ChunkedLogProbFunction, ORIG["_ChunkedLogProbFunction"]):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (h, w, b)]
        lp, ent, *rest = fn.apply(*leaves, y, temperature, 128, softcap, scale, ("log_probs", "entropy"))
        assert all(r is None for r in rest)
        ((lp * gl).sum() + (ent * ge).sum()).backward()
        outs.append((lp, ent))
        grads.append([t.grad for t in leaves if t is not None])
    assert rf_trl.calls["chunked_logprob"] > 0
    for a, r, what in zip(outs[0], outs[1], ("log_probs", "entropy")):
        assert a.dtype == r.dtype == torch.float32
        assert_rel(a, r, 2e-5, what)
    for a, r in zip(grads[0], grads[1]):
        assert_rel(a, r, 2e-5, "grad")


def test_chunked_logprob_bf16_against_float64(patched):
    g = torch.Generator().manual_seed(1)
    N, H, V = 20, 16, 133
    h, w = torch.randn(N, H, generator=g).bfloat16(), torch.randn(V, H, generator=g).bfloat16()
    y = torch.randint(0, V, (N,), generator=g)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent, *_ = trl_utils._ChunkedLogProbFunction.apply(hl, wl, None, y, 0.8, 64, None, 1.0, ("log_probs", "entropy"))
    (lp.sum() + ent.sum()).backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    r_lp, r_ent = ref.linear_logprobs(h64, w64, y, None, 0.8, return_entropy=True)
    (r_lp.sum() + r_ent.sum()).backward()
    assert_rel(lp, r_lp, 2e-5, "bf16 log_probs")
    assert_rel(ent, r_ent, 2e-5, "bf16 entropy")
    assert_rel(hl.grad, h64.grad, 1e-2, "bf16 d hidden")
    assert_rel(wl.grad, w64.grad, 1e-2, "bf16 d weight")


def test_extra_outputs_go_to_trl(patched):
    h, w, y = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    before = rf_trl.calls["chunked_logprob_to_trl"]
    out = trl_utils._ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs", "mean_logits"))
    expect = ORIG["_ChunkedLogProbFunction"].apply(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs", "mean_logits"))
    assert rf_trl.calls["chunked_logprob_to_trl"] == before + 1
    assert torch.equal(out[3], expect[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("kind", ["plain", "topk", "row_mask"])
def test_selective_log_softmax_matches_trl(patched, dtype, temperature, kind):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 7, 55, generator=g) * 3).to(dtype)
    index = torch.randint(0, 55, (3, 7, 4) if kind == "topk" else (3, 7), generator=g)
    row_mask = (torch.rand(index.shape, generator=g) > 0.3).long() if kind == "row_mask" else None
    a_in, r_in = logits.clone().requires_grad_(), logits.double().requires_grad_()
    out = trl_utils.selective_log_softmax(a_in, index, temperature, row_mask)
    expect = ORIG["selective_log_softmax"](r_in, index, temperature, row_mask)  # TRL's own, in float64
    assert out.dtype == dtype and out.shape == index.shape
    tol = 1e-12 if dtype == torch.float64 else {torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    assert_rel(out, expect, tol, "logp")
    gl = torch.randn(index.shape, generator=g, dtype=torch.float64)
    (out.double() * gl).sum().backward()
    (expect * gl).sum().backward()
    assert_rel(a_in.grad, r_in.grad, 1e-10 if dtype == torch.float64 else 1e-2 if dtype == torch.bfloat16 else 2e-5,
               "grad")
    if dtype == torch.float32:  # and TRL's own function at the same precision
        assert_rel(out, ORIG["selective_log_softmax"](logits, index, temperature, row_mask), 2e-6, "fp32 vs TRL fp32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_entropy_from_logits_matches_trl(patched, dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 9, 77, generator=g) * 2).to(dtype)
    a_in, r_in = logits.clone().requires_grad_(), logits.double().requires_grad_()
    out = trl_utils.entropy_from_logits(a_in)
    expect = ORIG["entropy_from_logits"](r_in)
    assert out.dtype == dtype
    assert_rel(out, expect, 1e-12 if dtype == torch.float64 else 2e-6 if dtype == torch.float32 else 1e-2, "entropy")
    out.double().sum().backward()
    expect.sum().backward()
    assert_rel(a_in.grad, r_in.grad, 1e-10 if dtype == torch.float64 else 2e-5 if dtype == torch.float32 else 2e-2,
               "grad")


# ----------------------------------------------------------------------------- a real GRPOTrainer
def _tiny_grpo(tmp_path, patch: bool, steps=3, device="cpu"):
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import GRPOConfig, GRPOTrainer

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(997)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>")
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model_dir = tmp_path / "tiny-llama"  # GRPOTrainer builds its reference model from the policy's path
    if not model_dir.exists():
        transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir)
    prompts = [" ".join(f"w{(7 * i + j) % 997}" for j in range(5)) for i in range(16)]
    ds = datasets.Dataset.from_dict({"prompt": prompts})

    def reward(completions, **kw):  # deterministic across processes (no str hash), varies within a group
        return [float(len(c)) / 10.0 + (sum(map(ord, c)) % 7) / 7.0 for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / ("p" if patch else "u")), per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, max_steps=steps, logging_steps=1,
                      learning_rate=1e-3, report_to="none", use_cpu=device == "cpu", seed=0, data_seed=0,
                      bf16=False, save_strategy="no", beta=0.04, dataloader_num_workers=0, disable_tqdm=True)
    ctx = rf_trl.patched() if patch else _nullcontext()
    with ctx:
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                              processing_class=tokenizer)
        trainer.train()
    return [{k: h[k] for k in LOGGED if k in h} for h in trainer.state.log_history if "loss" in h]


LOGGED = ("loss", "grad_norm", "entropy", "kl")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_grpo_trainer_same_losses_patched_and_unpatched(tmp_path):
    before = rf_trl.calls["chunked_logprob"]
    patched_losses = _tiny_grpo(tmp_path, patch=True)
    ran = rf_trl.calls["chunked_logprob"] - before
    plain_losses = _tiny_grpo(tmp_path, patch=False)
    assert rf_trl.calls["chunked_logprob"] - before == ran  # unpatched: no rf call
    assert ran > 0, "the rf kernels did not run inside GRPOTrainer"
    assert len(patched_losses) == len(plain_losses) == 3
    assert any(abs(h["loss"]) > 1e-9 for h in plain_losses)  # not identically 0 (the KL term moves)
    for a, b in zip(patched_losses, plain_losses):
        assert set(a) == set(b) and {"loss", "grad_norm", "entropy"} <= set(a), a
        for k in a:  # the losses within 1e-6, and the O(1) grad norm / entropy to 1e-5 relative
            assert abs(a[k] - b[k]) <= (1e-6 if k in ("loss", "kl") else 1e-5 * abs(b[k])), (k, a, b)


def test_chunked_logprob_under_autocast_uses_the_tensors_the_forward_used(patched):
    # issue 20: under autocast the forward ran on the bf16-cast hidden, the backward built grad_weight from the
    # fp32 one; two hidden states equal after the cast must give equal values AND equal gradients, as TRL's own
    g = torch.Generator().manual_seed(3)
    N, H, V = 12, 16, 97
    h1 = torch.randn(N, H, generator=g).bfloat16().float()
    h2 = h1 * (1 + 2.0**-11)  # the same bf16 values (under half a bf16 ulp away), other fp32 ones
    assert torch.equal(h1.bfloat16(), h2.bfloat16()) and not torch.equal(h1, h2)
    w = torch.randn(V, H, generator=g) / 4
    b = torch.randn(V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    outs = []
    for fn in (rf_trl.ChunkedLogProbFunction, ORIG["_ChunkedLogProbFunction"]):
        for h in (h1, h2):
            hh, ww, bb = h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lp, ent, *_ = fn.apply(hh, ww, bb, y, 0.8, 32, None, 1.0, ("log_probs", "entropy"))
            (lp.sum() + 0.5 * ent.sum()).backward()
            outs.append([lp.detach(), ent.detach(), hh.grad, ww.grad, bb.grad])
    rf1, rf2, trl1, trl2 = outs
    # float64 on the tensors the forward uses: the bf16 casts of hidden, weight and bias
    leaves = [t.bfloat16().double().requires_grad_() for t in (h1, w, b)]
    lp64, ent64 = ref.linear_logprobs(*leaves[:2], y, leaves[2], temperature=0.8, return_entropy=True)
    (lp64.sum() + 0.5 * ent64.sum()).backward()
    want = [lp64, ent64] + [t.grad for t in leaves]
    for i, name in enumerate(("logp", "entropy", "grad hidden", "grad weight", "grad bias")):
        assert torch.equal(trl1[i], trl2[i]), f"TRL itself: {name}"  # the property, on TRL's own function
        assert torch.equal(rf1[i], rf2[i]), f"rf: {name} differs for inputs equal after the autocast cast"
        assert rf1[i].dtype == trl1[i].dtype, name
        # gradients come back through the cast: rounded once to bf16 (torch's autocast does the same)
        assert_rel(rf1[i], want[i], 1e-5 if i < 2 else 1e-2, f"rf under autocast vs float64 of the cast inputs: {name}")
