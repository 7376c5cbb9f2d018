"""merge_projections: linears that read the same input become one linear over stacked weights.

Matches (same x, weights are graph inputs of one dtype and the same in-features; all with a bias
or all without):

    q = linear(x, Wq, bq);  k = linear(x, Wk, bk);  v = linear(x, Wv, bv)

Rewrite to (one weight stream per layer instead of three; the paper's QKV and gate/up GEMMs):

    qkv = linear(x, W_qkv, b_qkv)          W_qkv = cat([Wq, Wk, Wv]) as a new weight
    q = slice(qkv, -1, 0, nq);  k = slice(qkv, -1, nq, nq + nk);  v = slice(qkv, -1, nq + nk, end)

A slice of qkv is strided where the projection's own output was contiguous: a `view` after it
that would need the contiguous layout (Qwen3.5's gate: [B, S, 64] -> [B, S, 4, 16] ->
[B*S*4, 16]) becomes a `reshape`, found by replaying the layout ops after each slice on a
strided tensor of example sizes; the views that work on the slice (Llama's q -> [B, S, H, D])
stay views.

Does not match: linears of different inputs, a weight computed in the graph, mixed bias/no bias.
Ordering: after tensor_parallel (which shards q/k/v separately), before kernel selection. The
original weights are dropped from the plan when nothing else reads them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, fake_mode_of, is_op, set_meta, tensor_meta, weight_name

__all__ = ["merge_projections"]

aten = torch.ops.aten


def _group(x: fx.Node) -> list[fx.Node]:
    linears = [u for u in x.users if is_op(u, aten.linear) and u.args[0] is x]
    linears = [u for u in linears if weight_name(u.args[1]) is not None]
    with_bias = [u for u in linears if len(u.args) > 2 and u.args[2] is not None]
    if with_bias and len(with_bias) != len(linears):
        return []
    if with_bias and any(weight_name(u.args[2]) is None for u in linears):
        return []
    dtypes = {u.args[1].meta["val"].dtype for u in linears}
    k = {u.args[1].meta["val"].shape[1] for u in linears}
    return linears if len(linears) > 1 and len(dtypes) == 1 and len(k) == 1 else []


def _new_weight(gm, ctx, nodes: list[fx.Node], name: str, mode) -> fx.Node:
    tensors = [ctx.weights[weight_name(n)] for n in nodes]
    merged = torch.cat(tensors, dim=0)
    ctx.weights[name] = merged
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_before(first):
        node = gm.graph.placeholder(name.replace(".", "_").replace(":", "_").replace("+", "_"))
    node.meta["dsc_weight"] = name
    with mode:
        node.meta["val"] = torch.empty(merged.shape, dtype=merged.dtype,
                                       device=nodes[0].meta["val"].device)
    return node


_LAYOUT = (aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze,
           aten.transpose, aten.permute, aten.expand, aten.slice, aten.select, aten.split,
           aten.split_with_sizes, aten.alias)
_VIEWS = (aten.view, aten._unsafe_view)


def _example_sizes(node: fx.Node, bump: int) -> dict:
    """Each symbol of the graph's sizes at its traced example value (at least 2) + bump."""
    val = tensor_meta(node)
    env = next((d.node.shape_env for d in val.shape if isinstance(d, torch.SymInt)), None)
    if env is None:
        return {}
    examples = getattr(env, "backed_var_to_val", None) or env.var_to_val
    return {sym: max(2, int(v)) + bump for sym, v in examples.items()}


def _concrete(arg, sizes: dict):
    if isinstance(arg, fx.Node):
        arg = arg.meta.get("val")
    if isinstance(arg, (list, tuple)):
        return type(arg)(_concrete(a, sizes) for a in arg)
    if isinstance(arg, torch.SymInt):
        return int(arg.node.expr.xreplace(sizes))
    return arg


def _views_needing_contiguity(part: fx.Node) -> set[fx.Node]:
    """The view nodes after `part` (through layout ops only) that fail on its strided layout at
    example sizes; each replays as a reshape so the ones after it see what they will get."""
    failing: set[fx.Node] = set()
    for bump in (0, 1):  # two sizes, so a size of one cannot hide a stride
        sizes = _example_sizes(part, bump)
        try:
            merged_shape = _concrete(list(tensor_meta(part.args[0]).shape), sizes)
            lo, hi = part.args[2], part.args[3]
            start = torch.empty(merged_shape)[..., lo:hi]
        except (TypeError, ValueError, RuntimeError):
            return failing  # sizes it cannot make concrete: leave the graph as it is
        stack = [(part, start)]
        while stack:
            node, value = stack.pop()
            for user in node.users:
                if user.op != "call_function":
                    continue
                if user.target is operator.getitem and isinstance(value, (list, tuple)):
                    stack.append((user, value[user.args[1]]))
                    continue
                if not is_op(user, *_LAYOUT) or user.args[0] is not node:
                    continue
                args = _concrete(user.args[1:], sizes)
                try:
                    out = user.target(value, *args)
                except RuntimeError:
                    if not is_op(user, *_VIEWS):
                        continue
                    failing.add(user)
                    out = aten.reshape.default(value, *args)
                stack.append((user, out))
    return failing


@register("merge_projections")
def merge_projections(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    mode = fake_mode_of(gm)
    for x in list(gm.graph.nodes):
        linears = _group(x)
        if not linears:
            continue
        linears.sort(key=lambda n: list(gm.graph.nodes).index(n))
        weights = [u.args[1] for u in linears]
        name = "merged:" + "+".join(weight_name(w) for w in weights)
        weight = _new_weight(gm, ctx, weights, name, mode)
        bias = None
        if len(linears[0].args) > 2 and linears[0].args[2] is not None:
            bias = _new_weight(gm, ctx, [u.args[2] for u in linears], name + ".bias", mode)
        with gm.graph.inserting_before(linears[0]):
            merged = call(gm.graph, aten.linear.default, (x, weight, bias), like=linears[0])
            offset = 0
            for lin in linears:
                width = lin.args[1].meta["val"].shape[0]
                part = call(gm.graph, aten.slice.Tensor, (merged, -1, offset, offset + width))
                offset += width
                lin.replace_all_uses_with(part)
        for lin in linears:
            gm.graph.erase_node(lin)
        for part in merged.users:
            for view in _views_needing_contiguity(part):
                view.target = aten.reshape.default
                set_meta(view)
    gm.graph.eliminate_dead_code()
    used = {n.meta["dsc_weight"] for n in gm.graph.nodes if n.op == "placeholder" and "dsc_weight" in n.meta}
    for node in [n for n in gm.graph.nodes if n.op == "placeholder" and "dsc_weight" in n.meta and not n.users]:
        gm.graph.erase_node(node)
    ctx.notes.setdefault("unused_weights", set()).update(set(ctx.weights) - used)
    return gm
