"""prefetch_next_weight: Before/Expected on tiny Llama and GPT-2 decode graphs, and what it
leaves alone."""

import torch
from torch import fx

from dsc.passes.graph_utils import call, weight_name
from tests.passes.helpers import copy_graph, decode_graph, decode_inputs, ops, run

dsc_ops = torch.ops.dsc
_ATTENTIONS = (dsc_ops.cached_attention.default, dsc_ops.rotary_cached_attention.default)


def _attentions(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target in _ATTENTIONS]


def _prefetch_pass(name: str, passes: list[str]):
    manager, gm = decode_graph(name, passes)
    return manager, gm, manager.run(copy_graph(gm), ["prefetch_next_weight"], program="decode")


def _out_projection_weight(attention: fx.Node) -> str:
    """The weight of the first linear after the attention, walking its users forward."""
    node = attention
    while True:
        node = node.next
        if node.target is torch.ops.aten.linear.default:
            return weight_name(node.args[1])


def test_before_expected_names_each_layers_output_projection_and_keeps_the_step():
    manager, before, after = _prefetch_pass("tiny-llama", ["kv_cache", "merge_projections"])
    assert ops(after) == ops(before)  # an operand added, no node
    attentions = _attentions(after)
    assert len(attentions) == 2
    for attention in attentions:
        prefetch = attention.kwargs["prefetch"]
        assert weight_name(prefetch) == _out_projection_weight(attention)
        assert weight_name(prefetch).endswith("o_proj.weight")
    for attention in _attentions(before):
        assert "prefetch" not in attention.kwargs
    # The same step: logits and the caches written.
    inputs = decode_inputs(manager, start=5)
    twin = [t.clone() for t in inputs]
    want = run(before, manager.ctx.weights, *inputs)[0]
    got = run(after, manager.ctx.weights, *twin)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(inputs[5:], twin[5:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gpt2_names_its_conv1d_projection():
    _, _, after = _prefetch_pass("tiny-gpt2", ["kv_cache", "addmm_to_linear"])
    for attention in _attentions(after):
        assert weight_name(attention.kwargs["prefetch"]).endswith("attn.c_proj.weight")


def test_an_attention_with_no_weight_after_it_gets_none():
    manager, gm = decode_graph("tiny-llama", ["kv_cache"])
    gm = copy_graph(gm)
    last = _attentions(gm)[-1]
    # Every weight read after the last attention is cut off: the output is the attention's own.
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((last, *out.args[0][1:]),)
    gm.graph.eliminate_dead_code()
    after = manager.run(gm, ["prefetch_next_weight"], program="decode")
    first, second = _attentions(after)
    assert weight_name(first.kwargs["prefetch"]).endswith("o_proj.weight")
    assert "prefetch" not in second.kwargs


def test_an_existing_prefetch_operand_is_kept():
    manager, gm = decode_graph("tiny-llama", ["kv_cache"])
    gm = copy_graph(gm)
    first = _attentions(gm)[0]
    chosen = next(n for n in gm.graph.nodes
                  if weight_name(n) is not None and n.meta["val"].dim() == 2)
    first.update_kwarg("prefetch", chosen)
    after = manager.run(gm, ["prefetch_next_weight"], program="decode")
    first, second = _attentions(after)
    assert first.kwargs["prefetch"] is chosen
    assert weight_name(second.kwargs["prefetch"]).endswith("o_proj.weight")


def test_vectors_are_not_weights_to_prefetch():
    # A norm weight (one dimension) read right after the attention is passed over.
    manager, gm = decode_graph("tiny-llama", ["kv_cache"])
    gm = copy_graph(gm)
    attention = _attentions(gm)[0]
    vector = next(n for n in gm.graph.nodes
                  if weight_name(n) is not None and n.meta["val"].dim() == 1)
    with gm.graph.inserting_after(attention):
        extra = call(gm.graph, torch.ops.aten.neg.default, (vector,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], extra),)
    after = manager.run(gm, ["prefetch_next_weight"], program="decode")
    assert weight_name(_attentions(after)[0].kwargs["prefetch"]).endswith("o_proj.weight")
