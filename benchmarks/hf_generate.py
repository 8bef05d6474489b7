"""Generation from a Hugging Face model (init=hf:PATH): the model's own KV cache vs recomputing the
whole prefix each step (what rlhf_fast.train.hf did before), same prompts, same seed, same tokens.

    python -m benchmarks.hf_generate [--device cpu|cuda] [--out DIR]

A small Llama with random weights is built from a config (nothing is downloaded). For each response
length the two paths generate from the same left-padded prompts with the same sampling seed; the
tokens must be identical (checked), and the wall time of each is the median of --repeats runs, with
the speed-up as the ratio in the same run. Writes hf_generate.json into benchmarks/results/<device>/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .harness import device_slug, environment


def _model(device: str):
    import transformers

    from rlhf_fast.train.hf import HFModel
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return HFModel(transformers.LlamaForCausalLM(cfg), "(built from a config)", "lm").to(device).eval()


def _time(fn, device: str, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> dict:
    from rlhf_fast.train.data import left_pad
    from rlhf_fast.train.model import generate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32, help="longest prompt (rows are 8..this tokens, left padded)")
    ap.add_argument("--lengths", default="32,64,128", help="response lengths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = _model(args.device)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(8, args.prompt + 1, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in lens]
    ids, mask = left_pad(prompts, 0)
    ids, mask = ids.to(args.device), mask.to(args.device)
    rows = []
    for n in map(int, args.lengths.split(",")):
        def run(kv):
            gen = torch.Generator(device=args.device).manual_seed(1)
            # eos_id=-1: no early stop, every row generates n tokens
            return generate(model, ids, mask, n, eos_id=-1, pad_id=0, temperature=1.0, generator=gen, kv_cache=kv)
        t_cache, (a, _) = _time(lambda: run(True), args.device, args.repeats)
        t_full, (b, _) = _time(lambda: run(False), args.device, args.repeats)
        same = bool(torch.equal(a, b))
        rows.append({"new_tokens": n, "kv_cache_s": t_cache, "recompute_s": t_full, "speedup": t_full / t_cache,
                     "same_tokens": same, "tokens_per_s_kv_cache": args.batch * n / t_cache})
        print(f"{n:4d} new tokens: kv cache {t_cache:.3f}s, recompute {t_full:.3f}s, x{t_full / t_cache:.2f}"
              f" (same tokens: {same})", flush=True)
    result = {"meta": environment(args.device), "batch": args.batch, "prompt_tokens": lens, "threads": args.threads,
              "model": "Llama, 4 layers, hidden 256, 8 heads (4 kv), vocab 512, fp32, random weights",
              "sampling": "temperature 1.0, same seed for both paths", "rows": rows}
    out = args.out or os.path.join(os.path.dirname(__file__), "results", device_slug(args.device))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "hf_generate.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
