"""Classify an attention mask computed inside the graph by evaluating it on probe inputs.

HF models build masks from `attention_mask` with long chains of arange/compare/index ops that
change between releases. Rather than match those chains, the subgraph that computes the mask is
copied out and run on a padded probe batch; its result is compared with the two masks dsc knows:

    causal:        query i may attend key j  iff  j <= i  and  attention_mask[b, j]
    bidirectional: query i may attend key j  iff  attention_mask[b, j]

Rows of padding queries are not compared (HF rewrites them in ways that differ between paths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from dsc.passes.context import PassContext
from dsc.passes.graph_utils import ancestors

__all__ = ["MaskKind", "classify_mask"]

_PROBE_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


@dataclass(frozen=True)
class MaskKind:
    causal: bool
    uses_padding: bool


def _probe_inputs(ctx: PassContext) -> dict[str, torch.Tensor]:
    batch, seq = _PROBE_MASK.shape
    vocab = ctx.info.vocab_size or 2
    return {
        "input_ids": torch.randint(0, max(vocab - 1, 1), (batch, seq)),
        "attention_mask": _PROBE_MASK.clone(),
        "position_ids": (_PROBE_MASK.cumsum(-1) - 1).clamp(min=0),
    }


def evaluate_subgraph(node: fx.Node, ctx: PassContext, inputs: dict[str, torch.Tensor]):
    """Run only the ancestors of `node` on concrete inputs; None if it needs anything else."""
    needed = ancestors([node])
    env: dict[fx.Node, object] = {}
    for n in node.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            if "dsc_input" in n.meta and n.meta["dsc_input"] in inputs:
                env[n] = inputs[n.meta["dsc_input"]]
            elif "dsc_weight" in n.meta and n.meta["dsc_weight"] in ctx.weights:
                env[n] = ctx.weights[n.meta["dsc_weight"]].cpu()
            else:
                return None
            continue
        if n.op != "call_function":
            return None
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if "device" in kwargs:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        env[n] = n.target(*args, **kwargs)
    return env[node]


def classify_mask(mask: fx.Node, ctx: PassContext) -> MaskKind | None:
    """The kind of mask `mask` computes, or None when it is neither known kind."""
    inputs = _probe_inputs(ctx)
    try:
        with torch.no_grad():
            value = evaluate_subgraph(mask, ctx, inputs)
    except Exception:  # any op that cannot run on the probe means: not a mask we know
        return None
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return None
    if value.dtype == torch.bool:
        allowed = value
    else:
        allowed = value > -1.0
        if bool((value[allowed] != 0).any()):
            return None  # an additive bias (ALiBi, relative position): not a plain mask
    batch, seq = _PROBE_MASK.shape
    try:
        allowed = allowed.expand(batch, allowed.shape[1], seq, seq)
    except RuntimeError:
        return None
    keys = _PROBE_MASK.bool()[:, None, None, :]
    causal = torch.ones(seq, seq).tril().bool()[None, None]
    rows = _PROBE_MASK.bool()[:, None, :, None].expand_as(allowed)
    for kind, expected in (
        (MaskKind(causal=True, uses_padding=True), causal & keys),
        (MaskKind(causal=False, uses_padding=True), keys.expand(batch, 1, seq, seq)),
        (MaskKind(causal=True, uses_padding=False), causal),
        (MaskKind(causal=False, uses_padding=False), torch.ones(1, 1, seq, seq, dtype=torch.bool)),
    ):
        expected = expected.expand_as(allowed)
        if bool((allowed == expected)[rows].all()):
            return kind
    return None
