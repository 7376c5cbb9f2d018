"""merge_all_reduces: two row-parallel sums added together become one sum of the added parts.

A block with routed and shared experts (Qwen2-MoE, GLM-4.5, DeepSeek-V3) ends, at tp > 1, in
two all-reduces whose results are added; a sum is linear, so adding the rank's partial results
first and reducing once gives the same value with one collective instead of two.

Matches (operands of the add in either order):

    a = dsc.all_reduce(p)          (read by the add alone, or by a view read by it alone)
    b = dsc.all_reduce(q)          (read by the add alone; q of p's shape)
    s = add(a, b)                  (aten.add or dsc.residual_add)

Rewrite to (a view between a sum and the add is applied to the part instead: a view of a sum
is the sum of the views):

    s = dsc.all_reduce(add(p, q))

Does not match: a sum read by anything else too, partial results of different shapes
(broadcasting would add a rank's part more than once), an add with a scale (alpha).
Ordering: after tensor_parallel (which inserts the all_reduces), before fuse_all_reduce_norm and
fuse_all_reduce_residual (so the merged sum can take the residual add after it).
"""

from __future__ import annotations

import torch
from torch import fx

import dsc.ops.collectives  # noqa: F401  (registers dsc::all_reduce)
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, tensor_meta

__all__ = ["merge_all_reduces"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view)


def _reduced(operand) -> tuple[fx.Node, list[fx.Node]] | None:
    """(all_reduce, the views after it) when operand is all_reduce(p) or a chain of views of
    it, each read by the next alone; else None."""
    views = []
    node = operand
    while is_op(node, *_VIEWS) and len(node.users) == 1:
        views.append(node)
        node = node.args[0]
    if not is_op(node, dsc_ops.all_reduce) or len(node.users) != 1:
        return None
    return node, views[::-1]


def _sums(add: fx.Node):
    """The add's two reduced operands ((all_reduce, views) each), of one shape; else None."""
    if not is_op(add, aten.add, dsc_ops.residual_add) or len(add.args) != 2:
        return None
    if add.kwargs.get("alpha", 1) != 1:
        return None
    found = [_reduced(a) for a in add.args]
    if None in found or found[0][0] is found[1][0]:
        return None
    a, b = add.args
    if tuple(tensor_meta(a).shape) != tuple(tensor_meta(b).shape):
        return None
    return found


def _partial(graph: fx.Graph, reduced: fx.Node, views: list[fx.Node]) -> fx.Node:
    """The rank's part behind the sum, with the sum's views applied to it instead."""
    node = reduced.args[0]
    for view in views:
        node = call(graph, view.target, (node, *view.args[1:]), dict(view.kwargs), like=view)
    return node


@register("merge_all_reduces")
def merge_all_reduces(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    for add in list(graph.nodes):
        if (sums := _sums(add)) is None:
            continue
        with graph.inserting_before(add):
            parts = [_partial(graph, reduced, views) for reduced, views in sums]
            added = call(graph, add.target, tuple(parts), like=add)
            merged = call(graph, dsc_ops.all_reduce.default, (added,), like=add)
        add.replace_all_uses_with(merged)
        graph.erase_node(add)
        for reduced, views in sums:
            for node in [*views[::-1], reduced]:
                graph.erase_node(node)
    return gm
