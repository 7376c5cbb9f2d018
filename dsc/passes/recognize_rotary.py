"""recognize_rotary: the rotate-half rotary embedding becomes one `dsc::rotary` node.

Matches (either operand order of each mul and of the add):

    half = D // 2
    rot  = cat([neg(slice(x, -1, half, end)), slice(x, -1, 0, half)], -1)
    out  = add(mul(x, cos), mul(rot, sin))

Matches, with tables of half the width (GPT-OSS; the halves from split or slices):

    x1, x2 = split(x, D // 2, -1)
    out  = cat([sub(mul(x1, cos), mul(x2, sin)), add(mul(x2, cos), mul(x1, sin))], -1)

Rewrite to:

    out = dsc.rotary(x, cos, sin)
    out = dsc.rotary(x, cat([cos, cos], -1), cat([sin, sin], -1))     # half tables, made once

Does not match: halves taken in the other order (that is a rotation by -θ), slices that do not
split the last dimension in two equal halves, a partial rotary whose slices cover part of D.
Ordering: before kv_cache, so the cached graph rotates new keys before they are written.
"""

from __future__ import annotations

import operator

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


def _halves(first: fx.Node, second: fx.Node) -> fx.Node | None:
    """x when first and second are x's two halves along the last dim (split or slices)."""
    if is_op(first, operator.getitem) and is_op(second, operator.getitem):
        split = first.args[0]
        if (split is not second.args[0] or not is_op(split, aten.split)
                or (first.args[1], second.args[1]) != (0, 1)):
            return None
        x = split.args[0]
        val = tensor_meta(x)
        dim = split.args[2] if len(split.args) > 2 else 0
        if (val is None or dim not in (-1, val.dim() - 1) or not isinstance(val.shape[-1], int)
                or val.shape[-1] % 2 or split.args[1] != val.shape[-1] // 2):
            return None
        return x
    x = first.args[0] if is_op(first, aten.slice) else None
    val = tensor_meta(x) if x is not None else None
    if val is None or not isinstance(val.shape[-1], int) or val.shape[-1] % 2:
        return None
    size = val.shape[-1]
    if _half_slice(first, x, size, True) and _half_slice(second, x, size, False):
        return x
    return None


def _products(node: fx.Node, op) -> list[tuple[fx.Node, fx.Node]] | None:
    """The two mul operand pairs of op(mul(a, b), mul(c, d)), else None."""
    if not is_op(node, op) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    pairs = [_split_mul(a) if isinstance(a, fx.Node) else None for a in node.args]
    return None if None in pairs else pairs


def _match_half_tables(cat: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) of cat([x1 cos - x2 sin, x2 cos + x1 sin], -1), the tables [.., D/2]."""
    if not is_op(cat, aten.cat) or len(cat.args[0]) != 2:
        return None
    first, second = (_products(n, op) for n, op in zip(cat.args[0], (aten.sub, aten.add)))
    if first is None or second is None:
        return None
    for (a, cos), (b, sin) in ((p, q) for p in _orders(first[0]) for q in _orders(first[1])):
        x = _halves(a, b)
        val = tensor_meta(x) if x is not None else None
        dim = cat.args[1] if len(cat.args) > 1 else 0
        if val is None or dim not in (-1, val.dim() - 1):
            continue
        # The second half: x2 * cos + x1 * sin, in either order of the add and of each mul.
        wanted = {frozenset((b, cos)), frozenset((a, sin))}
        if {frozenset(pair) for pair in second} == wanted:
            return x, cos, sin
    return None


def _orders(pair: tuple[fx.Node, fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    return [pair, pair[::-1]]


def _doubled(gm: fx.GraphModule, table: fx.Node, made: dict[fx.Node, fx.Node]) -> fx.Node:
    """cat([table, table], -1), made once per table (q and k share it)."""
    if table not in made:
        with gm.graph.inserting_after(table):
            made[table] = call(gm.graph, aten.cat.default, ([table, table], -1), like=table)
    return made[table]


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
    doubled: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        found = _match(node) if node.op == "call_function" else None
        if found is None and node.op == "call_function":
            found = _match_half_tables(node)
            if found is not None:
                x, cos, sin = found
                found = x, _doubled(gm, cos, doubled), _doubled(gm, sin, doubled)
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
