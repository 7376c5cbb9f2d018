"""Take apart the expression an attention softmax reads: the scaled q·kᵀ, masks and a bias.

Eager attention code spells the scores many ways; the terms are the same:

    softmax(add(mul(matmul(q, kᵀ), s), mask))                         Llama-style eager
    softmax(masked_fill(add(mul(matmul(q, kᵀ), s), bias), masked, -big))          MPT
    softmax(div(add(matmul(q, kᵀ), mask), c))                                  CodeGen
    softmax(add(where(causal, matmul(q, kᵀ), -big), mask))                     GPT-Neo
    softmax(max(add(view(bmm(q, kᵀ)), mask), -big))                               XGLM

`score_terms(softmax_input, ctx)` peels such wrappers from the outside in, down to the product
(a matmul, or a view of bmm/baddbmm), and returns what it found: the factor on the product, the
boolean masks (masked_fill's are True where attention is not allowed), and the tensors added on
the way with the factor applied to each after its addition. Which added tensor is a mask and
which a bias is left to the caller, which evaluates them (`mask_probe`). Casts are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from dsc.passes.context import PassContext
from dsc.passes.graph_utils import is_op
from dsc.passes.mask_probe import evaluate_subgraph

__all__ = ["ScoreTerms", "score_terms", "strip_casts"]

aten = torch.ops.aten
_VERY_NEGATIVE = -1e4  # a fill or clamp this low only ever meant "masked"
_VIEWS = (aten.view, aten._unsafe_view, aten.reshape)


@dataclass
class ScoreTerms:
    product: fx.Node
    scale: float = 1.0
    masks: list[tuple[fx.Node, bool]] = field(default_factory=list)  # (mask, inverted)
    added: list[tuple[fx.Node, float]] = field(default_factory=list)  # (tensor, factor after)


def strip_casts(node):
    while is_op(node, aten._to_copy) and set(node.kwargs) <= {"dtype"}:
        node = node.args[0]
    return node


def _constant(node, ctx: PassContext) -> float | None:
    """The value of a scalar or a graph constant that holds a single number, else None."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if not isinstance(node, fx.Node):
        return None
    if is_op(node, aten.full) and isinstance(node.args[1], (int, float)):
        return float(node.args[1])
    try:
        value = evaluate_subgraph(node, ctx, {})
    except Exception:  # a value computed from inputs: not a constant
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


def _very_negative(node, ctx: PassContext) -> bool:
    value = _constant(node, ctx)
    return value is not None and value <= _VERY_NEGATIVE


def score_terms(node: fx.Node, ctx: PassContext) -> ScoreTerms | None:
    """The terms of the scores `node` computes (see the module docstring); None when a wrapper
    is of an unknown kind before a product is reached."""
    scale, masks, added = 1.0, [], []
    while True:
        node = strip_casts(node)
        if not isinstance(node, fx.Node):
            return None
        args = node.args
        if is_op(node, aten.masked_fill) and _very_negative(args[2], ctx):
            masks.append((args[1], True))
            node = args[0]
        elif is_op(node, aten.where) and _very_negative(args[2], ctx):
            masks.append((args[0], False))
            node = args[1]
        elif is_op(node, aten.max, aten.maximum, aten.clamp_min) and _very_negative(args[1], ctx):
            node = args[0]  # a floor under masked scores: changes nothing the softmax sees
        elif is_op(node, aten.mul) and isinstance(args[1], (int, float)):
            scale *= float(args[1])
            node = args[0]
        elif is_op(node, aten.div) and isinstance(args[1], (int, float)) and args[1]:
            scale /= float(args[1])
            node = args[0]
        elif is_op(node, aten.add) and isinstance(args[1], fx.Node) and len(args) == 2:
            added.append((args[1], scale))
            node = args[0]
        elif is_op(node, *_VIEWS) and not is_op(node.args[0], aten.bmm, aten.baddbmm):
            node = args[0]  # heads merged into the batch and back (XGLM), between wrappers
        else:
            break
    if not (is_op(node, aten.matmul) or (is_op(node, *_VIEWS)
                                         and is_op(node.args[0], aten.bmm, aten.baddbmm))):
        return None
    return ScoreTerms(node, scale, masks, added)
