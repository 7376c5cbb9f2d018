"""recognize_layer_norm: LayerNorm over the last dimension becomes one `dsc::layer_norm` node.

Matches, form 1 (what export keeps of F.layer_norm / nn.LayerNorm):

    out = layer_norm(x, [H], weight, bias, eps)           # weight, bias may be None

Matches, form 2 (written out by hand; the casts, weight and bias are optional):

    x32 = _to_copy(x, dtype=float32)
    d   = sub(x32, mean(x32, [-1], keepdim=True))
    var = mean(pow(d, 2), [-1], keepdim=True)          # or mean(mul(d, d)), var(x32, correction=0)
    y   = mul(d, rsqrt(add(var, eps)))                 # or div(d, sqrt(add(var, eps)))
    out = add(mul(weight, _to_copy(y, dtype=x.dtype)), bias)

Rewrite to:

    out = dsc.layer_norm(x, weight, bias, eps)

Does not match: a normalised shape of more than the last dimension, statistics over another
dimension, the unbiased variance (correction=1), an epsilon that is a tensor, an output dtype or a
weight/bias dtype that differs from x's (dsc.layer_norm keeps x's dtype).
Ordering: after canonicalize; before recognize_residual (which looks for norms to find the stream)
and before any pass that fuses the norm into the next GEMM.
"""

from __future__ import annotations

import torch
from torch import fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, only_user, tensor_meta

__all__ = ["recognize_layer_norm"]

aten = torch.ops.aten

_DEFAULT_EPS = 1e-5  # aten.layer_norm's default, used when export leaves eps out


def _strip_cast(node: fx.Node) -> fx.Node:
    """x when node is `_to_copy(x, dtype=...)` with no other effect, else node itself."""
    if is_op(node, aten._to_copy) and set(node.kwargs) <= {"dtype"} and len(node.args) == 1:
        return node.args[0]
    return node


def _last_dim(node: fx.Node, dims) -> bool:
    """True when `dims` names only the last dimension of `node`'s input."""
    val = tensor_meta(node.args[0])
    if val is None or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return False
    return dims[0] in (-1, val.dim() - 1)


def _keepdim(node: fx.Node, position: int) -> bool:
    return bool(
        node.kwargs.get("keepdim", node.args[position] if len(node.args) > position else False)
    )


def _is_last_mean(node, src: fx.Node | None = None) -> bool:
    """`mean(src, [-1], keepdim=True)` (any src when src is None)."""
    if not is_op(node, aten.mean) or len(node.args) < 2:
        return False
    if src is not None and node.args[0] is not src:
        return False
    return _last_dim(node, node.args[1]) and _keepdim(node, 2)


def _is_square_of(node, d: fx.Node) -> bool:
    if is_op(node, aten.pow) and node.args[0] is d and node.args[1] == 2:
        return True
    return is_op(node, aten.mul) and node.args[0] is d and node.args[1] is d


def _is_biased_var(node, x32: fx.Node) -> bool:
    """`var(x32, [-1], correction=0, keepdim=True)` (var.dim spells it unbiased=False)."""
    if not is_op(node, aten.var) or node.args[0] is not x32 or len(node.args) < 2:
        return False
    if not _last_dim(node, node.args[1]):
        return False
    if node.target is aten.var.dim:
        unbiased = node.kwargs.get("unbiased", node.args[2] if len(node.args) > 2 else True)
        return unbiased is False and _keepdim(node, 3)
    return node.kwargs.get("correction", 1) == 0 and node.kwargs.get("keepdim", False) is True


def _centered(var: fx.Node) -> fx.Node | None:
    """d = sub(x32, mean(x32)) that the variance `var` is computed from, or None."""
    square = var.args[0] if _is_last_mean(var) else None
    if isinstance(square, fx.Node) and square.args and _is_square_of(square, square.args[0]):
        d = square.args[0]
    elif is_op(var, aten.var):
        x32 = var.args[0]
        d = next((u for u in x32.users if is_op(u, aten.sub) and u.args[0] is x32), None)
        if d is None or not _is_biased_var(var, x32):
            return None
    else:
        return None
    if not is_op(d, aten.sub) or len(d.args) != 2 or d.kwargs.get("alpha", 1) != 1:
        return None
    return d if _is_last_mean(d.args[1], d.args[0]) else None


def _affine(last: fx.Node, op, size: int) -> tuple[fx.Node | None, fx.Node]:
    """(p, node) when `last`'s only user is op(last, p) with p a 1-D [size] tensor; else (None, last)."""
    user = only_user(last)
    if not is_op(user, op) or len(user.args) != 2 or user.kwargs.get("alpha", 1) != 1:
        return None, last
    other = user.args[0] if user.args[1] is last else user.args[1]
    val = tensor_meta(other)
    if val is None or val.dim() != 1 or val.shape[0] != size:
        return None, last
    return other, user


def _match_decomposed(add_eps: fx.Node):
    """(x, weight, bias, eps, last node) of a written-out LayerNorm around `add(var, eps)`."""
    if not is_op(add_eps, aten.add) or not isinstance(add_eps.args[1], (int, float)):
        return None
    d = _centered(add_eps.args[0])
    if d is None:
        return None
    inv = only_user(add_eps)
    y = only_user(inv) if inv is not None else None
    by_rsqrt = is_op(inv, aten.rsqrt) and is_op(y, aten.mul) and set(y.args) == {d, inv}
    by_sqrt = is_op(inv, aten.sqrt) and is_op(y, aten.div) and y.args == (d, inv)
    if not (by_rsqrt or by_sqrt):
        return None
    x = _strip_cast(d.args[0])
    x_val = tensor_meta(x)
    if x_val is None:
        return None
    last = y
    cast = only_user(last)
    if cast is not None and _strip_cast(cast) is last:
        last = cast
    size = x_val.shape[-1]
    weight, last = _affine(last, aten.mul, size)
    bias, last = _affine(last, aten.add, size)
    return x, weight, bias, float(add_eps.args[1]), last


def _match_aten(node: fx.Node):
    """(x, weight, bias, eps, node) of aten.layer_norm over the last dimension."""
    if not is_op(node, aten.layer_norm):
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    x, shape, weight, bias, eps = args[:5]
    weight = node.kwargs.get("weight", weight)
    bias = node.kwargs.get("bias", bias)
    eps = node.kwargs.get("eps", _DEFAULT_EPS if eps is None else eps)
    x_val = tensor_meta(x)
    if x_val is None or list(shape) != [x_val.shape[-1]] or not isinstance(eps, (int, float)):
        return None
    return x, weight, bias, float(eps), node


def _dtypes_agree(x: fx.Node, weight, bias, last: fx.Node) -> bool:
    """dsc.layer_norm returns x's dtype; rewrite only when the original did, with like params."""
    dtype = tensor_meta(x).dtype
    params = [tensor_meta(p) for p in (weight, bias) if p is not None]
    out = tensor_meta(last)
    return (
        out is not None
        and out.dtype == dtype
        and all(p is not None and p.dtype == dtype for p in params)
    )


@register("recognize_layer_norm")
def recognize_layer_norm(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        found = _match_aten(node) or _match_decomposed(node)
        if found is None:
            continue
        x, weight, bias, eps, last = found
        if not _dtypes_agree(x, weight, bias, last):
            continue
        with gm.graph.inserting_after(last):
            new = call(
                gm.graph, torch.ops.dsc.layer_norm.default, (x, weight, bias, eps), like=last
            )
        last.replace_all_uses_with(new)
    gm.graph.eliminate_dead_code()
    return gm
