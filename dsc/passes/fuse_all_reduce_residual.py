"""fuse_all_reduce_residual: a row-parallel block's all_reduce and the residual add after it become
one op, so the add costs no launch of its own once the next norm is applied by the GEMM that
reads it (the small-batch GEMM's norm prologue, DSC_NORM_PROLOGUE).

Matches (the add's operands in either order):

    r = dsc.all_reduce(p)                      (r read by the add alone)
    h = dsc.residual_add(stream, r)            (stream and r of one shape)

Rewrite to:

    h = dsc.all_reduce_residual(p, stream)

On CUDA the op is the push all-reduce kernel adding the residual as it writes the sum
(dsc/kernels/push_all_reduce.py); elsewhere the all_reduce, then the add. A Llama block at tp > 1
then runs [norm + QKV], attention, O, [all-reduce + add], [norm + gate/up], down,
[all-reduce + add]: without this pass the add would stay a kernel of its own between the
all-reduce and the GEMM that took the norm.

Does not match: an all_reduce read by anything else too (its sum is needed on its own), a sum not
added to the residual stream (the vocab-parallel embedding's), operands of other shapes
(broadcasting).
Ordering: after tensor_parallel (which inserts the all_reduces) and fuse_all_reduce_norm (which
takes the add together with an RMSNorm when DSC_FUSED_ALLREDUCE=1), before fuse. Runs when
Target.tp > 1 and norm prologues are on.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import dsc.ops.collectives  # noqa: F401  (registers dsc::all_reduce_residual)
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import all_reduce_into_residual, call

__all__ = ["fuse_all_reduce_residual"]

dsc_ops = torch.ops.dsc


@register("fuse_all_reduce_residual")
def fuse_all_reduce_residual(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    for add in list(graph.nodes):
        if (match := all_reduce_into_residual(add)) is None:
            continue
        stream, reduced = match
        with graph.inserting_before(add):
            fused = call(graph, dsc_ops.all_reduce_residual.default, (reduced.args[0], stream),
                         like=add)
        add.replace_all_uses_with(fused)
        graph.erase_node(add)
        graph.erase_node(reduced)
    return gm
