"""fuse_qkv_attention: a layer's input norm, QKV projection and cached attention as one op.

Matches (q, k and v the three column ranges of one projection, each read only on its way to the
attention; the norm optional, read only by the projection):

    h = dsc.rms_norm(x, w_n, eps, dtype)            # or dsc.layer_norm(x, w_n, b_n, eps)
    y = aten.linear(h, W, b)                         # W [(Hq + 2 Hkv) * D, K]
    q = transpose(view(slice(y, -1, 0, Hq*D), [B, S, Hq, D]), 1, 2)       # or split + getitem
    k = transpose(view(slice(y, -1, Hq*D, (Hq+Hkv)*D), [B, S, Hkv, D]), 1, 2)
    v = transpose(view(slice(y, -1, (Hq+Hkv)*D, N), [B, S, Hkv, D]), 1, 2)
    out = dsc.rotary_cached_attention(q, k, v, k_cache, v_cache, valid, start, cos, sin,
                                      causal, scale)   # or dsc.cached_attention(q, k, v, ...)

Rewrite to:

    out = dsc.qkv_cached_attention(x, W, b, w_n, b_n, "rms", eps, k_cache, v_cache, valid, start,
                                   cos, sin, causal, scale, Hq, Hkv)

On the GPU a decode step of one sequence over a short cache then runs as one kernel: the
projection's programs attend for their kv group once its last columns are in
(`dsc.kernels.qkv_attention`); any other step runs the projection and the attention kernels as
before. Does not match: q, k, v from different projections or out of order, a projection, norm
or head view read elsewhere too, a head view other than [B, S, H, D] over the projection's rows
or with another head dimension than the cache's, an RMSNorm whose output dtype is not its
input's, attention within a sliding window (the fused kernel attends every slot), with ALiBi
slopes or with attention sinks.
Ordering: after merge_projections (one projection for q, k and v) and
fold_rotary_into_attention, before fuse (which would take the norm and the projection into a
region). Opt-in with DSC_QKV_ATTENTION=1: measured slower than the kernels it replaces on an
H200 (bench/NOTES.md, tenth session).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, replace_with, tensor_meta

__all__ = ["fuse_qkv_attention"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _single_user(node: object, user: fx.Node) -> bool:
    return isinstance(node, fx.Node) and list(node.users) == [user]


def _head_view(operand: object, attention: fx.Node) -> tuple[fx.Node, int, int, list] | None:
    """(projection, first column, end column, chain) when operand is transpose(view(columns of
    a linear, [B, S, H, D]), 1, 2), every link read only by the next."""
    if not _single_user(operand, attention) or not is_op(operand, aten.transpose.int):
        return None
    if sorted(d % 4 for d in operand.args[1:3]) != [1, 2]:
        return None
    view = operand.args[0]
    if not _single_user(view, operand) or not is_op(view, *_VIEWS):
        return None
    heads_view, part = tensor_meta(view), view.args[0]
    if heads_view is None or heads_view.dim() != 4 or not _single_user(part, view):
        return None
    width = heads_view.shape[2] * heads_view.shape[3]
    chain = [operand, view, part]
    if is_op(part, aten.slice.Tensor):
        y, dim, lo = part.args[0], part.args[1], part.args[2] if len(part.args) > 2 else 0
        step = part.args[4] if len(part.args) > 4 else 1
        if step != 1 or not isinstance(lo, int):
            return None
    elif part.op == "call_function" and part.target is operator.getitem:
        split, index = part.args
        if not is_op(split, aten.split.Tensor) or not isinstance(split.args[1], int):
            return None
        y, dim = split.args[0], split.args[2] if len(split.args) > 2 else 0
        lo = index * split.args[1]
        chain.append(split)
    else:
        return None
    y_meta = tensor_meta(y)
    if not is_op(y, aten.linear.default) or y_meta is None or dim % y_meta.dim() != y_meta.dim() - 1:
        return None
    if str(tuple(heads_view.shape[:2])) != str(tuple(y_meta.shape[:-1])):
        return None  # not [B, S, H, D] over the projection's [B, S] rows
    return y, lo, lo + width, chain


def _norm_of(h: object, linear: fx.Node) -> tuple[object, tuple] | None:
    """(x, (norm weight, norm bias, kind, eps)) for the projection's input h."""
    if is_op(h, dsc_ops.rms_norm) and _single_user(h, linear):
        x, weight, eps, dtype = h.args[:4]
        x_meta = tensor_meta(x)
        if x_meta is None or dtype != x_meta.dtype:
            return None
        return x, (weight, None, "rms", eps)
    if is_op(h, dsc_ops.layer_norm) and _single_user(h, linear):
        x, weight, bias, eps = h.args[:4]
        return x, (weight, bias, "layer", eps)
    return h, (None, None, "none", 0.0)


@register("fuse_qkv_attention")
def fuse_qkv_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        rotary = is_op(node, dsc_ops.rotary_cached_attention)
        if not (rotary or is_op(node, dsc_ops.cached_attention)) or node.kwargs.get("window"):
            continue
        if node.kwargs.get("alibi") is not None or node.kwargs.get("sinks") is not None:
            continue
        views = [_head_view(operand, node) for operand in node.args[:3]]
        if any(v is None for v in views):
            continue
        (y, q_lo, q_hi, _), (y_k, k_lo, k_hi, _), (y_v, v_lo, v_hi, _) = views
        n = tensor_meta(y).shape[-1]
        if not (y is y_k is y_v and q_lo == 0 and k_lo == q_hi and v_lo == k_hi and v_hi == n):
            continue
        head_dims = {tensor_meta(operand).shape[-1] for operand in node.args[:3]}
        if head_dims != {tensor_meta(node.args[3]).shape[-1]}:
            continue  # the op splits the projection by the cache's head dimension
        chains = [link for view in views for link in view[3]]
        parts = {link for link in chains if link.args and link.args[0] is y}
        if set(y.users) != parts:
            continue  # the projection is read elsewhere too
        found = _norm_of(y.args[0], y)
        if found is None:
            continue
        x, (norm_w, norm_b, kind, eps) = found
        q, k = tensor_meta(node.args[0]), tensor_meta(node.args[1])
        weight, bias = y.args[1], y.args[2] if len(y.args) > 2 else None
        caches = node.args[3:7]  # k_cache, v_cache, valid, start
        cos, sin, causal, scale = node.args[7:11] if rotary else (None, None, *node.args[7:9])
        with gm.graph.inserting_before(node):
            fused = call(gm.graph, dsc_ops.qkv_cached_attention.default,
                         (x, weight, bias, norm_w, norm_b, kind, eps, *caches, cos, sin, causal,
                          scale, q.shape[1], k.shape[1]), like=node)
        replace_with(node, fused)
        norm = y.args[0] if kind != "none" else None
        # Users before what they read: the head views, the column parts, a shared split, then
        # the projection and its norm.
        for link in [*(view[3][i] for i in range(3) for view in views),
                     *dict.fromkeys(link for view in views for link in view[3][3:]), y,
                     *([norm] if norm is not None else [])]:
            if link in gm.graph.nodes and not link.users:
                gm.graph.erase_node(link)
    return gm
