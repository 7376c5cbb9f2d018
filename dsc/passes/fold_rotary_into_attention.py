"""fold_rotary_into_attention: the attention kernel rotates the step's queries and keys itself.

Matches (both rotations with the same cos and sin, each read only by the attention):

    q = dsc.rotary(xq, cos, sin)          k = dsc.rotary(xk, cos, sin)
    out = dsc.cached_attention(q, k, v, k_cache, v_cache, valid, start, causal, scale)

Rewrite to:

    out = dsc.rotary_cached_attention(xq, xk, v, k_cache, v_cache, valid, start, cos, sin,
                                      causal, scale)

Keyword operands of the attention (a sliding `window`) carry over.
At decode the attention kernel then loads xq and the new keys, rotates them in registers and
writes the rotated keys into the cache: one launch per layer fewer (the rotary region).

Does not match: rotations with different tables, a rotated q or k read elsewhere too (it would be
computed twice), tables that vary per head (cos [B, H, S, D] with H > 1), a rotary whose output
dtype differs from its input's (the attention would see other values).
Ordering: after kv_cache and tensor_parallel, before fuse (which would otherwise group the two
rotations into a region). On by default on CUDA; DSC_ROTARY_IN_ATTENTION=0 turns it off
(bench/NOTES.md has its A/B).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, replace_with, tensor_meta

__all__ = ["fold_rotary_into_attention"]

dsc_ops = torch.ops.dsc


def _foldable_rotary(node: object, attention: fx.Node) -> bool:
    if not is_op(node, dsc_ops.rotary) or list(node.users) != [attention]:
        return False
    x, cos = tensor_meta(node.args[0]), tensor_meta(node.args[1])
    out = tensor_meta(node)
    return (
        x is not None and cos is not None and out is not None
        and out.dtype == x.dtype and out.shape == x.shape
        and cos.dim() == 4 and cos.shape[1] == 1
    )


@register("fold_rotary_into_attention")
def fold_rotary_into_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if not is_op(node, dsc_ops.cached_attention):
            continue
        q, k = node.args[0], node.args[1]
        if not (_foldable_rotary(q, node) and _foldable_rotary(k, node)):
            continue
        if q is k or q.args[1:] != k.args[1:]:
            continue
        cos, sin = q.args[1], q.args[2]
        v, k_cache, v_cache, valid, start, causal, scale = node.args[2:9]
        with gm.graph.inserting_before(node):
            new = call(gm.graph, dsc_ops.rotary_cached_attention.default,
                       (q.args[0], k.args[0], v, k_cache, v_cache, valid, start, cos, sin,
                        causal, scale), dict(node.kwargs), like=node)
        replace_with(node, new)
        gm.graph.erase_node(q)
        gm.graph.erase_node(k)
    return gm
