"""Tensor parallelism: one process per rank under torchrun, the same tokens on every rank.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py                 # CPU, gloo
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --device cuda   # GPUs, NCCL

Every rank builds the same model (same seed), compiles it for Target(tp=N) — each keeps its
shard of the weights — and gets the full logits and the same generated tokens. Rank 0 checks
them against the unsharded model and prints what each rank's plan holds.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

import dsc
from dsc import zoo

warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", choices=zoo.names())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; 1 when run alone

    model = zoo.build(args.model, init_std=0.3, seed=1)  # the same weights on every rank
    target = dsc.Target(device=args.device, tp=world, max_batch=1, max_seq_len=64)
    compiled = dsc.compile(model, target)  # joins the process group torchrun describes
    rank = torch.distributed.get_rank() if world > 1 else 0

    ids = torch.tensor([[5, 17, 42, 8, 99]])
    logits = compiled(ids).logits  # the full vocabulary on every rank
    tokens = compiled.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=[])
    tokens = tokens[0, ids.shape[1]:].tolist()

    if rank == 0:
        model = model.float()
        with torch.no_grad():
            ref_logits = model(ids).logits
            ref = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=None)[0, ids.shape[1]:].tolist()
        diff = float((logits.float().cpu() - ref_logits).abs().max())
        print(f"tp={world}: logits {tuple(logits.shape)}, largest difference from the unsharded "
              f"model {diff:.1e}")
        print(f"tokens {tokens} ({'equal to' if tokens == ref else 'DIFFERENT from'} the "
              f"unsharded model's)")
        assert tokens == ref and diff < 1e-3
    held = sum(t.numel() for t in compiled.plan.weights.values())
    total = sum(p.numel() for p in model.parameters())
    print(f"rank {rank}: tokens {tokens}; holds {held} of the model's {total} weight elements")


if __name__ == "__main__":
    main()
