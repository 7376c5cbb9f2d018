"""absorb_latent_attention: latent attention attends over its latent, so the cache holds one
latent row a token instead of every head's keys and values.

Multi-head latent attention (DeepSeek-V2/V3 and their kin) projects each token to a small latent
c (r wide, normed) and a rotary key k_rot (dr wide, shared by the heads), and expands c into
every head's key and value through one weight W [H * (dn + dv), r]. Matches (as traced):

    kv = transpose(view(linear(c, W), [B, S, H, dn + dv]), 1, 2)   # no bias; c [B, 1, S, r]
    k  = [kv[..., :dn] | expand(k_rot)]     # cat, or slice_scatter into new_empty; k_rot [B,1,S,dr]
    q  = [q_nope | q_rot]                   # widths dn, dr
    v  = kv[..., dn:]
    o  = dsc.attention(q, k, v, key_valid, causal, scale, ...)

Rewrite to (heads as the batch of two small products, the weight never copied per sequence):

    q_lat = bmm(q_nope by head, W_uk)                  # W_uk [H, dn, r]: W's key rows per head
    o_lat = dsc.attention(cat([q_lat, q_rot], -1),     # [B, H, S, r + dr]
                          cat([c, k_rot], -1),         # [B, 1, S, r + dr]: one kv head
                          c, key_valid, causal, scale, ...)   # values: the latent itself
    o     = bmm(o_lat by head, W_uv)                   # W_uv [H, r, dv]: its value rows,
                                                       #   transposed; o laid out [B, S, H, dv]
                                                       #   in memory, as the attention's was

The scores are the same sums (q_nope · W_uk c + q_rot · k_rot) and the value product moves past
the softmax's weighted sum, which it commutes with. kv_cache then gives the layer a cache of
r + dr and one of r per token — DeepSeek-V2-Lite 1088 values against 16 heads × 320 — and the
decode step reads the latent once for all heads (one kv head). W is dropped from the program
when nothing else reads it; the two absorbed weights are W's bytes again.

Does not match: W with a bias (its key part would add a per-head term the latent cannot hold),
a rotary key per head, query or key pieces of other widths, values from another projection than
the keys' first part, a q_nope / k_nope width that differs.
Ordering: in the cached programs, before kv_cache (so the cache holds the latent). On one GPU
the forward program keeps the per-head form (without a cache to shrink, its attention is the
cheaper one); with tp > 1 every program takes the latent form, so that tensor_parallel cuts
W_uk, W_uv and the query and output projections by heads the same way in all of them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

import dsc.ops.attention  # noqa: F401  (registers dsc::attention)
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import add_weight, call, is_op, tensor_meta, weight_name

__all__ = ["absorb_latent_attention"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc

_VIEWS = (aten.view, aten.reshape, aten._unsafe_view)


@dataclass
class _Latent:
    """One latent attention: what the rewrite reads."""

    attention: fx.Node
    q_nope: fx.Node  # [B, H, S, dn]
    q_rot: fx.Node  # [B, H, S, dr]
    latent: fx.Node  # the normed latent c, [B, 1, S, r] or [B, S, r]
    k_rot: fx.Node  # [B, 1, S, dr]
    weight: fx.Node  # W [H * (dn + dv), r]
    heads: int
    nope: int  # dn
    value: int  # dv


def _last_dim(node: fx.Node) -> int | None:
    val = tensor_meta(node)
    return None if val is None else val.dim() - 1


def _is_last(node: fx.Node, dim: object) -> bool:
    last = _last_dim(node)
    return isinstance(dim, int) and last is not None and dim in (-1, last)


def _width(node: fx.Node) -> int | None:
    val = tensor_meta(node)
    size = None if val is None else val.shape[-1]
    return size if isinstance(size, int) else None


def _pieces(node: fx.Node) -> list[tuple[int, fx.Node]] | None:
    """The tensors laid side by side along the last dim to make `node`, as (width, tensor):
    a cat, or slice_scatters of copies into an empty tensor (how a traced `k[..., :n] = a`
    reads). None when `node` is neither, or a gap is left unwritten."""
    if is_op(node, aten.cat) and _is_last(node, node.args[1] if len(node.args) > 1 else 0):
        parts = [(_width(p), p) for p in node.args[0]]
        return parts if all(w is not None for w, _ in parts) else None
    spans: list[tuple[int, int, fx.Node]] = []
    while is_op(node, aten.slice_scatter):
        base, src, dim = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else 0
        start = node.args[3] if len(node.args) > 3 else 0
        width = _width(node)
        if not _is_last(node, dim) or not isinstance(start, int) or width is None:
            return None
        if is_op(src, aten.copy):  # copy(slice of the base, value): the value, cast and shaped
            src = src.args[1]
        if _width(src) is None:
            return None
        spans.append((start, start + _width(src), src))
        node = base
    if not spans or not is_op(node, aten.new_empty, aten.empty):
        return None
    spans.sort(key=lambda span: span[0])
    at, parts = 0, []
    for start, end, src in spans:
        if start != at or end <= start:
            return None
        parts.append((end - start, src))
        at = end
    return parts if at == width else None


def _head_slice(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(source, start, end) when `node` is source[..., start:end] by a last-dim split or slice."""
    if is_op(node, aten.slice) and _is_last(node.args[0], node.args[1] if len(node.args) > 1
                                                 else 0):
        source = node.args[0]
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        full = _width(source)
        if step != 1 or not isinstance(start, int) or full is None:
            return None
        end = full if end is None or (isinstance(end, int) and end > full) else end
        return (source, start, end) if isinstance(end, int) else None
    if node.op == "call_function" and node.target is operator.getitem:
        split, index = node.args
        if is_op(split, aten.split_with_sizes) and _is_last(split.args[0], split.args[2] if len(
                split.args) > 2 else 0):
            sizes = split.args[1]
            start = sum(sizes[:index])
            return split.args[0], start, start + sizes[index]
        if is_op(split, aten.split) and _is_last(split.args[0], split.args[2] if len(
                split.args) > 2 else 0) and isinstance(split.args[1], int):
            start = split.args[1] * index
            full = _width(split.args[0])
            return (split.args[0], start, min(start + split.args[1], full)) if full else None
    return None


def _per_head_projection(node: fx.Node) -> tuple[fx.Node, fx.Node, int, int] | None:
    """(c, W, heads, width) when `node` is transpose(view(linear(c, W), [B, S, H, width]), 1, 2)
    with W a stored weight and no bias."""
    if not (is_op(node, aten.transpose) and sorted(node.args[1:3]) == [1, 2]):
        return None
    view = node.args[0]
    if not is_op(view, *_VIEWS):
        return None
    linear = view.args[0]
    val = tensor_meta(view)
    if not is_op(linear, aten.linear) or val is None or val.dim() != 4:
        return None
    if len(linear.args) > 2 and linear.args[2] is not None:
        return None
    latent, weight = linear.args[0], linear.args[1]
    heads, width = val.shape[2], val.shape[3]
    w = tensor_meta(weight)
    if weight_name(weight) is None or w is None or w.dim() != 2 or not isinstance(heads, int):
        return None
    return latent, weight, heads, width


def _strip_expand(node: fx.Node) -> fx.Node:
    while is_op(node, aten.expand):
        node = node.args[0]
    return node


def _match(attention: fx.Node) -> _Latent | None:
    q, k, v = attention.args[:3]
    value = _head_slice(v)
    q_parts, k_parts = _pieces(q), _pieces(k)
    if value is None or q_parts is None or k_parts is None or len(q_parts) != 2 or len(
            k_parts) != 2:
        return None
    kv, v_start, v_end = value
    projection = _per_head_projection(kv)
    key_nope = _head_slice(k_parts[0][1])
    if projection is None or key_nope is None:
        return None
    latent, weight, heads, width = projection
    nope = k_parts[0][0]
    # The keys' first part and the values are the two ends of one projection's heads.
    if key_nope != (kv, 0, nope) or (v_start, v_end) != (nope, width) or q_parts[0][0] != nope:
        return None
    k_rot = _strip_expand(k_parts[1][1])
    rot, c = tensor_meta(k_rot), tensor_meta(latent)
    if rot is None or c is None or rot.dim() != 4 or rot.shape[1] != 1:
        return None  # a rotary key per head: the latent cannot carry it
    if q_parts[1][0] != k_parts[1][0] or rot.shape[-1] != k_parts[1][0]:
        return None
    if not (c.dim() == 3 or (c.dim() == 4 and c.shape[1] == 1)):
        return None
    return _Latent(attention, q_parts[0][1], q_parts[1][1], latent, k_rot, weight, heads, nope,
                   width - nope)


def _by_head(graph: fx.Graph, x: fx.Node, weight: fx.Node, like: fx.Node,
             attention_layout: bool = False) -> fx.Node:
    """x [B, H, S, n] times weight [H, n, m] per head -> [B, H, S, m], through one bmm over
    the heads (a broadcast matmul would copy the weight once per sequence). attention_layout:
    laid out [B, S, H, m] in memory, as an attention's output is (traced code views it so)."""
    batch = call(graph, aten.sym_size.int, (x, 0))
    seq = call(graph, aten.sym_size.int, (x, 2))
    heads, _, width = tensor_meta(weight).shape
    rows = call(graph, aten.permute.default, (x, [1, 0, 2, 3]), like=like)
    rows = call(graph, aten.reshape.default, (rows, [heads, -1, tensor_meta(x).shape[-1]]),
                like=like)
    out = call(graph, aten.bmm.default, (rows, weight), like=like)
    out = call(graph, aten.view.default, (out, [heads, batch, seq, width]), like=like)
    if not attention_layout:
        return call(graph, aten.permute.default, (out, [1, 0, 2, 3]), like=like)
    out = call(graph, aten.permute.default, (out, [1, 2, 0, 3]), like=like)
    out = call(graph, aten.clone.default, (out,), {"memory_format": torch.contiguous_format},
               like=like)
    return call(graph, aten.transpose.int, (out, 1, 2), like=like)


def _rewrite(gm: fx.GraphModule, ctx: PassContext, m: _Latent) -> None:
    graph, node = gm.graph, m.attention
    name = weight_name(m.weight)
    stored = ctx.weights[name]

    def split() -> tuple[torch.Tensor, torch.Tensor]:
        return stored.view(m.heads, m.nope + m.value, -1).split([m.nope, m.value], dim=1)

    w_uk = add_weight(gm, ctx, f"{name}.dsc_key_absorbed", lambda: split()[0])
    w_uv = add_weight(gm, ctx, f"{name}.dsc_value_absorbed", lambda: split()[1].transpose(1, 2))
    with graph.inserting_before(node):
        latent = m.latent
        if tensor_meta(latent).dim() == 3:
            latent = call(graph, aten.unsqueeze.default, (latent, 1), like=node)
        q_lat = _by_head(graph, m.q_nope, w_uk, node)
        q = call(graph, aten.cat.default, ([q_lat, m.q_rot], -1), like=node)
        k = call(graph, aten.cat.default, ([latent, m.k_rot], -1), like=node)
        o_lat = call(graph, dsc_ops.attention.default, (q, k, latent, *node.args[3:]),
                     dict(node.kwargs), like=node)
        out = _by_head(graph, o_lat, w_uv, node, attention_layout=True)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


@register("absorb_latent_attention")
def absorb_latent_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    expanders = set()
    for node in list(gm.graph.nodes):
        if is_op(node, dsc_ops.attention):
            latent = _match(node)
            if latent is not None:
                _rewrite(gm, ctx, latent)
                expanders.add(latent.weight)
    gm.graph.eliminate_dead_code()
    for weight in expanders:  # the expansion's weight, read by nothing in this program now
        if not weight.users:
            gm.graph.erase_node(weight)
    gm.recompile()
    return gm
