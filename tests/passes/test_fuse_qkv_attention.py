"""fuse_qkv_attention: Before/Expected on tiny Llama (RMSNorm, merged slices, rotary) and GPT-2
(LayerNorm, split, bias) decode graphs, the same step afterwards, and what it leaves alone."""

import torch
from torch import fx

from dsc import zoo
from dsc.frontend import trace
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call
from dsc.passes.manager import PassManager
from dsc.pipelines import trunk
from dsc.target import Target
from tests.passes.helpers import ops, run

BEFORE = ["kv_cache", "addmm_to_linear", "merge_projections", "fold_rotary_into_attention"]


def _decode_graph(name: str, passes: list[str] = BEFORE):
    from dsc.compiler import _load_passes

    _load_passes()
    model = zoo.build(name, init_std=0.3, seed=3)
    traced = trace(model, position_ids=True)
    ctx = PassContext(Target(max_batch=2, max_seq_len=16), traced.weights, traced.info,
                      traced.inputs)
    manager = PassManager(ctx)
    return manager, manager.run(traced.gm, trunk(ctx.target) + passes, program="decode")


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(torch.nn.Module(), graph)


def _decode_inputs(manager, start: int):
    g = torch.Generator().manual_seed(start)
    caches = [torch.randn(spec["shape"], generator=g) for spec in manager.ctx.notes["cache"]]
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[:, : start + 1] = True
    ids = torch.randint(3, 100, (2, 1), generator=g)
    return [ids, torch.ones(2, 1, dtype=torch.long), torch.full((2, 1), start), valid,
            torch.tensor([start]), *caches]


def _same_step(manager, gm, fused):
    inputs = _decode_inputs(manager, start=5)
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
    fused = manager.run(_copy(gm), ["fuse_qkv_attention"], program="decode")
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
    fused = manager.run(_copy(gm), ["fuse_qkv_attention"], program="decode")
    after = ops(fused)
    assert after["qkv_cached_attention"] == 2 and "cached_attention" not in after
    assert after["layer_norm"] == before["layer_norm"] - 2
    assert "split" not in after
    _same_step(manager, gm, fused)


def test_a_projection_read_elsewhere_is_not_fused():
    manager, gm = _decode_graph("tiny-llama")
    gm = _copy(gm)
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
    fused = manager.run(_copy(gm), ["fuse_qkv_attention"], program="decode")
    assert ops(fused) == before
