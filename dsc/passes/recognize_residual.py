"""recognize_residual: the add that closes a transformer block becomes `dsc::residual_add`.

Matches (operands in either order; view/reshape/clone and casts to the dtype a value already has
may sit between them and the add):

    out = add(stream, proj)
      proj:    linear / addmm / mm / matmul / bmm / dsc.moe output     (the block's last projection)
      stream:  the residual stream: the previous residual add, a norm's output (post-norm models),
               or a value that also feeds a norm (pre-norm models);
      and stream is an ancestor of proj: the branch is computed from the stream, out = x + f(x).

Rewrite to:

    out = dsc.residual_add(stream, proj)

Norms are aten.layer_norm, dsc.layer_norm, dsc.rms_norm, and the written-out forms those passes
recognise (`mul(x, rsqrt(..))`, `sub(x, mean(x))`), so the pass also works before them.

Does not match: a projection plus a bias, a constant or an unrelated input (not an ancestor of the
projection); an add of two projections (parallel attention + MLP blocks); an add scaled by alpha;
a branch that ends in something other than a projection (an activation, a norm).
Ordering: after recognize_rms_norm, recognize_layer_norm and recognize_moe (so an MoE block's
output counts as a projection); before passes that fuse the add into a GEMM epilogue or place
tensor-parallel reductions in front of it.
"""

from __future__ import annotations

import torch
from torch import fx

# Registers dsc::residual_add, and through the dsc.ops package the ops named in the tables below.
import dsc.ops.residual  # noqa: F401
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, tensor_meta

__all__ = ["recognize_residual"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc

_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.clone, aten.alias)
_PROJECTIONS = (aten.linear, aten.addmm, aten.mm, aten.matmul, aten.bmm, dsc_ops.moe)
_NORMS = (aten.layer_norm, dsc_ops.layer_norm, dsc_ops.rms_norm)
_MAX_HOPS = 4  # view/cast nodes between the stream and the norm it feeds


def _is_noop_cast(node) -> bool:
    # HF casts a block's output to the stream's dtype; when it already has it, that is a no-op.
    if not is_op(node, aten._to_copy) or set(node.kwargs) != {"dtype"}:
        return False
    src, out = tensor_meta(node.args[0]), tensor_meta(node)
    return src is not None and out is not None and src.dtype == out.dtype


def _strip_views(node):
    while is_op(node, *_VIEWS) or _is_noop_cast(node):
        node = node.args[0]
    return node


def _reads_first(node, value: fx.Node, depth: int) -> bool:
    """True when following first arguments from `node` reaches `value` within `depth` steps."""
    for _ in range(depth):
        if not isinstance(node, fx.Node) or not node.args:
            return False
        node = node.args[0]
        if node is value:
            return True
    return False


def _is_written_out_norm(user: fx.Node, value: fx.Node) -> bool:
    # RMSNorm: mul(x, rsqrt(add(mean(pow(x, 2)), eps))); LayerNorm: sub(x, mean(x, ...)).
    if is_op(user, aten.mul):
        return any(
            is_op(a, aten.rsqrt) and _reads_first(a, value, 4) for a in user.args if a is not value
        )
    if is_op(user, aten.sub) and user.args[0] is value:
        return is_op(user.args[1], aten.mean) and user.args[1].args[0] is value
    return False


def _feeds_norm(value: fx.Node) -> bool:
    """True when `value`, or a view or cast of it, is the input of a norm."""
    frontier = [value]
    for _ in range(_MAX_HOPS):
        nxt = []
        for v in frontier:
            for user in v.users:
                if (is_op(user, *_NORMS) and user.args[0] is v) or _is_written_out_norm(user, v):
                    return True
                if is_op(user, *_VIEWS, aten._to_copy):
                    nxt.append(user)
        frontier = nxt
    return False


def _is_stream(node: fx.Node) -> bool:
    root = _strip_views(node)
    return is_op(root, dsc_ops.residual_add, *_NORMS) or _feeds_norm(root)


def _is_ancestor(root: fx.Node, of: fx.Node, order: dict[fx.Node, int]) -> bool:
    """True when `root` is an ancestor of `of`; only nodes after `root` are searched."""
    first = order[root]
    seen, stack = set(), [of]
    while stack:
        n = stack.pop()
        if n is root:
            return True
        if n in seen or order[n] < first:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _match(add: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node] | None:
    """(stream, proj) operands of a residual add, or None."""
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    if not all(isinstance(a, fx.Node) for a in add.args):
        return None
    for stream, proj in (add.args, add.args[::-1]):
        branch = _strip_views(proj)
        if not is_op(branch, *_PROJECTIONS) or not _is_stream(stream):
            continue
        if _is_ancestor(_strip_views(stream), branch, order):
            return stream, proj
    return None


@register("recognize_residual")
def recognize_residual(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    # Topological order, so an add's stream operand was already rewritten when it is a residual.
    for node in list(graph.nodes):
        if not is_op(node, aten.add):
            continue
        found = _match(node, order)
        if found is None:
            continue
        with graph.inserting_after(node):
            new = call(graph, dsc_ops.residual_add.default, found, like=node)
        order[new] = order[node]
        node.replace_all_uses_with(new)
    graph.eliminate_dead_code()
    return gm
