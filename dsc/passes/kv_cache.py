"""kv_cache: every causal `dsc::attention` reads and writes a KV cache owned by the runtime.

Matches:

    out = dsc.attention(q, k, v, valid, causal=True, scale)

Rewrite to (new graph inputs: one K and one V cache per attention, the cache's slot validity and
the slot of the first new token):

    k_cache_i: [max_batch, Hkv, max_seq, Dk]   v_cache_i: [max_batch, Hkv, max_seq, Dv]
    kv_valid:  [B, max_seq] bool               cache_start: int64 [1]
    out = dsc.cached_attention(q, k, v, k_cache_i, v_cache_i, kv_valid, cache_start, True, scale)

When the values are the keys' first lanes (absorbed latent attention: k = cat([c, k_rot]),
v = c), the value cache is those lanes of the key cache (`view_of` in the cache spec): one
latent row a token, not two.
A sliding window (`window=w`) stays on the new node, and its caches hold w slots, not max_seq:
a ring where position p lives in slot p % w (`dsc.ops.attention.cached_attention`), since no
query of the layer reads further back. kv_valid stays indexed by position.
The same graph serves both entry points: prefill (S prompt tokens at slots 0..S-1) and decode
(one token per sequence at slot `cache_start`). Positions come from the `position_ids` input, so a
left-padded sequence rotates by its own positions, not by the padded index.

Does not match: bidirectional attention (encoders have no cache), attention the recognisers left
as aten ops — the pass refuses those with an error naming the node.
Ordering: after recognize_attention and recognize_rotary; before tensor_parallel and fuse.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsc.errors import UnsupportedOpError
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, fake_mode_of, is_op, replace_with, tensor_meta

__all__ = ["kv_cache", "cache_spec"]

aten = torch.ops.aten


def _placeholder(gm: fx.GraphModule, after: fx.Node, name: str, fake) -> fx.Node:
    with gm.graph.inserting_after(after):
        node = gm.graph.placeholder(name.replace(".", "_"))
    node.meta["dsc_input"] = name
    node.meta["val"] = fake
    return node


def cache_spec(gm: fx.GraphModule) -> list[dict]:
    """[{name, shape, dtype[, view_of]}] of the cache inputs a cached graph takes, in
    placeholder order; `view_of` names the cache whose first lanes this one is."""
    spec = []
    for node in gm.graph.nodes:
        name = node.meta.get("dsc_input", "") if node.op == "placeholder" else ""
        if name.startswith("cache."):
            val = node.meta["val"]
            entry = {"name": name, "shape": list(val.shape), "dtype": str(val.dtype)}
            if "dsc_cache_view_of" in node.meta:
                entry["view_of"] = node.meta["dsc_cache_view_of"]
            spec.append(entry)
    return spec


def _values_lead_the_keys(k: fx.Node, v: fx.Node) -> bool:
    """k = cat([v, ...], -1) with v of k's batch, heads and length: v's cache can be k's
    first lanes."""
    if not is_op(k, aten.cat) or k.args[0][0] is not v:
        return False
    dim = k.args[1] if len(k.args) > 1 else 0
    kv, vv = tensor_meta(k), tensor_meta(v)
    return kv is not None and vv is not None and dim in (-1, kv.dim() - 1) and (
        [str(s) for s in kv.shape[:-1]] == [str(s) for s in vv.shape[:-1]])


@register("kv_cache")
def kv_cache(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in gm.graph.nodes:
        if is_op(node, aten.scaled_dot_product_attention):
            raise UnsupportedOpError(
                f"attention node {node.name} was not recognised (its mask is neither causal nor "
                f"bidirectional padding), so it cannot use the KV cache; source: "
                f"{node.meta.get('stack_trace', '?').strip().splitlines()[-1]}"
            )
    attentions = [n for n in gm.graph.nodes if is_op(n, torch.ops.dsc.attention)]
    if not attentions or not all(n.args[4] for n in attentions):
        return gm  # an encoder: no generation, no cache
    mode = fake_mode_of(gm)
    ids = next(n for n in gm.graph.nodes if n.meta.get("dsc_input") == "input_ids")
    batch = ids.meta["val"].shape[0]
    max_batch, max_seq = ctx.target.max_batch, ctx.target.max_seq_len
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with mode:
        device = ids.meta["val"].device
        valid_fake = torch.empty((batch, max_seq), dtype=torch.bool, device=device)
        start_fake = torch.empty((1,), dtype=torch.int64, device=device)
    valid = last = _placeholder(gm, last, "kv_valid", valid_fake)
    start = last = _placeholder(gm, last, "cache_start", start_fake)
    for layer, node in enumerate(attentions):
        q, k, v, _, causal, scale = node.args
        # Keys and values may differ in head size (DeepSeek's MLA: 192 and 128); a layer
        # attending within a window keeps that many slots.
        window = node.kwargs.get("window", 0)
        slots = window if 0 < window < max_seq else max_seq
        with mode:
            k_fake, v_fake = (
                torch.empty((max_batch, t.shape[1], slots, t.shape[3]), dtype=t.dtype,
                            device=t.device)
                for t in (tensor_meta(k), tensor_meta(v))
            )
        k_cache = last = _placeholder(gm, last, f"cache.{layer}.k", k_fake)
        v_cache = last = _placeholder(gm, last, f"cache.{layer}.v", v_fake)
        if _values_lead_the_keys(k, v):
            v_cache.meta["dsc_cache_view_of"] = f"cache.{layer}.k"
        with gm.graph.inserting_after(node):
            new = call(
                gm.graph, torch.ops.dsc.cached_attention.default,
                (q, k, v, k_cache, v_cache, valid, start, causal, scale), dict(node.kwargs),
                like=node,
            )
        replace_with(node, new)
    ctx.notes["cache"] = cache_spec(gm)
    return gm
