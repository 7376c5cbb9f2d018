"""fuse_linear_all_reduce: a row-parallel projection and the all_reduce of its partial become one
op, so the runtime may let the GEMM send its output tiles to the peers itself.

Matches (W a weight input; the product read by the all_reduce alone):

    p = linear(x, W)            (no bias)
    r = dsc.all_reduce(p)

Rewrite to:

    r = dsc.linear_all_reduce(x, W)

The op is the product, then the all_reduce with the transport `dsc/runtime/allreduce.py`
picks. With DSC_GEMV_PUSH=1, on CUDA, for decode-sized products (at most
push_all_reduce.MAX_ROWS rows, the small-batch GEMM's shapes, no K split) it is instead the
small-batch GEMM with a push epilogue — each output tile goes to every rank's receive buffer as
flagged words when it is done — then a kernel that waits for the words and sums them. That is
opt-in: it measured slower on H100s (bench/NOTES.md, tp run 8).

Does not match: a product with a bias (tensor_parallel puts a row's bias in rank 0's product;
the push epilogue takes none), a product read by anything else (its partial would be needed on
its own), an all_reduce of anything but a linear (the vocab-parallel embedding's, the MoE
block's), a weight computed in the graph.
Ordering: backend, after addmm_to_linear (GPT-2's row products become linears there), before
fuse (which stops at collectives either way). Runs when Target.tp > 1.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import dsc.ops.collectives  # noqa: F401  (registers dsc::linear_all_reduce)
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, is_op, weight_name

__all__ = ["fuse_linear_all_reduce"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc


def _row_product(reduced: fx.Node) -> fx.Node | None:
    """The bias-free linear of a weight that only this all_reduce reads, else None."""
    product = reduced.args[0] if reduced.args else None
    if not is_op(product, aten.linear) or product.kwargs or len(product.args) not in (2, 3):
        return None
    if len(product.args) == 3 and product.args[2] is not None:  # linear(x, W, None) is bias-free
        return None
    if len(product.users) != 1 or weight_name(product.args[1]) is None:
        return None
    return product


@register("fuse_linear_all_reduce")
def fuse_linear_all_reduce(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    for reduced in list(graph.nodes):
        if not is_op(reduced, dsc_ops.all_reduce):
            continue
        product = _row_product(reduced)
        if product is None:
            continue
        with graph.inserting_before(reduced):
            fused = call(graph, dsc_ops.linear_all_reduce.default, tuple(product.args[:2]),
                         like=reduced)
        reduced.replace_all_uses_with(fused)
        graph.erase_node(reduced)
        graph.erase_node(product)
    graph.lint()
    gm.recompile()
    return gm
