"""canonicalize: remove ops that do nothing at inference, so patterns see one spelling.

Matches:   alias(x), detach(x), dropout(x, p, train=False),
           _to_copy(x, dtype=x.dtype) with no other argument
Rewrite to: x

Does not match: clone(x) — a later view may rely on the copy being contiguous; a cast that
changes dtype or device.
Ordering: first in every pipeline.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import is_op, tensor_meta

__all__ = ["canonicalize"]

aten = torch.ops.aten


def _is_noop(node: fx.Node) -> bool:
    if is_op(node, aten.alias, aten.detach, aten.lift_fresh_copy):
        return True
    if is_op(node, aten.dropout):
        return node.args[2:3] == (False,) or node.kwargs.get("train") is False
    if is_op(node, aten._to_copy) and set(node.kwargs) <= {"dtype"}:
        src, out = tensor_meta(node.args[0]), tensor_meta(node)
        return src is not None and out is not None and src.dtype == out.dtype
    return False


@register("canonicalize")
def canonicalize(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    return gm
