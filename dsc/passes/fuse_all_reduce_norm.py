"""fuse_all_reduce_norm: a row-parallel block's all_reduce, the residual add and the next RMSNorm
become one op, so a tensor-parallel decode step pays one launch for them instead of two.

Matches (the add's operands in either order):

    r = dsc.all_reduce(p)                      (r read by the add alone)
    h = dsc.residual_add(stream, r)
    n = dsc.rms_norm(h, w, eps, dtype)         (h may have other readers: the next residual add)

Rewrite to:

    f = dsc.all_reduce_residual_norm(p, stream, w, eps, dtype)
    h = f[0]; n = f[1]

On CUDA the op is one kernel (dsc/kernels/push_all_reduce.py): each rank writes its partial,
flagged with the call's sequence number, into every peer's symmetric buffer, sums what it
received, adds the residual and normalises the row; elsewhere it runs the three ops in turn.

Does not match: an all_reduce read by anything else too (its sum would be needed on its own), a
sum that is not added to the residual stream (the vocab-parallel embedding's), an add not
followed by an RMSNorm of its result (LayerNorm models, the last block before a missing final
norm), an RMSNorm that reads h through a view or cast, operands of other shapes (broadcasting).
Ordering: after tensor_parallel (which inserts the all_reduces), before fuse (which would
otherwise group the add and the norm into a region of their own). Runs when Target.tp > 1 and
DSC_FUSED_ALLREDUCE=1, until measured on several GPUs.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import dsc.ops.collectives  # noqa: F401  (registers dsc::all_reduce_residual_norm)
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import all_reduce_into_residual, call, is_op

__all__ = ["fuse_all_reduce_norm"]

dsc_ops = torch.ops.dsc


def _norm_of(h: fx.Node) -> fx.Node | None:
    for user in h.users:
        if is_op(user, dsc_ops.rms_norm) and user.args[0] is h:
            return user
    return None


@register("fuse_all_reduce_norm")
def fuse_all_reduce_norm(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    for add in list(graph.nodes):
        if (match := all_reduce_into_residual(add)) is None or (norm := _norm_of(add)) is None:
            continue
        stream, reduced = match
        weight, eps, out_dtype = norm.args[1], norm.args[2], norm.args[3]
        with graph.inserting_before(add):
            fused = call(graph, dsc_ops.all_reduce_residual_norm.default,
                         (reduced.args[0], stream, weight, eps, out_dtype), like=add)
            h = graph.call_function(operator.getitem, (fused, 0))
            normed = graph.call_function(operator.getitem, (fused, 1))
        h.meta["val"], normed.meta["val"] = fused.meta["val"]
        add.replace_all_uses_with(h)
        norm.replace_all_uses_with(normed)
        graph.erase_node(norm)
        graph.erase_node(add)
        graph.erase_node(reduced)
    return gm
