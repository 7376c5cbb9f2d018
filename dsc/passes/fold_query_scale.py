"""fold_query_scale: a constant that scales the queries moves into the attention's own scale.

Matches (c a Python number; only layout ops — view, reshape, transpose, permute — between the
product and the attention, each read by nothing else):

    q = mul(p, c)                        (OPT, BART: q_proj(x) * head_dim ** -0.5)
    o = dsc.attention(layout(q), k, v, key_valid, causal, scale)

Rewrite to:

    o = dsc.attention(layout(p), k, v, key_valid, causal, scale * c)

Why: the attention multiplies every score by its scale anyway; the product of the queries was a
kernel of its own in every decode layer (a pointwise region between the QKV GEMM and the
attention), and one rounding of the scaled queries to their dtype less.
Does not match: a tensor or symbolic factor, a product something else also reads (the scaled
queries are needed as they are), any op other than a layout op between the product and the
attention.
Ordering: after recognize_attention (it reads dsc.attention), before kv_cache.
"""

from __future__ import annotations

import torch
from torch import fx

import dsc.ops.attention  # noqa: F401  (registers dsc::attention)
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import is_op

__all__ = ["fold_query_scale"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc

_LAYOUT = (aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute)


def _scaled_queries(q: fx.Node) -> tuple[fx.Node, float] | None:
    """(mul node, c) when q is layout ops over mul(p, c), every link read once."""
    node = q
    while is_op(node, *_LAYOUT) and len(node.users) == 1:
        node = node.args[0]
    if not is_op(node, aten.mul) or len(node.users) != 1 or node.kwargs or len(node.args) != 2:
        return None
    source, factor = node.args
    if not isinstance(source, fx.Node) or isinstance(factor, bool):
        return None
    if not isinstance(factor, (int, float)):
        return None  # a tensor or a symbolic factor
    return node, float(factor)


@register("fold_query_scale")
def fold_query_scale(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if not is_op(node, dsc_ops.attention) or len(node.args) != 6:
            continue
        q = node.args[0]
        found = _scaled_queries(q) if isinstance(q, fx.Node) and len(q.users) == 1 else None
        if found is None:
            continue
        mul, factor = found
        node.args = (*node.args[:5], node.args[5] * factor)
        mul.replace_all_uses_with(mul.args[0])
        gm.graph.erase_node(mul)
    return gm
