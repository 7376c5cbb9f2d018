"""kv_cache and merge_projections, Before/Expected on a tiny Llama's recognised graph."""

import torch

import dsc
from dsc import zoo
from dsc.frontend import trace
from dsc.passes.context import PassContext
from dsc.passes.manager import PassManager
from dsc.pipelines import trunk
from dsc.target import Target
from tests.passes.helpers import ops


def _recognised(name: str, **target):
    from dsc.compiler import _load_passes

    _load_passes()
    model = zoo.build(name)
    traced = trace(model, position_ids=True)
    ctx = PassContext(Target(**target), traced.weights, traced.info, traced.inputs)
    manager = PassManager(ctx)
    return manager, manager.run(traced.gm, trunk(ctx.target))


def test_kv_cache_before_expected():
    manager, gm = _recognised("tiny-llama", max_batch=3, max_seq_len=40)
    assert ops(gm)["attention"] == 2
    gm = manager.run(gm, ["kv_cache"], program="decode")
    assert ops(gm)["cached_attention"] == 2 and "attention" not in ops(gm)
    inputs = [n.meta["dsc_input"] for n in gm.graph.nodes if "dsc_input" in n.meta]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == ["kv_valid", "cache_start"] + [
        f"cache.{i}.{kv}" for i in range(2) for kv in "kv"
    ]
    # [max_batch, kv heads, max_seq, head dim]: GQA caches 2 heads, not 4
    assert manager.ctx.notes["cache"][0]["shape"] == [3, 2, 40, 16]


def test_kv_cache_leaves_encoders_alone():
    manager, gm = _recognised("tiny-bert")
    before = ops(gm)
    gm = manager.run(gm, ["kv_cache"], program="decode")
    assert ops(gm) == before and "cache" not in manager.ctx.notes


def test_merge_projections_before_expected():
    manager, gm = _recognised("tiny-llama")
    assert ops(gm)["linear"] == 2 * 7 + 1  # q k v o gate up down per layer + lm head
    gm = manager.run(gm, ["merge_projections"])
    # per layer: qkv (merged), o, gate_up (merged), down; plus the lm head
    assert ops(gm)["linear"] == 2 * 4 + 1
    merged = [w for w in manager.ctx.weights if w.startswith("merged:")]
    assert len(merged) == 4 and manager.ctx.weights[merged[0]].shape[0] == 64 + 2 * 32


def test_merge_projections_does_not_merge_different_inputs():
    manager, gm = _recognised("tiny-llama")
    gm = manager.run(gm, ["merge_projections"])
    outs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    # o_proj and down_proj read different tensors than any other linear: still separate
    assert all(len([u for u in n.args[0].users if u.target is n.target]) == 1 for n in outs)


def test_merge_projections_keeps_the_views_a_slice_allows():
    # Llama's q / k / v become slices of the merged product; splitting their last dim into
    # heads works on a slice, so those stay views (no copy).
    manager, gm = _recognised("tiny-llama")
    before = ops(gm)
    gm = manager.run(gm, ["merge_projections"])
    assert ops(gm)["view"] == before["view"] and "reshape" not in ops(gm) - before


def test_merge_projections_turns_a_view_a_slice_cannot_take_into_a_reshape():
    # Before: a = linear(x, Wa) [B, S, 8] viewed [B, S, 2, 4] then [B*S*2, 4] (fine on a
    # contiguous output); b = linear(x, Wb). Expected: one linear; a's second view, which a
    # strided slice cannot take, a reshape; the first one a view still; results unchanged.
    from tests.passes.helpers import context, export_fn, run

    def fn(x, w_a, w_b):
        a = torch.nn.functional.linear(x, w_a)
        a = a.view(x.shape[0], x.shape[1], 2, 4).view(-1, 4)
        return a * 2, torch.nn.functional.linear(x, w_b)

    weights = {"w_a": torch.randn(8, 6), "w_b": torch.randn(5, 6)}
    x = torch.randn(2, 3, 6)
    gm, weights = export_fn(fn, x, weights=weights)
    expected = run(gm, weights, x)
    ctx = context(weights)
    gm = PassManager(ctx).run(gm, ["merge_projections"])
    assert ops(gm)["linear"] == 1 and ops(gm)["reshape"] == 1 and ops(gm)["view"] == 1
    for got, want in zip(run(gm, ctx.weights, x), expected):
        torch.testing.assert_close(got, want)


def test_compiled_model_with_merged_projections_equals_eager():
    model = zoo.build("tiny-llama", init_std=0.2)
    compiled = dsc.compile(model, "cpu")
    assert any(w.startswith("merged:") for w in compiled.plan.weights)
    ids = torch.randint(0, 200, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_memory_plan_frees_each_buffer_after_its_last_reader():
    manager, gm = _recognised("tiny-llama", max_batch=2, max_seq_len=32)
    gm = manager.run(gm, ["memory_plan"])
    freed = [name for n in gm.graph.nodes for name in n.meta.get("dsc_free", [])]
    computed = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    kept = {n.name for n in (output if isinstance(output, (list, tuple)) else [output])}
    # Expected: every intermediate is freed exactly once; only the output survives.
    assert sorted(freed) == sorted(set(computed) - kept)
    peaks = manager.ctx.notes["peak_activation_bytes"]
    assert peaks["forward"] >= 2 * 32 * 211 * 4  # at least the [2, 32, vocab] fp32 logits


def test_plan_reports_peak_activation_bytes_and_steps_carry_free_lists():
    compiled = dsc.compile(zoo.build("tiny-llama"), dsc.Target(max_batch=2, max_seq_len=32))
    peaks = compiled.plan.model["peak_activation_bytes"]
    assert set(peaks) == {"forward", "prefill", "decode"}
    assert 0 < peaks["decode"] < peaks["prefill"]
    assert all("free" in step for step in compiled.plan.programs["decode"].steps)
    # report() and `dsc inspect` show it per entry point.
    assert f"peak activations {peaks['decode'] / 2**20:.1f} MiB" in compiled.report()
