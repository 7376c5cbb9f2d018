"""Save a plan, load it in a fresh process that never imports transformers, compare outputs.

python examples/save_and_load.py [--model tiny-llama] [--plan DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

import dsc
from dsc import zoo

warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)

# Runs in the fresh process: dsc.load needs neither transformers nor the model's code.
CHILD = """
import sys, torch, dsc
from safetensors.torch import save_file
plan, out = sys.argv[1], sys.argv[2]
model = dsc.load(plan)
ids = torch.tensor([[5, 6, 7, 8, 9]])
tokens = model.generate(ids, max_new_tokens=10, eos_token_id=[])
save_file({"logits": model(ids).logits, "tokens": tokens}, out)
assert "transformers" not in sys.modules, "loading a plan imported transformers"
print("child: loaded", plan, "without transformers")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", choices=zoo.names())
    parser.add_argument("--plan", help="where to save the plan (default: a temporary folder)")
    args = parser.parse_args()

    compiled = dsc.compile(
        zoo.build(args.model, init_std=0.3), target=dsc.Target(max_batch=1, max_seq_len=32)
    )
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(args.plan or Path(tmp) / "plan")
        compiled.save(plan)
        print("saved:", sorted(p.name for p in plan.iterdir()))
        out = Path(tmp) / "child.safetensors"
        subprocess.run([sys.executable, "-c", CHILD, str(plan), str(out)], check=True)
        child = load_file(str(out))

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    tokens = compiled.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(child["tokens"], tokens), "generated tokens differ after a reload"
    assert torch.equal(child["logits"], compiled(ids).logits), "logits differ after a reload"
    print("reloaded plan gives identical logits and tokens:", tokens[0, 5:].tolist())


if __name__ == "__main__":
    main()
