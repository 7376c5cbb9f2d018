"""canonicalize: remove ops that do nothing at inference, so patterns see one spelling.

Matches:   alias(x), detach(x), dropout(x, p, train=False),
           _to_copy(x, dtype=x.dtype) with no other argument,
           slice(x, dim, 0, end, 1) whose result has x's shape (`x[:, :, None]` on some tracing
           paths spells each `:` so; repeat_kv then hides the GQA key it expands),
           clone(x) whose result has x's strides, of a computed x, neither mutated nor a graph
           output (eval-mode dropout traces to it: GPT-2 and OPT have one after each
           projection, and it stood between the GEMM and the residual add its epilogue takes)
Rewrite to: x

Does not match: clone(x) that changes the layout (`x.t().contiguous()`: a later view relies on
the copy's strides), of a graph input, or with a mutated input or result; a cast that changes
dtype or device; a slice that drops elements or steps.
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
    if is_op(node, aten.slice):
        return _is_whole_slice(node)
    if is_op(node, aten.clone):
        return _is_redundant_clone(node)
    return False


def _is_redundant_clone(node: fx.Node) -> bool:
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_function":
        return False  # a copy of an input or weight keeps callers from aliasing it
    a, b = tensor_meta(src), tensor_meta(node)
    if a is None or b is None or [str(s) for s in a.stride()] != [str(s) for s in b.stride()]:
        return False
    users = [*src.users, *node.users]
    return not any(u.op == "output" or _mutates(u) for u in users)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _is_whole_slice(node: fx.Node) -> bool:
    start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start", 0)
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    src, out = tensor_meta(node.args[0]), tensor_meta(node)
    if start not in (0, None) or step != 1 or src is None or out is None:
        return False
    # Sizes compared as expressions: symbolic sizes are equal only when they are the same symbol.
    return [str(d) for d in src.shape] == [str(d) for d in out.shape]


@register("canonicalize")
def canonicalize(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    return gm
