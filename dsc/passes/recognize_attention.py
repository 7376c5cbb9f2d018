"""recognize_attention: attention subgraphs become one `dsc::attention` node.

Matches, form 1 (what export keeps of F.scaled_dot_product_attention):

    k_rep = reshape(expand(unsqueeze(k, 2), [B, Hkv, n, S, D]), [B, Hkv*n, S, D])   # GQA, optional
    out   = scaled_dot_product_attention(q, k_rep, v_rep, mask, scale=s)
    mask  = masked_fill(bias, masked, -big)          # Falcon: the ALiBi bias in a float mask

Matches, form 2 (eager attention; casts optional, scale by mul or div):

    p   = softmax(add(mul(matmul(q, transpose(k, -2, -1)), s), mask), -1)
    p   = softmax(masked_fill(add(mul(matmul(q, kᵀ), s), bias), masked, -big), -1)   # MPT
    out = matmul(p, v)
    (any nesting of scales, added masks, masked_fill / where masks, a floor and one added
    bias around the product: `score_terms`; the masks allow what all of them allow)

    c   = cat([scores, expand(view(sinks, [1, H, 1, 1]))], -1)       # GPT-OSS: attention sinks
    p   = slice(softmax(sub(c, max(c, -1).values), -1), -1, 0, -1)   # the shift optional

Matches, form 3 (BLOOM: heads merged into the batch, the score bias in a baddbmm):

    s3  = baddbmm(bias, merge(q), transpose(merge(k), -1, -2), beta=b, alpha=s)  # [B*H, S, T]
    p   = softmax(add(view(s3, [B, H, S, T]), mask), -1)     # the same terms as form 2
    out = view(bmm(view(p, [B*H, S, T]), merge(v)), [B, H, S, D])
    (merge(x) = _unsafe_view(clone(x), [B*H, S, D]); bmm instead of baddbmm: no bias)

Rewrite to:

    valid = ne(attention_mask, 0)                      # once per graph, when the mask uses padding
    out   = dsc.attention(q, k, v, valid | None, causal, s)
    out   = dsc.attention(q, k, v, valid | None, True, s, window=w)   # a sliding-window mask
    out   = dsc.attention(q, k, v, valid | None, True, s, alibi=[b * slope_h for each head])
    out   = dsc.attention(q, k, v, valid | None, causal, s, sinks=sinks)   # the weight [H]

The mask is classified by `mask_probe.classify_mask` (evaluated, not pattern-matched): causal or
bidirectional, with or without padding, causal within a sliding window; form 3's bias by
`mask_probe.alibi_slopes` (also evaluated): a slope per head times the key's position; MPT's
bias (form 2 with masked_fill) and Falcon's (form 1) the same way. Does not
match: a mask of another kind (a window that is not causal, an additive bias in the mask), a
bias that is not ALiBi's or comes with a mask that is not causal, dropout > 0.
Ordering: after canonicalize; before kv_cache.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, replace_with, tensor_meta, weight_name
from dsc.passes.mask_probe import MaskKind, alibi_slopes, classify_mask
from dsc.passes.score_terms import ScoreTerms, score_terms, strip_casts

__all__ = ["recognize_attention", "key_valid_node"]

aten = torch.ops.aten


def _strip_repeat_kv(node: fx.Node) -> fx.Node:
    """k when node is the repeat_kv expansion of k along the head dimension, else node."""
    if is_op(node, aten.reshape, aten.view, aten._unsafe_view):
        expand = node.args[0]
        if is_op(expand, aten.clone):
            expand = expand.args[0]
        if is_op(expand, aten.expand) and is_op(expand.args[0], aten.unsqueeze):
            unsq = expand.args[0]
            base = unsq.args[0]
            val = tensor_meta(base)
            if unsq.args[1] == 2 and val is not None and val.dim() == 4:
                return base
    if is_op(node, aten.repeat_interleave) and node.kwargs.get("dim", None) in (1,):
        return node.args[0]
    return node


def key_valid_node(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's bool view of the `attention_mask` input, created on first use."""
    for node in gm.graph.nodes:
        if node.meta.get("dsc_key_valid"):
            return node
    mask = next((n for n in gm.graph.nodes if n.meta.get("dsc_input") == "attention_mask"), None)
    if mask is None:
        return None
    last_placeholder = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last_placeholder):
        valid = call(gm.graph, aten.ne.Scalar, (mask, 0))
    valid.meta["dsc_key_valid"] = True
    return valid


def _kind(mask, is_causal: bool, ctx: PassContext, inverted: bool = False) -> MaskKind | None:
    if mask is None:
        return MaskKind(causal=bool(is_causal), uses_padding=False)
    if is_causal:
        return None  # both a mask and is_causal: unusual, leave it to torch
    return classify_mask(mask, ctx, inverted)


def _both(a: MaskKind, b: MaskKind) -> MaskKind:
    """The mask that allows what both allow: every kind is an `and` of its conditions."""
    windows = [w for w in (a.window, b.window) if w]
    return MaskKind(causal=a.causal or b.causal, uses_padding=a.uses_padding or b.uses_padding,
                    window=min(windows) if windows else 0)


def _rewrite(gm, ctx, node, q, k, v, kind: MaskKind | None, scale, alibi=None,
             sinks=None) -> bool:
    if kind is None or (alibi is not None and not kind.causal):
        return False
    k, v = _strip_repeat_kv(k), _strip_repeat_kv(v)
    qv, kv = tensor_meta(q), tensor_meta(k)
    if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
        return False
    valid = key_valid_node(gm) if kind.uses_padding else None
    if kind.uses_padding and valid is None:
        return False
    if scale is None:
        scale = 1.0 / math.sqrt(qv.shape[-1])
    kwargs = {"window": kind.window} if kind.window else {}
    if alibi is not None:
        kwargs["alibi"] = alibi
    if sinks is not None:
        kwargs["sinks"] = sinks
    with gm.graph.inserting_after(node):
        new = call(
            gm.graph, torch.ops.dsc.attention.default,
            (q, k, v, valid, kind.causal, float(scale)), kwargs, like=node,
        )
    replace_with(node, new)
    return True


def _sdpa(gm: fx.GraphModule, ctx: PassContext, node: fx.Node) -> bool:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    if bound.get("dropout_p", 0.0) not in (0, 0.0):
        return False
    mask, alibi, inverted = bound.get("attn_mask"), None, False
    if is_op(mask, aten.masked_fill) and isinstance(mask.args[0], fx.Node):
        # Falcon: the ALiBi bias inside the float mask, masked_fill(bias, masked, -big).
        alibi = alibi_slopes(mask.args[0], ctx, tensor_meta(bound["query"]).shape[1])
        if alibi is not None:
            mask, inverted = mask.args[1], True
    kind = _kind(mask, bound.get("is_causal", False), ctx, inverted)
    return _rewrite(gm, ctx, node, bound["query"], bound["key"], bound["value"], kind,
                    bound.get("scale"), alibi)


def _terms_kind(terms: ScoreTerms, ctx: PassContext, heads: int
                ) -> tuple[MaskKind, list[float] | None] | None:
    """The mask all of the terms' masks make together, and the ALiBi slopes of the one added
    tensor that is not a mask (scaled by what multiplies it after); None for anything else."""
    kind, alibi = MaskKind(causal=False, uses_padding=False), None
    masks = [(mask, inverted) for mask, inverted in terms.masks]
    for added, factor in terms.added:
        if _four_dim(added) and classify_mask(added, ctx) is not None:
            masks.append((added, False))
            continue
        slopes = alibi_slopes(added, ctx, heads)
        if slopes is None or alibi is not None:
            return None
        alibi = [factor * slope for slope in slopes]
    for mask, inverted in masks:
        part = classify_mask(mask, ctx, inverted) if _four_dim(mask) else None
        if part is None:
            return None
        kind = _both(kind, part)
    return kind, alibi


def _softmax_input(probs: fx.Node) -> fx.Node | None:
    """x when probs is softmax(x) over the last dim, behind casts and views."""
    soft = strip_casts(probs)
    while is_op(soft, *_VIEWS):
        soft = strip_casts(soft.args[0])
    if not is_op(soft, aten.softmax, aten._softmax) or soft.args[1] not in (-1, 3):
        return None
    return soft.args[0]


def _unshifted(scores: fx.Node | None) -> fx.Node | None:
    """x when scores is x - max(x, -1, keepdim) (a shift the softmax does not see: MiMo,
    GPT-OSS), else scores."""
    if is_op(scores, aten.sub) and is_op(scores.args[1], operator.getitem):
        peak = scores.args[1].args[0]
        if is_op(peak, aten.max) and peak.args[0] is scores.args[0]:
            return scores.args[0]
    return scores


def _sink_split(probs: fx.Node, heads: int) -> tuple[fx.Node, fx.Node] | None:
    """(scores, sinks) when probs = softmax(cat([scores, sinks per head], -1))[..., :-1] and
    sinks is a stored [heads] weight; a shift of the softmax's input by its row max (which
    changes nothing) may sit between the cat and the softmax."""
    node = strip_casts(probs)
    while is_op(node, aten.clone):
        node = strip_casts(node.args[0])
    if not is_op(node, aten.slice) or tuple(node.args[1:]) not in ((3, 0, -1), (-1, 0, -1)):
        return None
    inner = _unshifted(_softmax_input(node.args[0]))
    if not is_op(inner, aten.cat) or len(inner.args[0]) != 2 or (
            inner.args[1] if len(inner.args) > 1 else 0) not in (-1, 3):
        return None
    scores, sinks = inner.args[0]
    while is_op(sinks, aten.expand, *_VIEWS):
        sinks = sinks.args[0]
    val = tensor_meta(sinks)
    if weight_name(sinks) is None or val is None or tuple(val.shape) != (heads,):
        return None
    return scores, sinks


def _four_dim(mask: fx.Node | None) -> bool:
    return mask is None or (tensor_meta(mask) is not None and tensor_meta(mask).dim() == 4)


def _softmax_form(gm: fx.GraphModule, ctx: PassContext, out: fx.Node) -> bool:
    """out = matmul(softmax(scores), v), the scores q kᵀ with masks, a scale and a bias around
    them (`score_terms`)."""
    if not is_op(out, aten.matmul):
        return False
    probs, v = out.args
    heads = tensor_meta(out).shape[1] if tensor_meta(out) is not None else None
    split = _sink_split(probs, heads)
    scores, sinks = split if split is not None else (_unshifted(_softmax_input(probs)), None)
    terms = score_terms(scores, ctx) if scores is not None else None
    if terms is None or not is_op(terms.product, aten.matmul):
        return False
    q, kt = terms.product.args
    if not is_op(kt, aten.transpose) or sorted(kt.args[1:]) not in ([-2, -1], [2, 3]):
        return False
    found = _terms_kind(terms, ctx, tensor_meta(q).shape[1])
    if found is None:
        return False
    kind, alibi = found
    return _rewrite(gm, ctx, out, q, kt.args[0], v, kind, terms.scale, alibi, sinks)


_VIEWS = (aten.view, aten._unsafe_view, aten.reshape)


def _unmerged_heads(node) -> fx.Node | None:
    """x [B, H, S, D] when node is view(clone(x), [B*H, S, D]) (clone optional), else None."""
    if not is_op(node, *_VIEWS):
        return None
    x = node.args[0]
    if is_op(x, aten.clone):
        x = x.args[0]
    xv, nv = tensor_meta(x), tensor_meta(node)
    if xv is None or nv is None or xv.dim() != 4 or nv.dim() != 3 or xv.shape[-1] != nv.shape[-1]:
        return None
    return x


def _batched_heads_form(gm: fx.GraphModule, ctx: PassContext, out: fx.Node) -> bool:
    """out = view(bmm(view(softmax(view(baddbmm(bias, q, kᵀ)) + mask)), v), [B, H, S, D])."""
    if not is_op(out, *_VIEWS) or not is_op(out.args[0], aten.bmm):
        return False
    out_val = tensor_meta(out)
    probs, v3 = out.args[0].args
    v = _unmerged_heads(v3)
    if out_val is None or out_val.dim() != 4 or v is None:
        return False
    scores = _softmax_input(probs)
    terms = score_terms(scores, ctx) if scores is not None else None
    if terms is None or not is_op(terms.product, *_VIEWS):
        return False
    product = terms.product.args[0]
    if is_op(product, aten.baddbmm):
        bias, q3, kt = product.args[:3]
        beta = float(product.kwargs.get("beta", 1.0))
        scale = float(product.kwargs.get("alpha", 1.0))
    elif is_op(product, aten.bmm):
        (q3, kt), bias, beta, scale = product.args, None, 1.0, 1.0
    else:
        return False
    if not is_op(kt, aten.transpose) or sorted(kt.args[1:]) not in ([-2, -1], [1, 2]):
        return False
    q, k = _unmerged_heads(q3), _unmerged_heads(kt.args[0])
    if q is None or k is None:
        return False
    found = _terms_kind(terms, ctx, tensor_meta(q).shape[1])
    if found is None:
        return False
    kind, alibi = found
    if bias is not None:
        slopes = alibi_slopes(strip_casts(bias), ctx, tensor_meta(q).shape[1])
        if slopes is None or alibi is not None:
            return False
        alibi = [terms.scale * beta * slope for slope in slopes]
    return _rewrite(gm, ctx, out, q, k, v, kind, terms.scale * scale, alibi)


@register("recognize_attention")
def recognize_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if is_op(node, aten.scaled_dot_product_attention):
            _sdpa(gm, ctx, node)
        elif is_op(node, aten.matmul):
            _softmax_form(gm, ctx, node)
        elif is_op(node, *_VIEWS) and is_op(node.args[0], aten.bmm):
            _batched_heads_form(gm, ctx, node)
    gm.graph.eliminate_dead_code()
    return gm
