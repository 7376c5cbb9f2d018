"""recurrent_state: linear-attention and Mamba-2 layers keep their state in buffers the runtime
owns.

A gated delta-net or Mamba-2 layer carries two states along the sequence: the last K - 1 inputs
of its causal convolution and the delta rule's (or the scan's) matrix per head. A decode step
needs both, as attention needs its KV cache. Matches (ops the frontend traces for HF's sequence mixers, see
`dsc.hub_functions`):

    y = dsc.causal_conv1d(x, w, bias, act)          x [B, C, L], w [C, K]
    o = dsc.gated_delta_rule(q, k, v, g, beta, l2)  q, k [B, L, H, Dk], v [B, L, H, Dv]
    y = dsc.ssm_scan(x, dt, A, B, C, D, ...)        x [B, L, H, P], B [B, L, G, N]

Rewrite to (new graph inputs, one state per op, named as cache entries so the runtime
allocates them with the KV cache; cache_start is the one kv_cache added):

    cache.conv_i:  [max_batch, C, K - 1]   (x's dtype)
    cache.delta_i: [max_batch, H, Dk, Dv]  (fp32, as the rule accumulates)
    cache.ssm_i:   [max_batch, H, N, P]    (fp32)
    y = dsc.cached_causal_conv1d(x, w, bias, cache.conv_i, cache_start, act)
    o = dsc.cached_gated_delta_rule(q, k, v, g, beta, cache.delta_i, cache_start, l2)
    y = dsc.cached_ssm_scan(x, dt, A, B, C, D, ..., cache.ssm_i, cache_start)

Both continue from their state unless cache_start is 0 (a prompt begins a sequence) and leave
the state at the step's last token, so prefill and decode share the graph as attention's do.

Does not match: a graph without cache_start (no causal attention, so no generation); the
forward program, which keeps the stateless ops.
Ordering: after kv_cache (its cache_start); before tensor_parallel (whose rule tables do not
name these ops: a linear-attention layer stays whole, replicated on every rank).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, fake_mode_of, is_op, replace_with, tensor_meta
from dsc.passes.kv_cache import cache_spec

__all__ = ["recurrent_state"]

dsc_ops = torch.ops.dsc


def _state_input(gm: fx.GraphModule, after: fx.Node, name: str, shape: tuple,
                 dtype: torch.dtype, device: torch.device) -> fx.Node:
    with fake_mode_of(gm):
        fake = torch.empty(shape, dtype=dtype, device=device)
    with gm.graph.inserting_after(after):
        node = gm.graph.placeholder(name.replace(".", "_"))
    node.meta.update(dsc_input=name, val=fake)
    return node


def _arg(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


@register("recurrent_state")
def recurrent_state(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    start = next((n for n in gm.graph.nodes if n.meta.get("dsc_input") == "cache_start"), None)
    mixers = [n for n in gm.graph.nodes
              if is_op(n, dsc_ops.causal_conv1d, dsc_ops.gated_delta_rule, dsc_ops.ssm_scan)]
    if start is None or not mixers:
        return gm
    max_batch = ctx.target.max_batch
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    convs = rules = scans = 0
    for node in mixers:
        if is_op(node, dsc_ops.causal_conv1d):
            x, weight = node.args[:2]
            bias, activation = _arg(node, 2, "bias", None), _arg(node, 3, "activation", "")
            xv, wv = tensor_meta(x), tensor_meta(weight)
            state = last = _state_input(gm, last, f"cache.conv_{convs}",
                                        (max_batch, xv.shape[1], wv.shape[1] - 1), xv.dtype,
                                        xv.device)
            convs += 1
            target = dsc_ops.cached_causal_conv1d.default
            args = (x, weight, bias, state, start, activation)
        elif is_op(node, dsc_ops.ssm_scan):
            xv, bv = tensor_meta(node.args[0]), tensor_meta(node.args[3])
            state = last = _state_input(gm, last, f"cache.ssm_{scans}",
                                        (max_batch, xv.shape[2], bv.shape[3], xv.shape[3]),
                                        torch.float32, xv.device)
            scans += 1
            target = dsc_ops.cached_ssm_scan.default
            args = (*node.args, state, start)
        else:
            q, k, v, g, beta = node.args[:5]
            l2norm = _arg(node, 5, "l2norm", True)
            qv, vv = tensor_meta(q), tensor_meta(v)
            state = last = _state_input(gm, last, f"cache.delta_{rules}",
                                        (max_batch, qv.shape[2], qv.shape[3], vv.shape[3]),
                                        torch.float32, qv.device)
            rules += 1
            target = dsc_ops.cached_gated_delta_rule.default
            args = (q, k, v, g, beta, state, start, l2norm)
        with gm.graph.inserting_after(node):
            new = call(gm.graph, target, args, like=node)
        replace_with(node, new)
    ctx.notes["cache"] = cache_spec(gm)
    return gm
