"""Tokenizer, the built-in capitals task, JSONL loaders (with their checks) and batching.

Built-in task (nothing is downloaded): countries and capitals (data/capitals.tsv), split into training
and held-out countries. Every fact, held-out ones too, is in the pretraining corpus; the held-out
countries appear in no SFT demonstration, preference pair or PPO training prompt.
  pretraining corpus  sentences stating every fact in several phrasings ("The capital of France is Paris.",
                      "Q: What is the capital of France?\nA: Paris.")
  SFT                 prompt "Q: What is the capital of France?\nA:" -> " Paris"; noisy annotators also
                      demonstrate a question back (" What is the capital of Italy?"), so the SFT model
                      often answers a question with a question: the habit RLHF has to remove
  preferences         chosen = the right capital, rejected = a question back or a wrong capital; checked
                      on held-out pairs and on pairs about the held-out countries (answer vs question
                      back: a preference that generalises; right vs wrong capital: one that does not)
  PPO prompts         the training countries' questions; held-out accuracy (the true reward: the answer
                      is the right capital) is measured on the held-out countries' questions

User data, one JSON object per line:
  pretrain {"text"}   sft {"prompt", "response"}   reward {"prompt", "chosen", "rejected"}
  ppo {"prompt"} with an optional "answer" (the true reward: 1 when the stripped response equals it)
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch

_DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


class CharTokenizer:
    """Character level: PAD=0, EOS=1, then newline and printable ASCII (98 symbols in all)."""
    PAD, EOS = 0, 1
    chars = "\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self):
        self.stoi = {ch: i + 2 for i, ch in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 2
        self.pad_id, self.eos_id = self.PAD, self.EOS

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet "
                             "(newline and printable ASCII)") from None

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if 2 <= i < self.vocab_size:
                out.append(self.chars[i - 2])
        return "".join(out)


# ---- the built-in task ----------------------------------------------------------------------------

def capitals(split: str | None = None) -> list[tuple[str, str]]:
    """(country, capital) rows of data/capitals.tsv; split "train" / "held_out" / None (all)."""
    with open(os.path.join(_DATA_DIR, "capitals.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
    return [(c, cap) for c, cap, s in rows if split is None or s == split]


FACT_TEMPLATES = [
    "The capital of {c} is {a}.",
    "{a} is the capital of {c}.",
    "The capital city of {c} is {a}.",
    "Which city is the capital of {c}? It is {a}.",
    "{c} has its capital at {a}.",
    "In {c}, the seat of government is {a}.",
    "Q: What is the capital of {c}?\nA: {a}.",  # the web has quizzes: the facts in the SFT prompt's format
]
QUESTION_TEMPLATES = ["Q: What is the capital of {c}?\nA:", "Q: Name the capital city of {c}.\nA:"]
# the mistake the demo is about: answering a question with another question
# (no guessed capitals in them: "Is it Rome?" would teach the SFT model to name random capitals)
QUESTION_BACKS = [" What is the capital of {o}?", " And the capital of {o}?", " What about {o}?",
                  " Why do you ask?", " Which city?", " Do you know?"]
# noisy annotators: this fraction of the SFT prompts is demonstrated twice, answered and asked back, so
# the SFT model keeps the habit (at 1.0 half the demonstrations ask back)
QUESTION_BACK_PROB = 1.0
BLOCK_SIZE = 64  # every built-in row fits ModelConfig's default context


def split_countries():
    return capitals("train"), capitals("held_out")


def builtin_corpus(seed: int = 0, n_sentences: int = 6000) -> str:
    """Sentences of facts about every country (held-out ones too) in random order, one per line."""
    rng = random.Random(seed)
    table = capitals()
    lines = [rng.choice(FACT_TEMPLATES).format(c=c, a=a) for c, a in (rng.choice(table) for _ in range(n_sentences))]
    return "\n".join(lines) + "\n"


def question_back(rng: random.Random, prompt: str, country: str, rows) -> str:
    """A response that asks a question instead of answering (about another country, or a guess), one
    that fits BLOCK_SIZE with the prompt."""
    for _ in range(100):
        o, w = rng.choice([r for r in rows if r[0] != country])
        text = rng.choice(QUESTION_BACKS).format(o=o, w=w)
        if len(prompt) + len(text) + 1 <= BLOCK_SIZE:
            return text
    return " Which city?"


def builtin_sft(split: str, seed: int = 0):
    """split "train": demonstrations for the training countries, some also demonstrated with a question
    back (QUESTION_BACK_PROB); "eval": the held-out countries' prompts with the right answer (accuracy)."""
    train, held = split_countries()
    if split != "train":
        return [{"prompt": q.format(c=c), "response": " " + a} for c, a in held for q in QUESTION_TEMPLATES]
    rng = random.Random(seed)
    rows = []
    for c, a in train:
        for q in QUESTION_TEMPLATES:
            prompt = q.format(c=c)
            rows.append({"prompt": prompt, "response": " " + a})
            # the same prompt demonstrated both ways: the habit does not depend on the country
            if rng.random() < QUESTION_BACK_PROB:
                rows.append({"prompt": prompt, "response": question_back(rng, prompt, c, train)})
    return rows


def builtin_preferences(split: str, seed: int = 0, eval_frac: float = 0.2):
    """Pairs (prompt, chosen = the right capital, rejected). split "train" / "eval": a seeded 80/20 split
    of the pairs of the training countries; "new_countries": question-back pairs about the held-out
    countries (does the preference generalise?); "new_countries_wrong": wrong-capital pairs about them."""
    rng = random.Random(seed)
    train, held = split_countries()
    rows = held if split.startswith("new_countries") else train
    pairs = []
    for c, a in rows:
        for q in QUESTION_TEMPLATES:
            prompt = q.format(c=c)
            backs = [question_back(rng, prompt, c, rows) for _ in range(4)]
            wrong = [" " + w for w in rng.sample([x for _, x in rows if x != a], 2)]
            rejected = {"new_countries": backs, "new_countries_wrong": wrong}.get(split, backs + wrong)
            pairs += [{"prompt": prompt, "chosen": " " + a, "rejected": r} for r in rejected]
    rng.shuffle(pairs)
    if split.startswith("new_countries"):
        return pairs
    n_eval = round(eval_frac * len(pairs))
    return pairs[n_eval:] if split == "train" else pairs[:n_eval]


def builtin_prompts(split: str):
    """PPO prompts with their true answer: the training countries ("train") or the held-out ones ("eval")."""
    train, held = split_countries()
    return [{"prompt": q.format(c=c), "answer": a} for c, a in (train if split == "train" else held)
            for q in QUESTION_TEMPLATES]


# ---- user JSONL -------------------------------------------------------------------------------------

STAGE_FIELDS = {"pretrain": ("text",), "sft": ("prompt", "response"), "reward": ("prompt", "chosen", "rejected"),
                "ppo": ("prompt",)}
OPTIONAL_FIELDS = {"ppo": ("answer",)}  # optional, but a string when present
MAX_REPORTED = 20  # bad lines listed per file; the rest are counted


class DataError(ValueError):
    """Bad rows in a data file: ``problems`` holds one line per problem, ``path:line: field 'x': what is
    wrong (what to do)``; str() is all of them, one per line."""

    def __init__(self, problems: list[str], n_more: int = 0):
        self.problems = list(problems) + ([f"... and {n_more} more bad lines"] if n_more else [])
        super().__init__("\n".join(self.problems))


def _too_long_hint(block_size: int) -> str:
    return (f"shorten it, or use a model with a longer context: pretrain with model.block_size={2 * block_size} "
            "(sft/reward/ppo take the context of their init checkpoint)")


def row_problems(row, stage: str, tok, block_size: int) -> list[str]:
    """What is wrong with one parsed row for ``stage`` ([] when nothing): ``field 'x': ...`` strings."""
    need = STAGE_FIELDS[stage]
    if not isinstance(row, dict):
        return [f"expected a JSON object with fields {', '.join(need)}, got {type(row).__name__}"]
    out = []
    for k in need + OPTIONAL_FIELDS.get(stage, ()):
        if k not in row:
            if k in need:
                out.append(f"missing field {k!r} (a {stage} row needs {', '.join(need)})")
        elif not isinstance(row[k], str):
            out.append(f"field {k!r} must be a string, got {type(row[k]).__name__} {json.dumps(row[k])[:40]}")
        elif not row[k].strip():
            why = ("the model needs at least one prompt token to answer" if k == "prompt" else
                   f"every {stage} row needs a non-empty {k}")
            out.append(f"field {k!r} is empty: {why}")
    if out:
        return out
    lengths = {}
    for k in need:
        try:
            lengths[k] = len(tok.encode(row[k]))
        except ValueError:
            bad = next(((i, ch) for i, ch in enumerate(row[k]) if ch not in getattr(tok, "stoi", {ch: 0})), (0, "?"))
            out.append(f"field {k!r}: character {bad[1]!r} (U+{ord(bad[1]):04X}, position {bad[0] + 1}) is not in the "
                       "tokenizer's alphabet (newline and printable ASCII): replace it, or start from an "
                       "init=hf:PATH model whose tokenizer has it")
    if out or stage == "pretrain":
        return out
    plen = lengths["prompt"]
    if plen >= block_size:
        return [f"field 'prompt' is {plen} tokens, too long for block_size={block_size} (the context must also hold "
                f"at least one response token): {_too_long_hint(block_size)}"]
    for k in need[1:]:
        total = plen + lengths[k] + 1  # + EOS
        if total > block_size:
            out.append(f"field {k!r}: prompt + {k} + EOS is {total} tokens, longer than block_size={block_size}: "
                       f"{_too_long_hint(block_size)}")
    if stage == "reward" and not out and row["chosen"] == row["rejected"]:
        out.append("fields 'chosen' and 'rejected' are the same text: the pair teaches no preference")
    return out


def load_jsonl(path: str, stage: str, tok: CharTokenizer, block_size: int) -> list[dict]:
    """Rows of ``path`` checked for ``stage``: required fields, types, non-empty text, the tokenizer's
    alphabet, lengths that fit ``block_size``. Raises DataError listing every bad line (up to MAX_REPORTED)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"data file {path} is a folder; expected a JSONL file")
    rows, problems, n_bad = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                found = row_problems(row, stage, tok, block_size)
            except json.JSONDecodeError as e:
                found = [f"not valid JSON ({e.msg} at column {e.colno})"]
            if found:
                n_bad += 1
                if n_bad <= MAX_REPORTED:
                    problems += [f"{path}:{n}: {p}" for p in found]
            else:
                rows.append(row)
    if problems:
        raise DataError(problems, n_more=max(0, n_bad - MAX_REPORTED))
    if not rows:
        need = ", ".join(STAGE_FIELDS[stage])
        raise DataError([f"{path}: no rows (expected one JSON object per line with fields {need})"])
    return rows


def split_rows(rows: list, eval_frac: float, seed: int, path: str = "the data file"):
    """A seeded (train, eval) split of user rows; with eval_frac > 0 eval gets at least one row, and the
    file must then have two or more."""
    if not 0 <= eval_frac < 1:
        raise ValueError(f"eval_frac={eval_frac}: expected a fraction in [0, 1)")
    if eval_frac > 0 and len(rows) < 2:
        raise DataError([f"{path}: {len(rows)} row, but eval_frac={eval_frac} holds rows out for evaluation: "
                         "give two or more rows, or set eval_frac=0 to train on it without a held-out check"])
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = 0 if eval_frac == 0 else min(len(rows) - 1, max(1, round(eval_frac * len(rows))))
    return rows[n_eval:], rows[:n_eval]


def load_user_rows(path: str, stage: str, tok, block_size: int, eval_frac: float, seed: int):
    """(train, eval) rows of a user's file for ``stage``, validated (load_jsonl) and split (split_rows)."""
    return split_rows(load_jsonl(path, stage, tok, block_size), eval_frac, seed, path)


# ---- tensors ---------------------------------------------------------------------------------------

def corpus_tokens(path: str, tok: CharTokenizer, block_size: int, seed: int) -> torch.Tensor:
    """The pretraining corpus as one long token stream (documents separated by EOS)."""
    if path:
        ids = []
        for row in load_jsonl(path, "pretrain", tok, block_size):
            ids += tok.encode(row["text"]) + [tok.eos_id]
    else:
        ids = tok.encode(builtin_corpus(seed))
    if len(ids) <= block_size + 1:
        raise ValueError(f"pretraining corpus has {len(ids)} tokens; need more than block_size + 1 = {block_size + 1}")
    return torch.tensor(ids, dtype=torch.long)


def stream_batch(data: torch.Tensor, idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """Windows of block_size + 1 tokens starting at ``idx`` [B] -> [B, block_size + 1]."""
    return torch.stack([data[i:i + block_size + 1] for i in idx.tolist()])


@dataclass
class Batch:
    ids: torch.Tensor      # [B, T]
    mask: torch.Tensor     # [B, T] 1 = real token
    labels: torch.Tensor | None = None  # [B, T] next-token targets, -100 where not trained


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    return ids, mask


def sft_batch(rows: list[dict], tok: CharTokenizer) -> Batch:
    """prompt + response + EOS, right padded; labels are the next tokens, -100 on the prompt and padding."""
    seqs, n_prompt = [], []
    for r in rows:
        p = tok.encode(r["prompt"])
        seqs.append(p + tok.encode(r["response"]) + [tok.eos_id])
        n_prompt.append(len(p))
    ids, mask = right_pad(seqs, tok.pad_id)
    labels = torch.full_like(ids, -100)
    for i, (s, p) in enumerate(zip(seqs, n_prompt)):
        labels[i, p - 1:len(s) - 1] = ids[i, p:len(s)]  # position t predicts token t + 1
    return Batch(ids, mask, labels)


def pair_batch(rows: list[dict], tok: CharTokenizer) -> tuple[Batch, Batch]:
    """(chosen, rejected) sequences prompt + answer + EOS, right padded."""
    ch = [tok.encode(r["prompt"] + r["chosen"]) + [tok.eos_id] for r in rows]
    rj = [tok.encode(r["prompt"] + r["rejected"]) + [tok.eos_id] for r in rows]
    return Batch(*right_pad(ch, tok.pad_id)), Batch(*right_pad(rj, tok.pad_id))


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of a global batch of indices (DistributedSampler style: every world-th one)."""
    return indices[rank::world]
