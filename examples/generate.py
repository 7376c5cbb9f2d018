"""Generate with a compiled decoder: a padded batch at once, tokens streamed, sampling with a seed.

python examples/generate.py [--model tiny-llama] [--max-new-tokens 12]
"""

from __future__ import annotations

import argparse
import warnings

import torch

import dsc
from dsc import zoo

warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", choices=zoo.names())
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()
    n = args.max_new_tokens

    model = zoo.build(args.model, init_std=0.3)
    compiled = dsc.compile(model, target=dsc.Target(max_batch=2, max_seq_len=64))

    # Greedy, two prompts of different lengths (left-padded); eos=[] so each makes n tokens.
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
    for row in out:
        print("greedy:  ", row[ids.shape[1] :].tolist())
    with torch.no_grad():
        ref = model.generate(ids[1:], max_new_tokens=n, do_sample=False, eos_token_id=None)
    assert torch.equal(out[1], ref[0]), "greedy tokens differ from HF generate"
    print("row 1 equals HF generate")

    # Streaming: each step's tokens arrive as soon as they are chosen.
    print("streamed:", end=" ", flush=True)
    for token in compiled.stream(ids[1:], max_new_tokens=n, eos_token_id=[]):
        print(int(token[0]), end=" ", flush=True)
    print()

    # Sampling is reproducible with a seed.
    kw = {
        "max_new_tokens": n,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 20,
        "seed": 7,
        "eos_token_id": [],
    }
    first, second = compiled.generate(ids, mask, **kw), compiled.generate(ids, mask, **kw)
    assert torch.equal(first, second)
    print("sampled: ", first[1, ids.shape[1] :].tolist(), "(same twice with seed=7)")


if __name__ == "__main__":
    main()
