"""A small decoder-only transformer (gpt-fast style): RoPE, RMSNorm, SDPA attention, a KV cache.

One definition serves all four RLHF roles; only the head differs:
  head="lm"     logits [B, T, V]   policy, reference (and the pretrained / SFT model)
  head="value"  values [B, T]      critic (per token) and reward model (the value at the last token)

Padding: every call takes ``pad_mask`` [B, T] (1 = real token). Positions are counted over real
tokens only and padded keys are never attended to, so left padding (generation) and right padding
(training) give the same outputs for the real tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

__all__ = ["ModelConfig", "Transformer", "KVCache", "generate"]

_flash_attn_func = None


def _flash_attn():
    """flash_attn_func if the flash-attn package imports, else None (looked up once, lazily)."""
    global _flash_attn_func
    if _flash_attn_func is None:
        try:
            from flash_attn import flash_attn_func
            _flash_attn_func = flash_attn_func
        except Exception:  # not installed, or built for another torch: SDPA does the job
            _flash_attn_func = False
    return _flash_attn_func or None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, H, T, D] by pos·base^(-2i/D); pos [B, T] per row."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None, :, None] * inv_freq  # [B, 1, T, D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


@dataclass
class KVCache:
    """Keys and values of every layer for slots [0, length); ``valid`` marks the non-pad slots."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor   # [B, S] bool
    pos: torch.Tensor     # [B] the position the next real token gets
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        hd = cfg.d_model // cfg.n_head
        shape = (batch, cfg.n_head, max_len, hd)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
                   torch.zeros(batch, max_len, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.rope_base = cfg.n_head, cfg.rope_base
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, pos, attn_mask, cache: KVCache | None, layer: int):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = rope(q, pos, self.rope_base), rope(k, pos, self.rope_base)
        if cache is not None:  # write this chunk's keys/values, attend over everything cached so far
            s = cache.length
            cache.k[layer][:, :, s:s + T] = k
            cache.v[layer][:, :, s:s + T] = v
            k, v = cache.k[layer][:, :, :s + T], cache.v[layer][:, :, :s + T]
        flash = _flash_attn() if attn_mask is None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else None
        if flash is not None:  # no padding and no cache offset: plain causal attention in [B, T, H, D]
            y = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
        elif attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = 4 * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.out = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.out(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model, cfg.norm_eps), MLP(cfg)

    def forward(self, x, pos, attn_mask, cache, layer):
        x = x + self.attn(self.norm1(x), pos, attn_mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, head: str = "lm"):
        super().__init__()
        if head not in ("lm", "value"):
            raise ValueError(f"head must be 'lm' or 'value', got {head!r}")
        if cfg.d_model % cfg.n_head or (cfg.d_model // cfg.n_head) % 2:
            raise ValueError(f"d_model={cfg.d_model} must split into n_head={cfg.n_head} heads of even size")
        self.cfg, self.head_kind = cfg, head
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size if head == "lm" else 1, bias=head == "value")
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if head == "value":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def output_head(self):
        """(weight [V, C], bias [V] or None) of the head: logits = forward(..., return_hidden=True) @ weight.T."""
        return self.head.weight, self.head.bias

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False):
        """idx [B, T] -> logits [B, T, V] (lm head) or values [B, T] (value head), in fp32; with
        return_hidden, the head's input [B, T, C] instead (for rf.linear_* ops: no [B, T, V] logits)."""
        B, T = idx.shape
        if cache is None and T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.cfg.block_size}")
        if pad_mask is None and cache is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
            attn_mask = None
        else:
            if pad_mask is None:
                pad_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            pad_mask = pad_mask.bool()
            start = 0 if cache is None else cache.length
            offset = 0 if cache is None else cache.pos[:, None]
            pos = offset + (pad_mask.long().cumsum(-1) - 1).clamp_min(0)
            if cache is not None:
                cache.valid[:, start:start + T] = pad_mask
                keys_valid = cache.valid[:, :start + T]
            else:
                keys_valid = pad_mask
            q_slot = torch.arange(start, start + T, device=idx.device)[:, None]
            k_slot = torch.arange(start + T, device=idx.device)[None, :]
            # causal over slots, no pad keys; a query may always see itself (pad rows stay finite)
            attn_mask = ((k_slot <= q_slot) & keys_valid[:, None, None, :]) | (k_slot == q_slot)
        x = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, attn_mask, cache, i)
        if cache is not None:
            cache.length += T
            cache.pos += pad_mask.long().sum(-1)
        h = self.norm(x)
        if return_hidden:
            return h
        out = self.head(h).float()
        return out if self.head_kind == "lm" else out.squeeze(-1)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero entry of each row of mask [B, T] (0 for an empty row)."""
    ar = torch.arange(mask.shape[1], device=mask.device)
    return (mask.bool() * ar).argmax(-1)


def sequence_scores(model: Transformer, idx, pad_mask) -> torch.Tensor:
    """Reward-model score [B]: the value head at the last real token of each sequence."""
    values = model(idx, pad_mask)
    return values.gather(1, last_index(pad_mask)[:, None]).squeeze(1)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
             eos_id: int, pad_id: int, temperature: float = 1.0, generator: torch.Generator | None = None,
             kv_cache: bool = True):
    """Sample continuations of left-padded prompts [B, P] with the model's KV cache (KVCache, or the
    model's own via ``model.new_cache``; kv_cache=False recomputes the whole prefix each step instead).

    temperature=0 is greedy. Returns response tokens [B, R] and their mask [B, R] (1 up to and including
    EOS, then 0 with pad_id tokens), R <= max_new_tokens.
    """
    B, P = prompt.shape
    max_new_tokens = min(max_new_tokens, model.cfg.block_size - P)
    if max_new_tokens < 1:
        raise ValueError(f"prompts of {P} tokens leave no room to generate in block_size={model.cfg.block_size}")
    if kv_cache:
        new_cache = getattr(model, "new_cache", lambda *a: KVCache.empty(model.cfg, *a))
        cache = new_cache(B, P + max_new_tokens, prompt.device, next(model.parameters()).dtype)
        step = lambda tok, alive: model(tok[:, None], alive[:, None], cache)[:, -1]  # noqa: E731
    else:  # O(T^2): the reference the cached paths are tested against
        seq, seq_mask = prompt, prompt_mask

        def step(tok, alive):
            nonlocal seq, seq_mask
            seq, seq_mask = torch.cat([seq, tok[:, None]], 1), torch.cat([seq_mask, alive[:, None].long()], 1)
            return model(seq, seq_mask)[:, -1]
        cache = None
    logits = model(prompt, prompt_mask, cache)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    tokens, masks = [], []
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        alive = ~done
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        tokens.append(nxt)
        masks.append(alive)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        logits = step(nxt, alive)
    return torch.stack(tokens, 1), torch.stack(masks, 1).long()
