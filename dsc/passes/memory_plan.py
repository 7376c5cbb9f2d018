"""memory_plan: decide when each activation buffer dies, and how many bytes are live at the peak.

Matches: every graph (an analysis pass; the graph is not rewritten).

Before:   %a = op(...); %b = op(%a); %c = op(%b)          (buffers live until the program ends)
After:    the same nodes, with meta["dsc_free"] on each node listing the buffers whose last use it
          is: %b frees %a, %c frees %b. Lowering writes the lists into the Plan's steps, so the
          runtime releases each activation right after its last reader and the allocator reuses
          the memory for the next one.

Peak activation bytes are computed for the entry point's largest shapes (batch = max_batch;
sequence = max_seq_len for prefill and forward, 1 for decode) and reported in the Plan
(`plan.model["peak_activation_bytes"]`). Weights, inputs and the KV cache are not activations.
Ordering: last, after every pass that adds or removes nodes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext

__all__ = ["memory_plan", "peak_activation_bytes"]


def _sizes(gm: fx.GraphModule, batch: int, seq: int) -> dict:
    """Symbol -> value for the batch and sequence dimensions of the user inputs."""
    subs = {}
    for node in gm.graph.nodes:
        if node.meta.get("dsc_input") in ("input_ids", "attention_mask", "position_ids"):
            for dim, value in zip(node.meta["val"].shape, (batch, seq)):
                if isinstance(dim, torch.SymInt):
                    subs[dim.node.expr] = value
    return subs


def _nbytes(val, subs: dict, memo: dict) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    count = 1
    for dim in val.shape:
        if isinstance(dim, torch.SymInt):
            expr = dim.node.expr
            if expr not in memo:  # a graph has few distinct sizes; sympy substitution is slow
                value = expr.xreplace(subs)
                # A size not derived from the inputs' batch or length: its traced example
                # value, or for a data-dependent size (how many tokens an expert got) without
                # one, the most the inputs allow it: every token of the step.
                memo[expr] = (int(value) if isinstance(value, int) or value.is_number
                              else _example_or_tokens(dim, subs))
            count *= memo[expr]
        else:
            count *= int(dim)
    return count * val.element_size()


def _example_or_tokens(dim: torch.SymInt, subs: dict) -> int:
    if dim.node.hint is not None:
        return int(dim.node.hint)
    tokens = 1
    for value in subs.values():
        tokens *= int(value)
    return tokens


def _last_uses(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    last: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for used in node.all_input_nodes:
            last[used] = node
    dying: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last.items():
        if value.op == "call_function" and user.op != "output":
            dying.setdefault(user, []).append(value)
    return dying


def peak_activation_bytes(gm: fx.GraphModule, batch: int, seq: int) -> int:
    """Largest sum of live activation bytes over the program, at the given batch and length.

    Views share storage with their base but are counted as their own buffers: an upper bound.
    """
    subs = _sizes(gm, batch, seq)
    memo: dict = {}
    dying = _last_uses(gm)
    live = peak = 0
    for node in gm.graph.nodes:
        if node.op == "call_function":
            live += _nbytes(node.meta.get("val"), subs, memo)
            peak = max(peak, live)
            for value in dying.get(node, []):
                live -= _nbytes(value.meta.get("val"), subs, memo)
    return peak


@register("memory_plan")
def memory_plan(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    dying = _last_uses(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.meta["dsc_free"] = [v.name for v in dying.get(node, [])]
    cached = any(n.meta.get("dsc_input") == "cache_start" for n in gm.graph.nodes)
    target = ctx.target
    peaks = ctx.notes.setdefault("peak_activation_bytes", {})
    if cached:
        peaks["prefill"] = peak_activation_bytes(gm, target.max_batch, target.max_seq_len)
        peaks["decode"] = peak_activation_bytes(gm, target.max_batch, 1)
    else:
        peaks["forward"] = peak_activation_bytes(gm, target.max_batch, target.max_seq_len)
    return gm
