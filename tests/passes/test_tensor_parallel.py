"""tensor_parallel in one process: the pass run for rank 0 and rank 1 of tp=2 (or all 4 of tp=4).

One process has no peers, so dsc.all_reduce returns its input: each rank's graph computes that
rank's partial sum, and the ranks' outputs add up to the unpartitioned graph's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsc.passes.tensor_parallel  # noqa: F401  (registers)
from dsc.errors import TargetError
from dsc.passes.manager import PassManager
from tests.passes.helpers import context, export_fn, ops, run

torch.manual_seed(0)


def mlp(x, w1, w2):
    return F.linear(F.relu(F.linear(x, w1)), w2)


def _steps(gm) -> list[str]:
    """The graph as its sequence of ops: the structure Before/Expected compare."""
    return [
        getattr(n.target, "_opname", getattr(n.target, "__name__", str(n.target)))
        for n in gm.graph.nodes
        if n.op == "call_function"
    ]


def _partition(fn, inputs, weights, tp, rank):
    gm, weights = export_fn(fn, *inputs, weights=weights)
    ctx = context(weights, tp=tp)
    ctx.rank = rank
    gm = PassManager(ctx).run(gm, ["tensor_parallel"])
    return gm, ctx


def test_mlp_before_expected():
    x = torch.randn(3, 5, 8)
    weights = {"w1": torch.randn(12, 8), "w2": torch.randn(8, 12)}
    before, _ = export_fn(mlp, x, weights=weights)
    assert _steps(before) == ["linear", "relu", "linear"]
    outputs = []
    for rank in range(2):
        gm, ctx = _partition(mlp, [x], weights, tp=2, rank=rank)
        # Expected: the same ops on this rank's shards, then one all_reduce of the row product.
        assert _steps(gm) == ["linear", "relu", "linear", "all_reduce"]
        assert set(ctx.weights) == {f"w1.tp{rank}of2", f"w2.tp{rank}of2"}
        torch.testing.assert_close(ctx.weights[f"w1.tp{rank}of2"], weights["w1"].chunk(2, 0)[rank])
        torch.testing.assert_close(ctx.weights[f"w2.tp{rank}of2"], weights["w2"].chunk(2, 1)[rank])
        outputs.append(run(gm, ctx.weights, x)[0])
    torch.testing.assert_close(sum(outputs), mlp(x, weights["w1"], weights["w2"]))


def test_row_bias_rides_in_the_first_ranks_product():
    def biased(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    x = torch.randn(2, 4, 8)
    weights = {
        "w1": torch.randn(16, 8),
        "b1": torch.randn(16),
        "w2": torch.randn(8, 16),
        "b2": torch.randn(8),
    }
    outputs = []
    for rank in range(2):
        gm, ctx = _partition(biased, [x], weights, tp=2, rank=rank)
        # Expected: the row's bias inside its linear, nothing after the all_reduce (so the
        # residual add can join it), the bias itself on rank 0 only.
        assert _steps(gm) == ["linear", "gelu", "linear", "all_reduce"]
        assert ctx.weights[f"b1.tp{rank}of2"].shape == (8,)
        expected_b2 = weights["b2"] if rank == 0 else torch.zeros(8)
        torch.testing.assert_close(ctx.weights[f"b2.tp{rank}of2"], expected_b2)
        outputs.append(run(gm, ctx.weights, x)[0])
    torch.testing.assert_close(sum(outputs), biased(x, *weights.values()))


def test_conv1d_row_reduces_after_its_unflatten_view():
    # GPT-2's Conv1D: addmm(b, view(x, [-1, K]), W [K, N]) then view back to [B, S, N].
    def conv1d_mlp(x, w1, b1, w2, b2):
        b, s, h = x.shape
        up = F.gelu(torch.addmm(b1, x.view(-1, h), w1).view(b, s, -1))
        return torch.addmm(b2, up.view(-1, up.shape[-1]), w2).view(b, s, h)

    x = torch.randn(2, 3, 8)
    weights = {"w1": torch.randn(8, 16), "b1": torch.randn(16), "w2": torch.randn(16, 8),
               "b2": torch.randn(8)}
    before, _ = export_fn(conv1d_mlp, x, weights=weights)
    assert _steps(before) == ["view", "addmm", "view", "gelu", "view", "addmm", "view"]
    outputs = []
    for rank in range(2):
        gm, ctx = _partition(conv1d_mlp, [x], weights, tp=2, rank=rank)
        # Expected: the sum after the unflatten view, last, where a residual add would read it.
        assert _steps(gm) == ["view", "addmm", "view", "gelu", "view", "addmm", "view",
                              "all_reduce"]
        torch.testing.assert_close(ctx.weights[f"w2.tp{rank}of2"], weights["w2"].chunk(2, 0)[rank])
        outputs.append(run(gm, ctx.weights, x)[0])
    torch.testing.assert_close(sum(outputs), conv1d_mlp(x, *weights.values()))


def test_computed_row_bias_is_added_once_after_the_reduction():
    # Does not match: a bias computed in the graph has no rank-0 shard to carry it.
    def biased(x, w1, w2, b2):
        return F.linear(F.relu(F.linear(x, w1)), w2, b2 * 2)

    x = torch.randn(2, 4, 8)
    weights = {"w1": torch.randn(16, 8), "w2": torch.randn(8, 16), "b2": torch.randn(8)}
    outputs = []
    for rank in range(2):
        gm, ctx = _partition(biased, [x], weights, tp=2, rank=rank)
        assert _steps(gm) == ["linear", "relu", "mul", "linear", "all_reduce", "add"]
        # Summing partials adds the bias tp times in one process; a real all_reduce adds it once.
        outputs.append(run(gm, ctx.weights, x)[0] - 2 * weights["b2"])
    torch.testing.assert_close(sum(outputs) + 2 * weights["b2"], biased(x, *weights.values()))


def _attention(q_heads, kv_heads, explicit):
    d = 4

    def fn(x, wq, wk, wv, wo):
        b, s, _ = x.shape
        heads = (q_heads, kv_heads) if explicit else (-1, -1)
        q = F.linear(x, wq).view(b, s, heads[0], d).transpose(1, 2)
        k = F.linear(x, wk).view(b, s, heads[1], d).transpose(1, 2)
        v = F.linear(x, wv).view(b, s, heads[1], d).transpose(1, 2)
        a = torch.ops.dsc.attention(q, k, v, None, True, 0.5)
        return F.linear(a.transpose(1, 2).reshape(b, s, q_heads * d if explicit else -1), wo)

    weights = {
        "wq": torch.randn(q_heads * d, 16),
        "wk": torch.randn(kv_heads * d, 16),
        "wv": torch.randn(kv_heads * d, 16),
        "wo": torch.randn(16, q_heads * d),
    }
    return fn, weights


def test_attention_explicit_head_counts_are_divided():
    fn, weights = _attention(4, 4, explicit=True)
    x = torch.randn(2, 3, 16)
    outputs = []
    for rank in range(2):
        gm, ctx = _partition(fn, [x], weights, tp=2, rank=rank)
        views = [n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default]
        # 4 heads -> 2 per rank; the merged heads 16 -> 8
        assert [n.args[1][2] for n in views] == [2, 2, 2, 8]
        assert ops(gm)["all_reduce"] == 1
        outputs.append(run(gm, ctx.weights, x)[0])
    torch.testing.assert_close(sum(outputs), fn(x, *weights.values()))


def test_fewer_kv_heads_than_ranks_replicates_them():
    fn, weights = _attention(4, 2, explicit=False)
    x = torch.randn(2, 3, 16)
    outputs = []
    for rank in range(4):
        gm, ctx = _partition(fn, [x], weights, tp=4, rank=rank)
        # Query head `rank` reads KV head rank // 2: that head's rows, nothing else.
        kv_head = rank // 2
        torch.testing.assert_close(ctx.weights[f"wk.tp{rank}of4"], weights["wk"][4 * kv_head :][:4])
        assert ctx.weights[f"wq.tp{rank}of4"].shape == (4, 16)
        outputs.append(run(gm, ctx.weights, x)[0])
    torch.testing.assert_close(sum(outputs), fn(x, *weights.values()))


def _joined_heads(x, wq, w_out, join_dim=-1):
    # [B, S, 4 heads, 8] -> each head's first half scaled, joined back to its second half on
    # the last dim (a partial rotary's shape), or across heads with join_dim=2.
    h = F.linear(x, wq).view(2, 3, 4, 8)
    if join_dim == -1:
        h = torch.cat([h[..., :4] * 2.0, h[..., 4:]], dim=-1)
    else:
        h = torch.cat([h[:, :, :2] * 2.0, h[:, :, 2:]], dim=2)
    return F.linear(h.reshape(2, 3, 32), w_out)


def test_a_join_within_each_head_keeps_the_heads_cut():
    # Before: linear -> view -> slice, mul, slice -> cat(dim=-1) -> view -> linear.
    # Expected: the same on each rank's 2 heads (view sizes halved), then one all_reduce.
    x = torch.randn(2, 3, 16)
    weights = {"wq": torch.randn(32, 16), "w_out": torch.randn(16, 32)}
    outputs = []
    for rank in range(2):
        gm, ctx = _partition(_joined_heads, [x], weights, tp=2, rank=rank)
        assert ops(gm)["all_reduce"] == 1 and ops(gm)["cat"] == 1
        assert ctx.weights[f"wq.tp{rank}of2"].shape == (16, 16)
        outputs.append(run(gm, ctx.weights, x)[0])
    torch.testing.assert_close(sum(outputs), _joined_heads(x, *weights.values()))


def test_a_join_across_heads_does_not_match():
    def across(x, wq, w_out):
        return _joined_heads(x, wq, w_out, join_dim=2)

    x = torch.randn(2, 3, 16)
    weights = {"wq": torch.randn(32, 16), "w_out": torch.randn(16, 32)}
    gm, ctx = _partition(across, [x], weights, tp=2, rank=0)
    assert "all_reduce" not in ops(gm) and set(ctx.weights) == {"wq", "w_out"}


def test_projection_into_a_norm_does_not_match():
    def normed(x, w1, w2):
        h = F.layer_norm(F.linear(x, w1), (12,))
        return F.linear(h, w2)

    x = torch.randn(2, 3, 8)
    weights = {"w1": torch.randn(12, 8), "w2": torch.randn(8, 12)}
    gm, ctx = _partition(normed, [x], weights, tp=2, rank=1)
    assert "all_reduce" not in ops(gm)
    assert set(ctx.weights) == {"w1", "w2"}  # both stay whole on every rank


def _normed_heads(x, wq, norm_w, w_out, over_heads=False):
    # [B, S, 4 heads, 8], each head RMS-normalised (Qwen3's q norm), as dsc.rms_norm; or the
    # norm over all heads' features at once.
    h = F.linear(x, wq)
    if over_heads:
        return F.linear(torch.ops.dsc.rms_norm(h, None, 1e-6, h.dtype), w_out)
    h = h.view(2, 3, 4, 8)
    h = torch.ops.dsc.rms_norm(h, norm_w, 1e-6, h.dtype).type_as(h)  # as HF's norms end
    return F.linear(h.reshape(2, 3, 32), w_out)


def test_a_norm_within_each_head_keeps_the_heads_cut():
    # Before: linear -> view -> rms_norm -> type_as -> view -> linear.
    # Expected: the same on each rank's 2 heads (the norm's weight whole), one all_reduce.
    x = torch.randn(2, 3, 16)
    weights = {"wq": torch.randn(32, 16), "norm_w": torch.randn(8), "w_out": torch.randn(16, 32)}
    before, _ = export_fn(_normed_heads, x, weights=weights)
    assert ops(before)["rms_norm"] == 1
    outputs = []
    for rank in range(2):
        gm, ctx = _partition(_normed_heads, [x], weights, tp=2, rank=rank)
        assert ops(gm)["all_reduce"] == 1 and ops(gm)["rms_norm"] == 1
        assert ctx.weights[f"wq.tp{rank}of2"].shape == (16, 16)
        assert ctx.weights["norm_w"].shape == (8,)
        outputs.append(run(gm, ctx.weights, x)[0])
    torch.testing.assert_close(sum(outputs), _normed_heads(x, *weights.values()))


def test_a_norm_across_the_heads_does_not_match():
    def over_heads(x, wq, norm_w, w_out):
        return _normed_heads(x, wq, norm_w, w_out, over_heads=True)

    x = torch.randn(2, 3, 16)
    weights = {"wq": torch.randn(32, 16), "norm_w": torch.randn(8), "w_out": torch.randn(16, 32)}
    gm, ctx = _partition(over_heads, [x], weights, tp=2, rank=0)
    assert "all_reduce" not in ops(gm) and {"wq", "w_out"} <= set(ctx.weights)


def test_features_not_divisible_by_tp_is_a_target_error():
    x = torch.randn(2, 3, 8)
    weights = {"w1": torch.randn(6, 8), "w2": torch.randn(8, 6)}
    with pytest.raises(TargetError, match="cannot split the 6"):
        _partition(mlp, [x], weights, tp=4, rank=0)


def test_vocab_parallel_embedding_sums_to_the_lookup():
    def lookup(ids, table):
        return F.embedding(ids, table)

    ids = torch.randint(0, 11, (2, 5))
    weights = {"table": torch.randn(11, 4)}  # 11 rows: padded to 12, 6 per rank
    outputs = []
    for rank in range(2):
        gm, weights_ = export_fn(lookup, ids, weights=weights)
        next(n for n in gm.graph.nodes if n.op == "placeholder" and "dsc_input" in n.meta).meta[
            "dsc_input"
        ] = "input_ids"
        ctx = context(weights_, tp=2)
        ctx.rank = rank
        gm = PassManager(ctx).run(gm, ["tensor_parallel"])
        assert ctx.weights[f"table.tp{rank}of2"].shape == (6, 4)
        assert ops(gm)["all_reduce"] == 1
        outputs.append(run(gm, ctx.weights, ids)[0])
    torch.testing.assert_close(sum(outputs), lookup(ids, weights["table"]))


@pytest.mark.parametrize("name,rank", [("tiny-llama", 1), ("tiny-gpt2", 0)])
def test_whole_model_rank_shapes_and_collectives(name, rank):
    from dsc import zoo
    from dsc.compiler import _load_passes
    from dsc.frontend import trace
    from dsc.passes.context import PassContext
    from dsc.pipelines import cached, trunk
    from dsc.target import Target

    _load_passes()
    model = zoo.build(name)
    target = Target(tp=2, max_batch=4, max_seq_len=32)
    traced = trace(model, max_batch=4, max_seq_len=32, position_ids=True)
    layers = traced.info.num_layers
    ctx = PassContext(
        target=target, weights=traced.weights, info=traced.info, inputs=traced.inputs, rank=rank
    )
    manager = PassManager(ctx)
    gm = manager.run(traced.gm, trunk(target) + cached(target))
    full_cache = ctx.notes["cache"][0]["shape"]
    gm = manager.run(gm, ["tensor_parallel"])
    counts = ops(gm)
    assert counts["all_reduce"] == 2 * layers + 1  # attention and MLP per layer, the embedding
    assert counts["all_gather"] == 1  # the logits
    cache = ctx.notes["cache"][0]["shape"]
    assert cache[1] * 2 == full_cache[1] and cache[0] == full_cache[0]
    shard = f".tp{rank}of2"
    if name == "tiny-llama":
        assert ctx.weights["model.layers.0.self_attn.q_proj.weight" + shard].shape == (32, 64)
        assert ctx.weights["model.layers.0.mlp.down_proj.weight" + shard].shape == (64, 56)
        assert ctx.weights["model.embed_tokens.weight" + shard].shape == (106, 64)
        assert "model.layers.0.self_attn.q_proj.weight" not in ctx.weights
        assert ctx.weights["model.norm.weight"].shape == (64,)  # replicated
    else:
        # Conv1D: addmm(b, x, W[in, out]); c_attn's q, k and v thirds are cut separately.
        c_attn = ctx.weights["transformer.h.0.attn.c_attn.weight" + shard]
        whole = model.transformer.h[0].attn.c_attn.weight.detach()
        assert c_attn.shape == (64, 96)
        torch.testing.assert_close(
            c_attn, torch.cat([p.chunk(2, 1)[rank] for p in whole.chunk(3, 1)], 1)
        )
        assert ctx.weights["transformer.h.0.mlp.c_proj.weight" + shard].shape == (128, 64)
        assert ctx.weights["lm_head.weight" + shard].shape == (106, 64)  # tied with wte


@pytest.mark.parametrize("rank", [0, 1])
def test_latent_attention_cuts_its_heads_and_keeps_the_latent_whole(rank):
    # tiny-deepseek-v3 at tp=2: the query projection by heads, W_uk and W_uv (bmm operands)
    # by their head dim, the output projection by rows; the latent cache and its projection
    # whole on every rank (one kv head every query head reads).
    from dsc import zoo
    from dsc.compiler import _load_passes
    from dsc.frontend import trace
    from dsc.passes.context import PassContext
    from dsc.pipelines import cached, trunk
    from dsc.target import Target

    _load_passes()
    target = Target(tp=2, max_batch=4, max_seq_len=32)
    traced = trace(zoo.build("tiny-deepseek-v3"), max_batch=4, max_seq_len=32,
                   position_ids=True)
    ctx = PassContext(target=target, weights=traced.weights, info=traced.info,
                      inputs=traced.inputs, rank=rank)
    manager = PassManager(ctx)
    gm = manager.run(traced.gm, trunk(target) + cached(target) + ["tensor_parallel"])
    layer, shard = "model.layers.0.self_attn.", f".tp{rank}of2"
    kv_b = layer + "kv_b_proj.weight"
    assert ctx.weights[kv_b + ".dsc_key_absorbed" + shard].shape == (2, 16, 16)  # [H/2, dn, r]
    assert ctx.weights[kv_b + ".dsc_value_absorbed" + shard].shape == (2, 16, 16)  # [H/2, r, dv]
    assert ctx.weights[layer + "q_b_proj.weight" + shard].shape == (2 * 24, 32)
    assert ctx.weights[layer + "o_proj.weight" + shard].shape == (64, 2 * 16)
    assert ctx.weights[layer + "kv_a_proj_with_mqa.weight"].shape == (24, 64)  # replicated
    assert ctx.notes["cache"][0]["shape"] == [4, 1, 32, 24]
    # Each attention, the dense MLP, the routed and the shared experts (merge_all_reduces adds
    # those two later), the embedding.
    assert ops(gm)["all_reduce"] == 2 + 1 + 2 + 1
