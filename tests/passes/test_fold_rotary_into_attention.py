"""fold_rotary_into_attention: Before/Expected on a tiny Llama's decode graph, and what it leaves."""


import torch
from torch import fx

from dsc.passes.graph_utils import call
from tests.passes.helpers import copy_graph, decode_graph, decode_inputs, ops, run


def _decode_graph(name: str = "tiny-llama"):
    return decode_graph(name, ["kv_cache"])


def _first_attention_and_its_key(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node]:
    attention = next(n for n in gm.graph.nodes
                     if n.target is torch.ops.dsc.cached_attention.default)
    return attention, attention.args[1]


def test_fold_before_expected_and_same_step():
    manager, gm = _decode_graph()
    before = ops(gm)
    assert before["rotary"] == 2 * 2 and before["cached_attention"] == 2
    folded = manager.run(copy_graph(gm), ["fold_rotary_into_attention"], program="decode")
    after = ops(folded)
    assert after["rotary_cached_attention"] == 2
    assert "rotary" not in after and "cached_attention" not in after
    # The same step: logits and the caches it writes (the rotated new keys at slot 5).
    inputs = decode_inputs(manager, start=5)
    twin = [t.clone() for t in inputs]
    want = run(gm, manager.ctx.weights, *inputs)[0]
    got = run(folded, manager.ctx.weights, *twin)[0]
    torch.testing.assert_close(got, want)
    for a, b in zip(inputs[5:], twin[5:]):
        torch.testing.assert_close(a, b)


def test_a_rotated_key_read_elsewhere_is_not_folded():
    manager, gm = _decode_graph()
    gm = copy_graph(gm)
    attention, rotated_k = _first_attention_and_its_key(gm)
    with gm.graph.inserting_after(attention):
        extra = call(gm.graph, torch.ops.aten.neg.default, (rotated_k,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], extra),)
    folded = manager.run(gm, ["fold_rotary_into_attention"], program="decode")
    counts = ops(folded)
    # The other layer folds; this one keeps its rotations and its plain cached_attention.
    assert counts["rotary_cached_attention"] == 1 and counts["cached_attention"] == 1
    assert counts["rotary"] == 2


def test_models_without_rotary_are_left_alone():
    manager, gm = _decode_graph("tiny-gpt2")
    before = ops(gm)
    assert "rotary" not in before
    folded = manager.run(copy_graph(gm), ["fold_rotary_into_attention"], program="decode")
    assert ops(folded) == before


def test_rotations_with_different_tables_are_not_folded():
    manager, gm = _decode_graph()
    gm = copy_graph(gm)
    attention, rotated_k = _first_attention_and_its_key(gm)
    with gm.graph.inserting_before(rotated_k):
        other_cos = call(gm.graph, torch.ops.aten.neg.default, (rotated_k.args[1],))
    rotated_k.args = (rotated_k.args[0], other_cos, rotated_k.args[2])
    folded = manager.run(gm, ["fold_rotary_into_attention"], program="decode")
    counts = ops(folded)
    assert counts["rotary_cached_attention"] == 1 and counts["cached_attention"] == 1
