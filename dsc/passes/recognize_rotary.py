"""recognize_rotary: the rotate-half rotary embedding becomes one `dsc::rotary` node.

Matches (either operand order of each mul and of the add):

    half = D // 2
    rot  = cat([neg(slice(x, -1, half, end)), slice(x, -1, 0, half)], -1)
    out  = add(mul(x, cos), mul(rot, sin))

Rewrite to:

    out = dsc.rotary(x, cos, sin)

Does not match: halves taken in the other order (that is a rotation by -θ), slices that do not
split the last dimension in two equal halves, a partial rotary whose slices cover part of D.
Ordering: before kv_cache, so the cached graph rotates new keys before they are written.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, replace_with, tensor_meta

__all__ = ["recognize_rotary"]

aten = torch.ops.aten
_END = 2**63 - 1


def _half_slice(node: fx.Node, x: fx.Node, dim_size: int, first: bool) -> bool:
    """node is slice(x, last dim, 0, D/2) when first, else slice(x, last dim, D/2, end)."""
    if not is_op(node, aten.slice) or node.args[0] is not x:
        return False
    rank = tensor_meta(x).dim()
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else _END
    if dim not in (-1, rank - 1):
        return False
    half = dim_size // 2
    if first:
        return start in (0, None) and end == half
    return start == half and end in (_END, dim_size, None)


def _rotate_half_of(node: fx.Node) -> fx.Node | None:
    """x when node is rotate_half(x) = cat([-x2, x1], -1)."""
    if not is_op(node, aten.cat) or len(node.args[0]) != 2:
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    neg, first = node.args[0]
    if not is_op(neg, aten.neg):
        return None
    second = neg.args[0]
    if not is_op(second, aten.slice) or not is_op(first, aten.slice):
        return None
    x = first.args[0]
    val = tensor_meta(x)
    if val is None or dim not in (-1, val.dim() - 1) or not isinstance(val.shape[-1], int):
        return None
    size = val.shape[-1]
    if size % 2 or not _half_slice(first, x, size, True) or not _half_slice(second, x, size, False):
        return None
    return x


def _split_mul(mul: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if not is_op(mul, aten.mul) or len(mul.args) != 2:
        return None
    a, b = mul.args
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    return a, b


def _match(add: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    if not is_op(add, aten.add) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    for plain, rotated in (add.args, add.args[::-1]):
        p = _split_mul(plain) if isinstance(plain, fx.Node) else None
        r = _split_mul(rotated) if isinstance(rotated, fx.Node) else None
        if p is None or r is None:
            continue
        for rot, sin in (r, r[::-1]):
            x = _rotate_half_of(rot)
            if x is None:
                continue
            for xx, cos in (p, p[::-1]):
                if xx is x:
                    return x, cos, sin
    return None


@register("recognize_rotary")
def recognize_rotary(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        found = _match(node) if node.op == "call_function" else None
        if found is None:
            continue
        x, cos, sin = found
        with gm.graph.inserting_after(node):
            new = call(gm.graph, torch.ops.dsc.rotary.default, (x, cos, sin), like=node)
        if tensor_meta(new).shape != tensor_meta(node).shape:
            gm.graph.erase_node(new)
            continue
        replace_with(node, new)
    gm.graph.eliminate_dead_code()
    return gm
