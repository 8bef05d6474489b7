"""Optional model source: a Hugging Face transformers causal LM from a local folder (``init=hf:/path``).

The wrapper gives it the interface of model.Transformer: forward(idx, pad_mask) -> logits [B, T, V] or,
with head="value", values [B, T] from a new scalar head on the last hidden state. Generation uses the
model's own KV cache (``past_key_values``) through HFCache: left-padded prompts, position ids that count
real tokens only, the attention mask extended by one column per step. Dropout is switched off, as model.Transformer
has none: PPO's old and new log-probs must come from the same deterministic function, else the ratio
is noise. transformers is imported only here.
"""
from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import torch
import torch.nn as nn


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("init=hf:PATH needs the transformers package, which is not installed: "
                          "pip install transformers (or rlhf_fast[hf])") from None
    return transformers


class HFTokenizer:
    """encode/decode/pad_id/eos_id over a transformers tokenizer (no special tokens added)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id
        if self.eos_id is None:
            raise ValueError("the Hugging Face tokenizer has no eos_token_id")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        # no clean-up of spaces: the text must be what the tokens spell (answers are compared exactly)
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class HFCache:
    """What model.generate keeps between steps of an HFModel: the HF model's past_key_values, the
    attention mask over every token so far [B, S] and the position the next real token gets [B]."""

    def __init__(self):
        self.past = None
        self.mask: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None


class HFModel(nn.Module):
    def __init__(self, hf_model, path: str, head: str):
        super().__init__()
        self.hf, self.hf_path, self.head_kind = hf_model, path, head
        # transformers 5.x renamed past_key_values (argument and output) to cache
        self._cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
        c = hf_model.config
        self.cfg = SimpleNamespace(block_size=getattr(c, "max_position_embeddings", None) or 2048)
        if head == "value":
            self.head = nn.Linear(c.hidden_size, 1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def output_head(self):
        """(weight [V, C], bias [V] or None) of the lm head: logits = forward(..., return_hidden=True) @ weight.T."""
        c = self.hf.config
        if getattr(c, "final_logit_softcapping", None) or getattr(c, "logit_scale", None) not in (None, 1, 1.0):
            raise ValueError(f"{self.hf_path}: the model transforms its logits (softcap / scale); "
                             "use ppo.loss_impl=logits")
        head = self.hf.get_output_embeddings()
        return head.weight, head.bias

    def new_cache(self, batch: int, max_len: int, device, dtype) -> HFCache:
        return HFCache()

    def forward(self, idx, pad_mask=None, cache: HFCache | None = None, return_hidden=False):
        """idx [B, T] (pad_mask [B, T], 1 = real token) -> logits [B, T, V] or values [B, T]. With ``cache``
        idx continues the sequences cached so far (their keys are not recomputed) and the cache is updated.
        ``return_hidden``: the lm head's input [B, T, C] (after the final norm), without the logits."""
        if pad_mask is None:
            pad_mask = torch.ones_like(idx)
        pad_mask = pad_mask.long()
        pos = (pad_mask.cumsum(-1) - 1).clamp_min(0)
        if return_hidden:
            if cache is not None:
                raise ValueError("return_hidden is for the loss pass, without the generation cache")
            return self.hf.base_model(input_ids=idx, attention_mask=pad_mask, position_ids=pos,
                                      use_cache=False).last_hidden_state
        mask = pad_mask
        if cache is not None:
            if self.head_kind != "lm":
                raise ValueError("the KV cache is for generation, with the lm head")
            if cache.mask is not None:
                pos = pos + cache.pos[:, None]
                mask = torch.cat([cache.mask, pad_mask], 1)
        past = {self._cache_arg: cache.past} if cache is not None and cache.past is not None else {}
        out = self.hf(input_ids=idx, attention_mask=mask, position_ids=pos, **past,
                      output_hidden_states=self.head_kind == "value", use_cache=cache is not None)
        if cache is not None:
            cache.past, cache.mask = getattr(out, self._cache_arg), mask
            cache.pos = pad_mask.sum(-1) + (cache.pos if cache.pos is not None else 0)
        if self.head_kind == "lm":
            return out.logits.float()
        # the new head is fp32 whatever the model's dtype (a bf16 checkpoint loads as bf16)
        return self.head(out.hidden_states[-1].float()).squeeze(-1)


def _zero_dropout_config(config):
    """Zero the config's dropout rates (``attention_dropout``, ``resid_pdrop``, ...) before the model is
    built: some attention implementations copy them into plain float attributes."""
    for k, v in vars(config).items():
        if isinstance(v, float) and ("dropout" in k or k.endswith("pdrop")):
            setattr(config, k, 0.0)
        elif hasattr(v, "to_dict") and hasattr(v, "model_type"):  # a nested (text) config
            _zero_dropout_config(v)


def load_hf(path: str, head: str, device):
    transformers = _transformers()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init=hf:{path}: not a local folder with a transformers model "
                                "(config.json and weights); nothing is downloaded")
    path = os.path.abspath(path)  # checkpoints record it: they must load from any working directory
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        _zero_dropout_config(config)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"init=hf:{path}: could not load a causal LM and its tokenizer: {e}") from None
    for m in model.modules():  # and any dropout module the config does not describe
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"init=hf:{path}: the tokenizer has {len(tok)} tokens but the model's embedding "
                         f"only {model.get_input_embeddings().num_embeddings}")
    return HFModel(model, path, head).to(device), HFTokenizer(tok)
