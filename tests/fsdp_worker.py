"""Run by tests/test_train_fsdp.py under ``torchrun --nproc_per_node=2`` (gloo, CPU); writes what each rank
saw to <out>/rank<r>.json for the test to check.

1. Shards: a trained model and a frozen one wrapped by runtime.wrap(parallel=fsdp), one AdamW step; the
   local numel of parameters, gradients and optimizer state on this rank (and of the frozen model).
2. Sampling with sharded parameters: under runtime.unsharded, greedy generation whose number of steps differs
   per rank (rank r generates 2 + 3r tokens, no EOS) must not hang and must give the tokens of a plain
   (unwrapped) copy of the model.
3. mixed_precision=bf16: the forward computes with bf16 parameters, the shards and their gradients stay fp32.
"""
import json
import os
import sys

import torch

from rlhf_fast.train.config import ModelConfig
from rlhf_fast.train.model import Transformer, generate
from rlhf_fast.train.runtime import adamw, setup, unsharded, wrap


def local(t) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def main(out: str):
    d = setup("cpu")
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, block_size=32)
    torch.manual_seed(0)
    model, frozen = Transformer(cfg, "lm"), Transformer(cfg, "value")
    plain = Transformer(cfg, "lm")
    plain.load_state_dict(model.state_dict())
    frozen.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    (net,) = wrap(d, [model], frozen=[frozen], parallel="fsdp")
    opt = adamw(model, 1e-3, 0.1)
    x = torch.randint(3, 90, (4, 9), generator=torch.Generator().manual_seed(d.rank))
    net(x).logsumexp(-1).mean().backward()
    opt.step()
    rec = {"parallel": d.parallel, "total": total,
           "frozen_total": sum(p.numel() for p in Transformer(cfg, "value").parameters()),
           "params": sum(local(p) for p in model.parameters()),
           "grads": sum(local(p.grad) for p in model.parameters()),
           "optim": sum(local(v) for st in opt.state.values() for k, v in st.items() if k != "step"),
           "optim_keys": sorted({k for st in opt.state.values() for k in st}),
           "frozen": sum(local(p) for p in frozen.parameters()),
           "param_is_shard": all(hasattr(p, "to_local") for p in model.parameters())}

    # 2. generation lengths that differ per rank, with the parameters gathered once
    for m in (model, plain):
        m.eval()
    prompt = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(7))
    pmask = torch.ones_like(prompt)
    n_new = 2 + 3 * d.rank
    plain.load_state_dict({k: v.full_tensor() for k, v in model.state_dict().items()})  # the trained weights
    with unsharded(model):
        got, _ = generate(model, prompt, pmask, n_new, eos_id=-1, pad_id=0, temperature=0.0)
    want, _ = generate(plain, prompt, pmask, n_new, eos_id=-1, pad_id=0, temperature=0.0)
    rec["generate_len"] = got.shape[1]
    rec["generate_equal"] = torch.equal(got, want)
    rec["resharded_after"] = all(hasattr(p, "to_local") for p in model.parameters())
    with torch.no_grad():  # and the sharded model still works with ordinary (collective) forwards after it
        rec["forward_after_equal"] = torch.allclose(model(prompt), plain(prompt), atol=1e-5)

    # 3. bf16 compute, fp32 shards and gradients
    torch.manual_seed(1)
    mp = Transformer(cfg, "lm")
    (mp_net,) = wrap(d, [mp], parallel="fsdp", mixed_precision="bf16")
    seen = []
    mp.blocks[0].mlp.fc.register_forward_hook(lambda mod, inp, outp: seen.append((mod.weight.dtype, outp.dtype)))
    mp_net(x).logsumexp(-1).mean().backward()
    rec["bf16_compute"] = [str(a) for a in seen[0]]
    rec["bf16_shard_dtypes"] = sorted({str(t.dtype) for p in mp.parameters() for t in (p, p.grad)})
    with open(os.path.join(out, f"rank{d.rank}.json"), "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main(sys.argv[1])
