"""prefetch_next_weight: each cached attention names the weight the next projection streams.

At decode, attention over a short cache reads a few hundred KB in several microseconds, and HBM
idles meanwhile; the projection after it (the output projection) is a pure weight stream. Given
that weight as an operand, the GPU's decode kernel requests it into L2 while it attends
(`dsc.kernels.l2_prefetch`), and the projection reads it from there. A schedule decision in the
graph, like an offload transfer: the operand changes no value.

Matches every `dsc.cached_attention` / `dsc.rotary_cached_attention` without a prefetch operand,
paired with the first weight matrix (a weight placeholder of two or more dimensions) that a node
after it in program order reads, directly or inside a fused region:

    a = dsc.rotary_cached_attention(q, k, v, k_cache, v_cache, valid, start, cos, sin, True, s)
    o = aten.view(aten.transpose(a, 1, 2), [B, S, H * D])
    r = dsc.fused_region([o, W_o, x], "...")            # or aten.linear(o, W_o)

Rewrite to:

    a = dsc.rotary_cached_attention(q, k, v, k_cache, v_cache, valid, start, cos, sin, True, s,
                                    prefetch=W_o)

Does not match: an attention with no weight matrix read after it (nothing to prefetch), one that
already has a prefetch operand. Several attentions before one weight (no projection between
them) all name it.
Ordering: last before memory_plan, after fuse (nothing after it rebuilds attention nodes, which
would drop the keyword). Opt-in on CUDA with DSC_ATTN_PREFETCH=1: measured slower on an H200
(bench/NOTES.md, tenth session): the projection gained less than the attention lost.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import is_op, tensor_meta, weight_name

__all__ = ["prefetch_next_weight"]

dsc_ops = torch.ops.dsc


def _weight_matrix(node: fx.Node) -> fx.Node | None:
    """The first weight placeholder of two or more dimensions among node's inputs."""
    for arg in node.all_input_nodes:
        meta = tensor_meta(arg)
        if weight_name(arg) is not None and meta is not None and meta.dim() >= 2:
            return arg
    return None


def _has_prefetch(node: fx.Node) -> bool:
    # prefetch is the last operand: after scale (argument 8, or 10 with cos and sin).
    last = 9 if is_op(node, dsc_ops.cached_attention) else 11
    operand = node.kwargs.get("prefetch", node.args[last] if len(node.args) > last else None)
    return operand is not None


@register("prefetch_next_weight")
def prefetch_next_weight(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    waiting: list[fx.Node] = []  # attentions whose next weight is still ahead
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if waiting:
            weight = _weight_matrix(node)
            if weight is not None:
                for attention in waiting:
                    attention.update_kwarg("prefetch", weight)
                waiting = []
        if (is_op(node, dsc_ops.cached_attention, dsc_ops.rotary_cached_attention)
                and not _has_prefetch(node)):
            waiting.append(node)
    gm.graph.lint()
    gm.recompile()
    return gm
