"""Look inside a compile: the pass history, one graph before and after a pass, the HTML report.

python examples/inspect_passes.py [--model tiny-llama] [--html passes.html]
"""

from __future__ import annotations

import argparse
import warnings

import dsc
from dsc import zoo

warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", choices=zoo.names())
    parser.add_argument("--html", default="passes.html")
    args = parser.parse_args()

    compiled = dsc.compile(zoo.build(args.model), target="cpu")

    # Every pass left a record: its name, the program it ran on, node counts, the graph after it.
    print("history:")
    for i, rec in enumerate(compiled.history):
        dsc_ops = {k: v for k, v in rec.counts.items() if k.startswith("dsc.")}
        print(
            f"  {i:2d} [{rec.program}] {rec.name:<22} {sum(rec.counts.values()):4d} nodes  {dsc_ops}"
        )

    # The graph text after one pass, trimmed to the nodes that pass made.
    rec = next(r for r in compiled.history if r.name == "recognize_attention")
    made = set(rec.new_nodes)
    lines = [ln for ln in rec.graph.splitlines() if ln.strip().split(" ")[0].lstrip("%") in made]
    print(f"\nnodes made by {rec.name} ({rec.program}):")
    for line in lines:
        print("  " + line.strip()[:140])

    print("\n" + compiled.report())
    print(f"\nHTML report: {compiled.visualize(args.html)}")


if __name__ == "__main__":
    main()
