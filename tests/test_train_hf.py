"""The optional Hugging Face model source (``init=hf:PATH``, rlhf_fast/train/hf.py) end to end, offline:
tiny Llama (untied) and GPT-2 (tied embeddings, dropout in its config) models with random weights and a
character-level tokenizer are built here and saved to a folder; nothing is downloaded."""
import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf:PATH model source needs transformers "
                                   "(pip install transformers); these tests are skipped without it")
tokenizers = pytest.importorskip("tokenizers", reason="building a local tokenizer needs the tokenizers package")

import rlhf_fast as rf  # noqa: E402
from rlhf_fast.cli import main  # noqa: E402
from rlhf_fast.train import checkpoint  # noqa: E402
from rlhf_fast.train.data import CharTokenizer, left_pad, right_pad  # noqa: E402
from rlhf_fast.train.model import generate  # noqa: E402
from rlhf_fast.train.runtime import load_model  # noqa: E402

PAD, EOS = 0, 1
TEXTS = ["Q: What is the capital of France?\nA: Paris", "Q: Peru?\nA: Lima", "x"]


def char_tokenizer():
    """A fast tokenizer with one token per character (the built-in alphabet), <pad>=0, <eos>=1."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CharTokenizer.chars)}}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, \n too
    tk.decoder = decoders.Fuse()  # decode by concatenation, no spaces between tokens
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
                                                unk_token="<unk>")


def build(kind: str, vocab: int):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS)  # dropout 0.1, tied
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    tok = char_tokenizer()
    dirs = {}
    for kind in ("llama", "gpt2"):
        path = str(tmp_path_factory.mktemp(kind))
        build(kind, len(tok)).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[kind] = path
    return dirs


def hf_logprobs(hf_model, seq: list[int]) -> torch.Tensor:
    """log p(seq[t+1] | seq[:t+1]) from the HF model's own logits, unpadded, in float64."""
    x = torch.tensor([seq])
    logp = torch.log_softmax(hf_model(input_ids=x).logits.double(), -1)[0, :-1]
    return logp.gather(-1, x[0, 1:, None])[:, 0]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tokenizer_wrapper(hf_dirs, kind):
    _, tok = load_model(f"hf:{hf_dirs[kind]}", "lm", "cpu")
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (PAD, EOS, len(CharTokenizer.chars) + 3)
    for s in TEXTS + ["a  b .", " ,x"]:
        ids = tok.encode(s)
        assert len(ids) == len(s) and EOS not in ids  # one token per character, no special tokens added
        assert tok.decode(ids) == s  # exact: no spaces inserted or cleaned up
        assert tok.decode(ids + [EOS] + tok.encode("junk")) == s  # stops at EOS


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logprobs_match_the_hf_model(hf_dirs, kind):
    model, tok = load_model(f"hf:{hf_dirs[kind]}", "lm", "cpu")
    model.train()  # dropout (GPT-2's config has 0.1) must be off: two passes give the same logits
    seqs = [tok.encode(s) for s in TEXTS]
    ids, mask = right_pad(seqs, tok.pad_id)
    torch.testing.assert_close(model(ids, mask), model(ids, mask), rtol=0, atol=0)
    with torch.no_grad():
        want = [hf_logprobs(model.hf, s) for s in seqs]
        for pad in (right_pad, left_pad):  # positions count real tokens only, pad keys are masked
            ids, mask = pad(seqs, tok.pad_id)
            logits = model(ids, mask)
            assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
            labels = torch.full_like(ids, -100)
            for i, s in enumerate(seqs):
                cols = range(0, len(s)) if pad is right_pad else range(ids.shape[1] - len(s), ids.shape[1])
                labels[i, cols[0]:cols[-1]] = ids[i, cols[0] + 1:cols[-1] + 1]
            got = rf.logprobs(logits, labels, ignore_index=-100)
            for i, s in enumerate(seqs):
                assert got[i][labels[i] != -100].shape == want[i].shape
                torch.testing.assert_close(got[i][labels[i] != -100].double(), want[i], rtol=0, atol=2e-5)
                assert (got[i][labels[i] == -100] == 0).all()
    # a second, independently loaded copy of the folder gives the same numbers (weights really loaded)
    other = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[kind], local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_logprobs(other, seqs[0]), want[0], rtol=0, atol=1e-6)
    value, _ = load_model(f"hf:{hf_dirs[kind]}", "value", "cpu")
    v = value(ids, mask)
    assert v.shape == ids.shape and (v == 0).all()  # the new scalar head starts at zero, like model.Transformer's
    assert model.cfg.block_size == 64


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_matches_greedy_recomputation(hf_dirs, kind):
    model, tok = load_model(f"hf:{hf_dirs[kind]}", "lm", "cpu")
    model.eval()
    prompts = [tok.encode(s) for s in ("Q: Peru?\nA:", "Q: What is the capital of Chad?\nA:")]
    ids, mask = left_pad(prompts, tok.pad_id)
    resp, rmask = generate(model, ids, mask, 8, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.0)
    assert resp.shape[1] >= 1
    with torch.no_grad():
        for i, p in enumerate(prompts):
            x = list(p)
            for t in range(resp.shape[1]):
                if not rmask[i, t]:
                    assert resp[i, t] == tok.pad_id
                    continue
                nxt = model.hf(input_ids=torch.tensor([x])).logits[0, -1].argmax().item()
                assert resp[i, t].item() == nxt, (i, t)
                x.append(nxt)
    g = torch.Generator().manual_seed(0)
    resp, rmask = generate(model, ids, mask, 8, tok.eos_id, tok.pad_id, temperature=1.0, generator=g)
    assert resp.shape == rmask.shape and ((resp < tok.vocab_size) | (rmask == 0)).all()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_generation_matches_recomputation(hf_dirs, kind):
    """The HF model's own KV cache (left padding, position ids, mask extended per step) gives the tokens
    of recomputing the whole prefix each step: greedy, and sampled with the same seed."""
    model, tok = load_model(f"hf:{hf_dirs[kind]}", "lm", "cpu")
    model.eval()
    prompts = [tok.encode(s) for s in ("Q: Peru?\nA:", "Q: What is the capital of Chad?\nA:", "x", "ab")]
    ids, mask = left_pad(prompts, tok.pad_id)
    # a token that some rows emit early, as if it were EOS: finished rows must not disturb the others
    eos = tok.encode("e")[0]
    for temperature in (0.0, 1.0):
        runs = []
        for kv_cache in (True, False):
            g = torch.Generator().manual_seed(3)
            runs.append(generate(model, ids, mask, 20, eos, tok.pad_id, temperature, g, kv_cache=kv_cache))
        (resp, rmask), (want, want_mask) = runs
        assert torch.equal(resp, want) and torch.equal(rmask, want_mask), temperature
        assert resp.shape[1] >= 2 and rmask.sum() >= 8
    with pytest.raises(ValueError, match="the KV cache is for generation"):
        value, _ = load_model(f"hf:{hf_dirs[kind]}", "value", "cpu")
        value(ids, mask, value.new_cache(4, 20, "cpu", torch.float32))


def _finite_losses(out_dir, key="loss"):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    vals = [r[key] for r in rows if key in r]
    assert vals and all(math.isfinite(v) for v in vals), vals
    return vals


def test_stages_from_an_hf_model_through_the_cli(hf_dirs, tmp_path):
    """SFT from hf:PATH, then the reward model and PPO from its checkpoints, with the CLI's entry point.
    GPT-2 ties lm_head to the embedding, so the checkpoints exercise shared tensors too."""
    base = hf_dirs["gpt2"]
    sft_out, rm_out, ppo_out = (str(tmp_path / s) for s in ("sft", "reward", "ppo"))
    assert main(["sft", "--out", sft_out, f"init=hf:{base}", "steps=3", "batch_size=4", "device=cpu"]) == 0
    sft_ckpt = os.path.join(sft_out, "model.safetensors")
    assert main(["reward", "--out", rm_out, f"init={sft_ckpt}", "steps=3", "batch_size=4", "device=cpu"]) == 0
    rm_ckpt = os.path.join(rm_out, "model.safetensors")
    assert main(["ppo", "--out", ppo_out, f"init={sft_ckpt}", f"reward_model={rm_ckpt}", "iterations=2",
                 "rollout_size=4", "minibatch_size=2", "ppo_epochs=1", "ptx_batch_size=2", "max_new_tokens=4",
                 "device=cpu"]) == 0
    for d in (sft_out, rm_out, ppo_out):
        for f in ("model.safetensors", "metrics.jsonl", "config.json"):
            assert os.path.exists(os.path.join(d, f)), (d, f)
        assert checkpoint.latest_state(d), d  # the resumable DCP folder
    assert len(_finite_losses(sft_out)) == 3 and len(_finite_losses(rm_out)) == 3
    for k in ("pg_loss", "vf_loss", "ptx_loss", "kl", "mean_score"):
        assert len(_finite_losses(ppo_out, k)) == 2
    for d, head in ((sft_out, "lm"), (rm_out, "value"), (ppo_out, "lm")):
        meta = checkpoint.meta(os.path.join(d, "model.safetensors"))
        assert meta["hf_path"] == os.path.abspath(base) and meta["head"] == head

    # the fine-tuned checkpoints load back into the HF architecture with the trained weights
    tuned, tok = load_model(sft_ckpt, "lm", "cpu")
    fresh, _ = load_model(f"hf:{base}", "lm", "cpu")
    saved = checkpoint.module_state(checkpoint.read(sft_ckpt)[0], "model")
    assert all(torch.equal(v, saved[k]) for k, v in tuned.state_dict().items())
    emb = tuned.hf.get_input_embeddings().weight
    assert emb.data_ptr() == tuned.hf.get_output_embeddings().weight.data_ptr()  # still tied
    assert not torch.equal(emb, fresh.hf.get_input_embeddings().weight)  # SFT changed it
    with torch.no_grad():
        s = tok.encode(TEXTS[0])
        got = rf.logprobs(tuned(torch.tensor([s]))[:, :-1], torch.tensor([s[1:]]))[0]
        torch.testing.assert_close(got.double(), hf_logprobs(tuned.hf, s), rtol=0, atol=2e-5)
    rm, _ = load_model(rm_ckpt, "value", "cpu")
    assert not (rm.head.weight == 0).all()  # the reward head was trained


def test_reward_model_straight_from_hf(hf_dirs, tmp_path):
    """The RM can also start from hf:PATH (Llama this time): a new value head on the HF body."""
    out = str(tmp_path / "rm")
    assert main(["reward", "--out", out, f"init=hf:{hf_dirs['llama']}", "steps=2", "batch_size=4",
                 "device=cpu"]) == 0
    assert len(_finite_losses(out)) == 2
    assert checkpoint.meta(os.path.join(out, "model.safetensors"))["head"] == "value"


def test_a_bf16_checkpoint_loads_with_both_heads(hf_dirs, tmp_path):
    """A model saved in bf16 loads in bf16; the fp32 value head must still apply (it failed on dtype)."""
    path = str(tmp_path / "bf16")
    transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"]).to(torch.bfloat16).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    x = torch.tensor([char_tokenizer().encode(TEXTS[1])])
    for head, shape in (("lm", (1, x.shape[1], len(CharTokenizer.chars) + 3)), ("value", tuple(x.shape))):
        model, _ = load_model(f"hf:{path}", head, "cpu")
        out = model(x)
        assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_hf_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load a causal LM"):
        load_model(f"hf:{tmp_path / 'empty'}", "lm", "cpu")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_model("hf:no/such/folder", "lm", "cpu")
