"""Compile a HF model from the zoo and check dsc's logits against eager PyTorch.

python examples/compile_and_run.py [--model tiny-llama]
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
    args = parser.parse_args()

    model = zoo.build(args.model, init_std=0.3)
    compiled = dsc.compile(model, target=dsc.Target(device="cpu", max_batch=2, max_seq_len=64))

    # Two prompts, the second left-padded: the mask must reach every attention.
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    out = compiled(ids, attention_mask=mask)
    name = "logits" if out.logits is not None else "last_hidden_state"
    expected, got = getattr(ref, name), out[name]
    # Padded positions attend to nothing, so their outputs are not compared.
    real = mask.bool()
    got, expected = got[real], expected[real]
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()  # wide random weights give logits in the tens
    print(
        f"{args.model}: {name} {tuple(out[name].shape)}, max |dsc - eager| = {diff:.2e} "
        f"(max |eager| = {scale:.1f})"
    )
    assert diff <= 1e-4 * max(scale, 1.0), f"dsc differs from eager by {diff:.2e}"
    print("dsc matches eager")


if __name__ == "__main__":
    main()
