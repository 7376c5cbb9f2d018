"""recognize_mlp: MLP activations become `dsc::activation`; gated ones `dsc::gated_activation`.

Matches, activations (the rules in `_DIRECT` and `_WRITTEN_OUT`):

    silu(x) | gelu(x) | gelu(x, approximate="tanh") | relu(x)
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))     # GPT-2's gelu_new
    0.5 * x * (1 + erf(x / sqrt(2)))
    x * sigmoid(x)

Written-out forms are recognised by their value, not their spelling: the argument of tanh / erf /
sigmoid and the expression around it are read as polynomials in x (and in the tanh), and their
coefficients must equal the formula's within 1e-6, so `x*0.5*(1+t)` and `0.5*(x + x*t)` both match.

Matches, gated (after the activations are rewritten):

    mul(activation(a, kind), b)      where a and b are projections of one input:
        a = linear(h, w_gate), b = linear(h, w_up)                  (views and bias allowed), or
        a, b = split(linear(h, w_gate_up), F, -1)                   (fused gate_up; or two slices)

Rewrite to:

    dsc.activation(x, kind)
    dsc.gated_activation(a, b, kind)

Does not match: act(a) * b where b is not a projection of a's input (a residual, another layer's
output, a projection of another tensor); a split into other than two equal halves of the last
dimension; a written-out formula whose constants are off by more than 1e-6.
Ordering: after canonicalize; after recognize_moe (so the experts inside an MoE block stay one
pattern); before any pass that fuses the activation into the GEMM around it.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, tensor_meta

__all__ = ["recognize_mlp"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc

_TOL = 1e-6  # how far a written-out constant may be from the formula's
_MAX_DEPTH = 8  # arithmetic trees of an activation are shallow; deeper means something else

# op -> kind, for activations export keeps as one aten op (gelu is looked at separately).
_DIRECT = {
    aten.silu: "silu",  # silu(x) -> activation(x, "silu")
    aten.relu: "relu",  # relu(x) -> activation(x, "relu")
}

_GELU_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}

_S = math.sqrt(2 / math.pi)

# (anchor op, its argument as a polynomial in x, the output as a polynomial in (x, anchor), kind)
_WRITTEN_OUT = [
    # 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3))) -> gelu_tanh
    (aten.tanh, {(1,): _S, (3,): _S * 0.044715}, {(1, 0): 0.5, (1, 1): 0.5}, "gelu_tanh"),
    # 0.5*x*(1 + erf(x/sqrt(2))) -> gelu
    (aten.erf, {(1,): 1 / math.sqrt(2)}, {(1, 0): 0.5, (1, 1): 0.5}, "gelu"),
    # x*sigmoid(x) -> silu
    (aten.sigmoid, {(1,): 1.0}, {(1, 1): 1.0}, "silu"),
]

_ARITH = (aten.add, aten.sub, aten.mul, aten.div, aten.pow)
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.clone, aten.alias)
_PROJECTIONS = {  # op -> position of the activation input
    aten.linear: 0,
    aten.addmm: 1,
    aten.mm: 0,
    aten.matmul: 0,
    aten.bmm: 0,
}

Poly = dict[tuple[int, ...], float]


def _poly_mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ka, va in a.items():
        for kb, vb in b.items():
            key = tuple(i + j for i, j in zip(ka, kb))
            out[key] = out.get(key, 0.0) + va * vb
    return out


def _poly_add(a: Poly, b: Poly, sign: float = 1.0) -> Poly:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + sign * v
    return out


def _poly(node, leaves: list[fx.Node], depth: int = 0) -> Poly | None:
    """`node` as a polynomial in `leaves` when it is add/sub/mul/div-by-scalar/pow of them."""
    zero = (0,) * len(leaves)
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return {zero: float(node)}
    if node in leaves:
        return {tuple(int(leaf is node) for leaf in leaves): 1.0}
    if depth > _MAX_DEPTH or not is_op(node, *_ARITH) or node.kwargs.get("alpha", 1) != 1:
        return None
    a = _poly(node.args[0], leaves, depth + 1)
    if a is None:
        return None
    other = node.args[1]
    if is_op(node, aten.pow):
        if not isinstance(other, (int, float)) or other != int(other) or not 0 < other <= 4:
            return None
        out = a
        for _ in range(int(other) - 1):
            out = _poly_mul(out, a)
        return out
    if is_op(node, aten.div):
        if not isinstance(other, (int, float)) or other == 0:
            return None
        return {k: v / other for k, v in a.items()}
    b = _poly(other, leaves, depth + 1)
    if b is None:
        return None
    if is_op(node, aten.mul):
        return _poly_mul(a, b)
    return _poly_add(a, b, -1.0 if is_op(node, aten.sub) else 1.0)


def _same_poly(got: Poly | None, want: Poly) -> bool:
    if got is None:
        return False
    keys = {k for k, v in got.items() if abs(v) > _TOL} | set(want)
    return all(abs(got.get(k, 0.0) - want.get(k, 0.0)) <= _TOL for k in keys)


def _arith_leaves(node, depth: int = 0) -> set[fx.Node]:
    """The tensors an arithmetic tree reads (scalars aside); a non-arithmetic node is its own."""
    if not isinstance(node, fx.Node):
        return set()
    if depth > _MAX_DEPTH or not is_op(node, *_ARITH):
        return {node}
    out: set[fx.Node] = set()
    for arg in node.args:
        out |= _arith_leaves(arg, depth + 1)
    return out


def _match_written_out(anchor: fx.Node) -> tuple[fx.Node, str, fx.Node] | None:
    """(x, kind, last node) of a written-out activation around `anchor` (a tanh/erf/sigmoid)."""
    for op, arg_poly, out_poly, kind in _WRITTEN_OUT:
        if not is_op(anchor, op):
            continue
        leaves = _arith_leaves(anchor.args[0])
        if len(leaves) != 1:
            return None
        (x,) = leaves
        if not _same_poly(_poly(anchor.args[0], [x]), arg_poly):
            return None
        # Climb the single-user arithmetic chain above the anchor to the first node whose value
        # is the formula's.
        node = anchor
        for _ in range(_MAX_DEPTH):
            users = list(node.users)
            if len(users) != 1 or not is_op(users[0], *_ARITH):
                return None
            node = users[0]
            if _same_poly(_poly(node, [x, anchor]), out_poly):
                return x, kind, node
        return None
    return None


def _match_activation(node: fx.Node) -> tuple[fx.Node, str, fx.Node] | None:
    """(x, kind, last node) when `node` is or ends an activation."""
    for op, kind in _DIRECT.items():
        if is_op(node, op):
            return node.args[0], kind, node
    if is_op(node, aten.gelu):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        kind = _GELU_APPROXIMATE.get(approximate)
        return (node.args[0], kind, node) if kind else None
    return _match_written_out(node)


def _strip_views(node):
    while is_op(node, *_VIEWS):
        node = node.args[0]
    return node


def _projection_input(node) -> fx.Node | None:
    """The activation h of a projection `node` (linear(h, w) etc.), views of h stripped."""
    for op, position in _PROJECTIONS.items():
        if is_op(node, op):
            return _strip_views(node.args[position])
    return None


def _half(node) -> tuple[fx.Node, int] | None:
    """(source, 0 or 1) when `node` is the first or second half of `source`'s last dimension."""
    if is_op(node, operator.getitem) and is_op(node.args[0], aten.split, aten.split_with_sizes):
        split = node.args[0]
        source = split.args[0]
        size, dim = split.args[1], split.args[2] if len(split.args) > 2 else 0
        val = tensor_meta(source)
        if val is None or dim not in (-1, val.dim() - 1):
            return None
        sizes = [size, size] if isinstance(size, int) else list(size)
        if len(sizes) != 2 or sizes[0] != sizes[1] or sum(sizes) != val.shape[-1]:
            return None
        return source, node.args[1]
    if is_op(node, aten.slice) and len(node.args) == 4 and node.kwargs.get("step", 1) == 1:
        source, dim, start, end = node.args
        val = tensor_meta(source)
        if val is None or dim not in (-1, val.dim() - 1):
            return None
        half = val.shape[-1] // 2
        if 2 * half != val.shape[-1]:
            return None
        if (start, end) == (0, half):
            return source, 0
        if start == half and end >= 2 * half:
            return source, 1
    return None


def _gated(gate, up) -> bool:
    """True when gate and up are two projections of one input, or two halves of one projection."""
    gate_val, up_val = tensor_meta(gate), tensor_meta(up)
    # Sizes compare as expressions: == on symbolic sizes would add guards to the shape env.
    if (
        gate_val is None
        or up_val is None
        or list(map(str, gate_val.shape)) != list(map(str, up_val.shape))
    ):
        return False
    a, b = _strip_views(gate), _strip_views(up)
    if a is not b:
        h_a, h_b = _projection_input(a), _projection_input(b)
        if h_a is not None and h_a is h_b:
            return True
    halves = _half(gate), _half(up)
    if None in halves:
        return False
    (src_a, i), (src_b, j) = halves
    return (
        src_a is src_b and {i, j} == {0, 1} and _projection_input(_strip_views(src_a)) is not None
    )


@register("recognize_mlp")
def recognize_mlp(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        found = _match_activation(node)
        if found is None:
            continue
        x, kind, last = found
        with graph.inserting_after(last):
            new = call(graph, dsc_ops.activation.default, (x, kind), like=last)
        last.replace_all_uses_with(new)
    graph.eliminate_dead_code()

    for node in list(graph.nodes):
        if not is_op(node, aten.mul) or len(node.args) != 2:
            continue
        for act, up in (node.args, node.args[::-1]):
            if is_op(act, dsc_ops.activation) and _gated(act.args[0], up):
                with graph.inserting_after(node):
                    new = call(
                        graph,
                        dsc_ops.gated_activation.default,
                        (act.args[0], up, act.args[1]),
                        like=node,
                    )
                node.replace_all_uses_with(new)
                break
    graph.eliminate_dead_code()
    return gm
