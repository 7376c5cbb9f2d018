"""PassManager: runs a pipeline of named passes, verifies the graph after each, keeps history."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from dsc.errors import DscError
from dsc.passes import PASSES
from dsc.passes.context import PassContext

__all__ = ["PassRecord", "PassManager", "verify_graph", "op_counts", "InvariantError"]


class InvariantError(DscError):
    """A pass left the graph in a state the invariants (passes/README.md) forbid."""


def _op_key(node: fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__name__", str(target))
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._opname}"
        return name
    return node.op


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    return dict(Counter(_op_key(n) for n in gm.graph.nodes))


@dataclass
class PassRecord:
    """One pass's effect: the graph after it, its node counts, what it added and removed."""

    name: str
    program: str
    seconds: float
    counts: dict[str, int]
    graph: str
    added: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    new_nodes: list[str] = field(default_factory=list)
    node_names: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"+{v} {k}" for k, v in sorted(self.added.items())]
        parts += [f"-{v} {k}" for k, v in sorted(self.removed.items())]
        return ", ".join(parts) if parts else "no change"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def verify_graph(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Check the invariants of passes/README.md; raise InvariantError naming the broken one."""
    try:
        gm.graph.lint()
    except Exception as exc:
        raise InvariantError(f"graph lint failed: {exc}") from exc
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise InvariantError(f"graph must have exactly one output node, has {len(outputs)}")
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_function") and "val" not in node.meta:
            raise InvariantError(f"node {node.name} ({node.target}) has no meta['val']")
        if node.op == "placeholder":
            name = node.meta.get("dsc_weight")
            if name is not None and name not in ctx.weights:
                raise InvariantError(f"placeholder {node.name} names weight {name!r}, not held")
            if name is None and "dsc_input" not in node.meta:
                raise InvariantError(f"placeholder {node.name} is neither a weight nor an input")
        if node.op in ("call_module", "get_attr", "call_method"):
            raise InvariantError(f"node {node.name}: op kind {node.op} is not allowed; use call_function")


class PassManager:
    """Runs passes by name over a graph; each run appends PassRecords to `history`."""

    def __init__(self, ctx: PassContext, history: list[PassRecord] | None = None):
        self.ctx = ctx
        self.history: list[PassRecord] = [] if history is None else history

    def record(self, name: str, program: str, gm: fx.GraphModule, seconds: float) -> None:
        counts = op_counts(gm)
        # A program's first pass is compared with the last record of the program it forked from.
        before = next((r for r in reversed(self.history) if r.program == program), None)
        if before is None and self.history:
            before = self.history[-1]
        old = Counter(before.counts) if before else Counter()
        new = Counter(counts)
        names_before = set(before.node_names) if before else set()
        names_now = [n.name for n in gm.graph.nodes]
        rec = PassRecord(
            name=name,
            program=program,
            seconds=seconds,
            counts=counts,
            graph=str(gm.graph),
            added=dict(new - old),
            removed=dict(old - new),
            new_nodes=[n for n in names_now if before is not None and n not in names_before],
            node_names=names_now,
        )
        self.history.append(rec)

    def run(self, gm: fx.GraphModule, names: list[str], program: str = "forward") -> fx.GraphModule:
        for name in names:
            if name not in PASSES:
                raise KeyError(f"unknown pass {name!r}; registered: {sorted(PASSES)}")
            start = time.perf_counter()
            gm = PASSES[name](gm, self.ctx)
            gm.graph.eliminate_dead_code()
            gm.recompile()
            seconds = time.perf_counter() - start
            try:
                verify_graph(gm, self.ctx)
            except InvariantError as exc:
                raise InvariantError(f"after pass {name!r}: {exc}") from exc
            self.record(name, program, gm, seconds)
        return gm
