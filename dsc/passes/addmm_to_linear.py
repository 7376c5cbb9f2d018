"""addmm_to_linear: products with an [in, out] weight become linears over the transposed weight.

Matches (W a weight input [K, N], as GPT-2's Conv1D keeps it; b a 1-D bias; no beta/alpha):

    y = addmm(b, x, W)            y = mm(x, W)

Rewrite to (W^T stored once, contiguous, as a new weight; the original is dropped from the plan
when nothing else reads it):

    y = linear(x, W_t, b)         y = linear(x, W_t)          W_t = W.t().contiguous()  [N, K]

and, where x flattens the lead dims of an x0 [*lead, K] and the product's only reader restores
them (Conv1D's spelling: view(addmm(b, view(x0, [-1, K]), W), [*lead, N])):

    y = linear(x0, W_t, b)        (the two views gone; linear keeps the lead dims itself)

Why: the decode GEMV streams each weight row along K with 16-byte loads; an [in, out] weight read
as [out, in] is a strided walk that reaches a fraction of the bandwidth, and every later pass and
kernel then sees one spelling of a projection — without the views around it, a norm before
the product and a residual add after it meet the linear directly and fuse into its kernel.
Does not match: a weight computed in the graph, a bias of more than one dimension, beta/alpha
arguments, 3-D operands; views that change the lead dims (the flat product then stays flat).
Ordering: backend, before merge_projections (which merges linears only).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, fake_mode_of, is_op, tensor_meta, weight_name

__all__ = ["addmm_to_linear"]

aten = torch.ops.aten


def _operands(node: fx.Node):
    """(x, W, bias) of a matching addmm / mm, else None."""
    if node.kwargs:
        return None
    if is_op(node, aten.addmm) and len(node.args) == 3:
        bias, x, weight = node.args
        if tensor_meta(bias) is None or tensor_meta(bias).dim() != 1:
            return None
    elif is_op(node, aten.mm) and len(node.args) == 2:
        (x, weight), bias = node.args, None
    else:
        return None
    w, xv = tensor_meta(weight), tensor_meta(x)
    if weight_name(weight) is None or w is None or w.dim() != 2 or xv is None or xv.dim() != 2:
        return None
    return x, weight, bias


def _lead_dims_restored(x: fx.Node, product: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x0, view) when x = view(x0, [-1, K]) and the product's only reader views it back to
    x0's lead dims; sizes compared as expressions."""
    flat, restored = x, next(iter(product.users)) if len(product.users) == 1 else None
    if not is_op(flat, aten.view, aten._unsafe_view, aten.reshape) or not is_op(
        restored, aten.view, aten._unsafe_view, aten.reshape
    ):
        return None
    x0 = flat.args[0]
    a, b, c = tensor_meta(x0), tensor_meta(flat), tensor_meta(restored)
    if a is None or b is None or c is None or a.dim() < 2 or c.dim() != a.dim():
        return None
    if str(a.shape[-1]) != str(b.shape[-1]) or c.shape[-1] != tensor_meta(product).shape[-1]:
        return None
    if [str(d) for d in a.shape[:-1]] != [str(d) for d in c.shape[:-1]]:
        return None
    return x0, restored


def _transposed(gm: fx.GraphModule, ctx: PassContext, weight: fx.Node, cache: dict) -> fx.Node:
    name = weight_name(weight)
    if name not in cache:
        new_name = "transposed:" + name
        if new_name not in ctx.weights:  # another program of this compile made it already
            ctx.weights[new_name] = ctx.weights[name].t().contiguous()
        tensor = ctx.weights[new_name]
        first = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_before(first):
            node = gm.graph.placeholder(new_name.replace(".", "_").replace(":", "_"))
        node.meta["dsc_weight"] = new_name
        with fake_mode_of(gm):
            node.meta["val"] = torch.empty(tensor.shape, dtype=tensor.dtype,
                                           device=weight.meta["val"].device)
        cache[name] = node
    return cache[name]


@register("addmm_to_linear")
def addmm_to_linear(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    cache: dict[str, fx.Node] = {}
    originals: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        found = _operands(node)
        if found is None:
            continue
        x, weight, bias = found
        w_t = _transposed(gm, ctx, weight, cache)
        flat, unflattened = x, _lead_dims_restored(x, node)
        x, result = unflattened if unflattened is not None else (x, node)
        with gm.graph.inserting_before(node):
            linear = call(gm.graph, aten.linear.default, (x, w_t, bias), like=node)
        result.replace_all_uses_with(linear)
        for dead in dict.fromkeys((result, node)):
            gm.graph.erase_node(dead)
        if unflattened is not None and not flat.users:  # other readers keep the flat view
            gm.graph.erase_node(flat)
        originals.add(weight)
    for weight in originals:
        if not weight.users:  # the compiler keeps only weights some program reads
            gm.graph.erase_node(weight)
    return gm
