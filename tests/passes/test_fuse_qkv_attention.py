"""fuse_qkv_attention: Before/Expected on tiny Llama (RMSNorm, merged slices, rotary) and GPT-2
(LayerNorm, split, bias) decode graphs, the same step afterwards, and what it leaves alone."""

import torch

from dsc.passes.graph_utils import call
from tests.passes.helpers import copy_graph, decode_graph, decode_inputs, ops, run

BEFORE = ["kv_cache", "addmm_to_linear", "merge_projections", "fold_rotary_into_attention"]


def _decode_graph(name: str, passes: list[str] = BEFORE):
    return decode_graph(name, passes)


def _same_step(manager, gm, fused):
    inputs = decode_inputs(manager, start=5)
    twin = [t.clone() for t in inputs]
    want = run(gm, manager.ctx.weights, *inputs)[0]
    got = run(fused, manager.ctx.weights, *twin)[0]
    torch.testing.assert_close(got, want)
    for a, b in zip(inputs[5:], twin[5:]):  # the caches it wrote
        torch.testing.assert_close(a, b)


def test_llama_before_expected_and_same_step():
    manager, gm = _decode_graph("tiny-llama")
    before = ops(gm)
    assert before["rotary_cached_attention"] == 2
    fused = manager.run(copy_graph(gm), ["fuse_qkv_attention"], program="decode")
    after = ops(fused)
    assert after["qkv_cached_attention"] == 2 and "rotary_cached_attention" not in after
    # The two input norms and the two QKV projections went into the op; the MLP's stay.
    assert after["rms_norm"] == before["rms_norm"] - 2
    assert after["linear"] == before["linear"] - 2
    assert "slice" not in after or after["slice"] < before["slice"]
    _same_step(manager, gm, fused)


def test_gpt2_layer_norm_split_and_bias_same_step():
    manager, gm = _decode_graph("tiny-gpt2")
    before = ops(gm)
    assert before["cached_attention"] == 2
    fused = manager.run(copy_graph(gm), ["fuse_qkv_attention"], program="decode")
    after = ops(fused)
    assert after["qkv_cached_attention"] == 2 and "cached_attention" not in after
    assert after["layer_norm"] == before["layer_norm"] - 2
    assert "split" not in after
    _same_step(manager, gm, fused)


def test_a_projection_read_elsewhere_is_not_fused():
    manager, gm = _decode_graph("tiny-llama")
    gm = copy_graph(gm)
    attention = next(n for n in gm.graph.nodes
                     if n.target is torch.ops.dsc.rotary_cached_attention.default)
    projection = attention.args[0].args[0].args[0].args[0]  # transpose <- view <- slice <- linear
    assert projection.target is torch.ops.aten.linear.default
    with gm.graph.inserting_after(projection):
        extra = call(gm.graph, torch.ops.aten.neg.default, (projection,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], extra),)
    counts = ops(manager.run(gm, ["fuse_qkv_attention"], program="decode"))
    assert counts["qkv_cached_attention"] == 1 and counts["rotary_cached_attention"] == 1


def test_separate_q_k_v_projections_are_not_fused():
    # Without merge_projections q, k and v come from three linears: nothing to match.
    manager, gm = _decode_graph("tiny-llama", [p for p in BEFORE if p != "merge_projections"])
    before = ops(gm)
    fused = manager.run(copy_graph(gm), ["fuse_qkv_attention"], program="decode")
    assert ops(fused) == before
