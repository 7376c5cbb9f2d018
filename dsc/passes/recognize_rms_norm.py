"""recognize_rms_norm: the RMSNorm subgraph becomes one `dsc::rms_norm` node.

Matches (the cast nodes are optional; `weight *` may be on either side or absent):

    x32  = _to_copy(x, dtype=float32)
    var  = mean(pow(x32, 2), [-1], keepdim=True)
    y    = mul(x32, rsqrt(add(var, eps)))
    out  = mul(weight, _to_copy(y, dtype=x.dtype))

Rewrite to:

    out = dsc.rms_norm(x, weight, eps, out_dtype)

Does not match: a mean over another dimension, a variance that subtracts the mean (LayerNorm), an
epsilon that is a tensor. Ordering: runs before `fuse`, which folds the norm into the next GEMM.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, replace_with, only_user, tensor_meta

__all__ = ["recognize_rms_norm"]

aten = torch.ops.aten


def _strip_cast(node: fx.Node) -> fx.Node:
    """x when node is `_to_copy(x, dtype=...)` with no other effect, else node itself."""
    if is_op(node, aten._to_copy) and set(node.kwargs) <= {"dtype"} and len(node.args) == 1:
        return node.args[0]
    return node


def _match(rsqrt: fx.Node) -> tuple[fx.Node, fx.Node | None, float, fx.Node] | None:
    """(x, weight, eps, last node) of the RMSNorm around `rsqrt`, or None."""
    add = rsqrt.args[0]
    if not is_op(add, aten.add) or not isinstance(add.args[1], (int, float)):
        return None
    eps = float(add.args[1])
    mean = add.args[0]
    if not is_op(mean, aten.mean) or list(mean.args[1]) not in ([-1],) or mean.args[2:3] != (True,):
        if not (is_op(mean, aten.mean) and mean.kwargs.get("keepdim")):
            return None
    pow_ = mean.args[0]
    if not is_op(pow_, aten.pow) or pow_.args[1] != 2:
        return None
    x32 = pow_.args[0]
    scale = only_user(rsqrt)
    if not is_op(scale, aten.mul) or set(scale.args) != {x32, rsqrt}:
        return None
    x = _strip_cast(x32)
    last = scale
    cast = only_user(last)
    if cast is not None and _strip_cast(cast) is last:
        last = cast
    weight = None
    mul = only_user(last)
    if is_op(mul, aten.mul) and len(mul.args) == 2:
        other = mul.args[0] if mul.args[1] is last else mul.args[1]
        other_val = tensor_meta(other)
        x_val = tensor_meta(x)
        if other_val is not None and x_val is not None and other_val.dim() == 1 and (
            other_val.shape[0] == x_val.shape[-1]
        ):
            weight, last = other, mul
    return x, weight, eps, last


@register("recognize_rms_norm")
def recognize_rms_norm(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.rsqrt):
            continue
        found = _match(node)
        if found is None:
            continue
        x, weight, eps, last = found
        with gm.graph.inserting_after(last):
            new = call(
                gm.graph, torch.ops.dsc.rms_norm.default,
                (x, weight, eps, tensor_meta(last).dtype), like=last,
            )
        replace_with(last, new)
    gm.graph.eliminate_dead_code()
    return gm
