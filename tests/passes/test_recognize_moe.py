import torch
import torch.nn.functional as F

from dsc import frontend, zoo
from dsc.passes.graph_utils import weight_name
from dsc.passes.manager import PassManager
from dsc.passes.recognize_moe import recognize_moe  # noqa: F401  (registers)
from tests.passes.helpers import context, export_fn, ops, run

E, H, FFN, K = 4, 8, 6, 2


def _route(t, router, renormalise=True):
    probs = torch.softmax(F.linear(t, router), dim=-1)
    w, idx = torch.topk(probs, K)
    if renormalise:
        w = w / w.sum(-1, keepdim=True)
    return torch.zeros(t.shape[0], E).scatter(1, idx, w)  # [T, E] routing weights


def moe_h_2f(x, router, gate_up, down):
    """Dense MoE, gate_up stored [E, H, 2F] (gate columns then up), down [E, F, H]."""
    t = x.reshape(-1, H)
    dense = _route(t, router)
    gate, up = torch.einsum("th,ehf->etf", t, gate_up).chunk(2, dim=-1)
    y = torch.einsum("etf,efh->eth", F.silu(gate) * up, down)
    return torch.einsum("eth,te->th", y, dense).reshape(x.shape)


def moe_separate_gelu(x, router, w_gate, w_up, w_down):
    """Gate, up [E, F, H] and down [E, H, F] as three tensors; GeGLU; no renormalisation."""
    t = x.reshape(-1, H)
    dense = _route(t, router, renormalise=False)
    gate = torch.einsum("th,efh->etf", t, w_gate)
    up = torch.einsum("th,efh->etf", t, w_up)
    y = torch.einsum("etf,ehf->eth", F.gelu(gate) * up, w_down)
    return torch.einsum("eth,te->th", y, dense).reshape(x.shape)


def moe_softmax_after_topk(x, router, gate_up, down):
    """Softmax over the top-k logits (Mixtral's original spelling); dsc's own weight layout."""
    t = x.reshape(-1, H)
    w, idx = torch.topk(F.linear(t, router), K)
    dense = torch.zeros(t.shape[0], E).scatter(1, idx, torch.softmax(w, dim=-1))
    gate, up = torch.einsum("th,efh->etf", t, gate_up).chunk(2, dim=-1)
    y = torch.einsum("etf,ehf->eth", F.silu(gate) * up, down)
    return torch.einsum("eth,te->th", y, dense).reshape(x.shape)


def moe_gpt_oss(x, router, router_bias, gate_up, gate_up_bias, down, down_bias, limit=7.0):
    """GPT-OSS: a router bias, softmax over the top-k logits; gate_up [E, H, 2F] with gate and
    up interleaved, down [E, F, H], each with a bias; the clamped SwiGLU."""
    t = x.reshape(-1, H)
    w, idx = torch.topk(F.linear(t, router, router_bias), K)
    dense = torch.zeros(t.shape[0], E).scatter(1, idx, torch.softmax(w, dim=-1))
    gu = torch.einsum("th,ehf->etf", t, gate_up) + gate_up_bias[:, None]
    gate, up = gu[..., ::2].clamp(max=limit), gu[..., 1::2].clamp(-limit, limit)
    h = gate * torch.sigmoid(gate * 1.702) * (up + 1)
    y = torch.einsum("etf,efh->eth", h, down) + down_bias[:, None]
    return torch.einsum("eth,te->th", y, dense).reshape(x.shape)


def moe_grouped_sigmoid(x, router, selection_bias, gate_up, down, group_score="top2"):
    """DeepSeek-V3 / GLM-4.5 routing: sigmoid scores, a selection bias, 2 groups of which the
    one with the best two experts (group_score="max": the best one, DeepSeek-V2; "min": the
    worst one, which no model does) is kept, weights
    renormalised and scaled by 2.5; experts in dsc's own layout."""
    t = x.reshape(-1, H)
    scores = torch.sigmoid(F.linear(t, router))
    choice = scores + selection_bias
    by_group = choice.view(-1, 2, E // 2)
    if group_score == "top2":
        group_scores = by_group.topk(2, dim=-1)[0].sum(dim=-1)
    elif group_score == "max":
        group_scores = by_group.max(dim=-1).values
    else:
        group_scores = by_group.min(dim=-1).values
    keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(1, dim=-1)[1], 1)
    mask = keep.unsqueeze(-1).expand(-1, 2, E // 2).reshape(-1, E).bool()
    idx = choice.masked_fill(~mask, float("-inf")).topk(K, dim=-1)[1]
    w = scores.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * 2.5
    dense = torch.zeros(t.shape[0], E).scatter(1, idx, w)
    gate, up = torch.einsum("th,efh->etf", t, gate_up).chunk(2, dim=-1)
    y = torch.einsum("etf,ehf->eth", F.silu(gate) * up, down)
    return torch.einsum("eth,te->th", y, dense).reshape(x.shape)


def moe_softmax_selection_bias(x, router, selection_bias, gate_up, down):
    """ERNIE 4.5: softmax scores, a [1, E] bias that only steers the choice, renormalised."""
    t = x.reshape(-1, H)
    probs = torch.softmax(F.linear(t, router), dim=-1)
    idx = (probs + selection_bias).topk(K, dim=-1)[1]
    w = probs.gather(1, idx)
    dense = torch.zeros(t.shape[0], E).scatter(1, idx, w / w.sum(-1, keepdim=True))
    gate, up = torch.einsum("th,efh->etf", t, gate_up).chunk(2, dim=-1)
    y = torch.einsum("etf,ehf->eth", F.silu(gate) * up, down)
    return torch.einsum("eth,te->th", y, dense).reshape(x.shape)


def _gpt_oss_weights():
    weights = _weights(router=(E, H), router_bias=(E,), gate_up=(E, H, 2 * FFN),
                       gate_up_bias=(E, 2 * FFN), down=(E, FFN, H), down_bias=(E, H))
    weights["gate_up"] = weights["gate_up"] * 8  # sums past the clamp's limit
    return weights


def _weights(**shapes):
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(s, generator=gen) * 0.5 for k, s in shapes.items()}


def _moe_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.dsc.moe.default]


def _recognise(fn, weights):
    x = torch.randn(2, 3, H)
    gm, weights = export_fn(fn, x, weights=weights)
    ctx = context(weights)
    gm = PassManager(ctx).run(gm, ["recognize_moe"])
    return gm, ctx, x


def test_moe_other_layout_before_expected():
    weights = _weights(router=(E, H), gate_up=(E, H, 2 * FFN), down=(E, FFN, H))
    gm, ctx, x = _recognise(moe_h_2f, weights)
    # Expected: view -> dsc.moe -> view; the expert weights re-laid out as dsc wants them.
    assert ops(gm) == {"view": 2, "moe": 1}
    (node,) = _moe_nodes(gm)
    assert node.args[4:] == (K, True, "silu") and not node.kwargs  # no biases
    assert sorted(ctx.weights) == ["down.dsc_down", "gate_up.dsc_gate_up", "router"]
    assert ctx.weights["gate_up.dsc_gate_up"].shape == (E, 2 * FFN, H)
    assert ctx.weights["down.dsc_down"].shape == (E, H, FFN)
    expected = moe_h_2f(x, *weights.values())
    torch.testing.assert_close(run(gm, ctx.weights, x)[0], expected, atol=1e-5, rtol=0)


def test_moe_separate_gate_up_gelu_no_renormalise():
    weights = _weights(router=(E, H), w_gate=(E, FFN, H), w_up=(E, FFN, H), w_down=(E, H, FFN))
    gm, ctx, x = _recognise(moe_separate_gelu, weights)
    (node,) = _moe_nodes(gm)
    assert node.args[4:7] == (K, False, "gelu")
    # gate and up were concatenated into one new weight; down was already in dsc's layout.
    assert sorted(ctx.weights) == ["router", "w_down", "w_gate.dsc_gate_up"]
    expected = moe_separate_gelu(x, *weights.values())
    torch.testing.assert_close(run(gm, ctx.weights, x)[0], expected, atol=1e-5, rtol=0)


def test_moe_softmax_after_topk_keeps_weights():
    weights = _weights(router=(E, H), gate_up=(E, 2 * FFN, H), down=(E, H, FFN))
    gm, ctx, x = _recognise(moe_softmax_after_topk, weights)
    (node,) = _moe_nodes(gm)
    # Softmax over the chosen logits is softmax-then-renormalise.
    assert node.args[4:7] == (K, True, "silu")
    assert sorted(ctx.weights) == ["down", "gate_up", "router"]
    expected = moe_softmax_after_topk(x, *weights.values())
    torch.testing.assert_close(run(gm, ctx.weights, x)[0], expected, atol=1e-5, rtol=0)


def test_moe_with_biases_and_a_clamped_swiglu_before_expected():
    weights = _gpt_oss_weights()
    gm, ctx, x = _recognise(moe_gpt_oss, weights)
    # Expected: dsc.moe with the router's and the experts' biases; gate_up and its bias
    # de-interleaved into dsc's gate-then-up order, down transposed.
    (node,) = _moe_nodes(gm)
    assert node.args[4:7] == (K, True, "clamped_swiglu")
    assert {k: weight_name(a) for k, a in node.kwargs.items()} == {
        "router_bias": "router_bias", "gate_up_bias": "gate_up_bias.dsc_gate_up_bias",
        "down_bias": "down_bias"}
    assert sorted(ctx.weights) == ["down.dsc_down", "down_bias", "gate_up.dsc_gate_up",
                                   "gate_up_bias.dsc_gate_up_bias", "router", "router_bias"]
    torch.testing.assert_close(run(gm, ctx.weights, x)[0], moe_gpt_oss(x, *weights.values()),
                               atol=1e-5, rtol=0)


def test_a_clamp_at_another_limit_does_not_match():
    def limit_5(*args):
        return moe_gpt_oss(*args, limit=5.0)

    gm, _, _ = _recognise(limit_5, _gpt_oss_weights())
    assert not _moe_nodes(gm) and ops(gm)["topk"] == 1


def test_group_limited_sigmoid_routing_before_expected():
    # Expected: dsc.moe with scoring="sigmoid", the selection bias, groups=2 (one kept), the
    # 2.5 scale; renormalised (the 1e-20 in the denominator is below any tolerance).
    weights = _weights(router=(E, H), selection_bias=(E,), gate_up=(E, 2 * FFN, H),
                       down=(E, H, FFN))
    gm, ctx, x = _recognise(moe_grouped_sigmoid, weights)
    (node,) = _moe_nodes(gm)
    assert node.args[4:] == (K, True, "silu")
    assert {k: weight_name(v) if hasattr(v, "meta") else v for k, v in node.kwargs.items()} == {
        "selection_bias": "selection_bias", "scoring": "sigmoid", "groups": 2,
        "group_top_k": 1, "scale": 2.5}
    torch.testing.assert_close(run(gm, ctx.weights, x)[0],
                               moe_grouped_sigmoid(x, *weights.values()), atol=1e-5, rtol=0)


def test_groups_scored_by_their_best_expert_alone_before_expected():
    # DeepSeek-V2's group score (the best expert, not the best two): group_scoring="max". The
    # two readings pick the same experts on most tokens; the routing probe's many tell them apart.
    def by_max(*args):
        return moe_grouped_sigmoid(*args, group_score="max")

    weights = _weights(router=(E, H), selection_bias=(E,), gate_up=(E, 2 * FFN, H),
                       down=(E, H, FFN))
    gm, ctx, x = _recognise(by_max, weights)
    (node,) = _moe_nodes(gm)
    assert node.kwargs["groups"] == 2 and node.kwargs["group_scoring"] == "max"
    torch.testing.assert_close(run(gm, ctx.weights, x)[0], by_max(x, *weights.values()),
                               atol=1e-5, rtol=0)


def test_groups_scored_by_their_worst_expert_do_not_match():
    # A group ranked by its worst expert: dsc.moe cannot express it, and the probe finds no
    # routing that picks the block's experts.
    def by_min(*args):
        return moe_grouped_sigmoid(*args, group_score="min")

    weights = _weights(router=(E, H), selection_bias=(E,), gate_up=(E, 2 * FFN, H),
                       down=(E, H, FFN))
    # Group 1's experts pulled apart: its worst rarely beats group 0's, its sum often does.
    weights["selection_bias"] = torch.tensor([0.0, 0.0, 0.6, -0.6])
    gm, ctx, x = _recognise(by_min, weights)
    assert not _moe_nodes(gm)
    torch.testing.assert_close(run(gm, ctx.weights, x)[0], by_min(x, *weights.values()))


def test_a_selection_bias_stored_as_a_row_is_copied_flat():
    weights = _weights(router=(E, H), selection_bias=(1, E), gate_up=(E, 2 * FFN, H),
                       down=(E, H, FFN))
    weights["selection_bias"] = weights["selection_bias"] * 4  # enough to change the choice
    gm, ctx, x = _recognise(moe_softmax_selection_bias, weights)
    (node,) = _moe_nodes(gm)
    assert weight_name(node.kwargs["selection_bias"]) == "selection_bias.dsc_selection_bias"
    assert "scoring" not in node.kwargs and ctx.weights[
        "selection_bias.dsc_selection_bias"].shape == (E,)
    assert "selection_bias" not in ctx.weights  # the [1, E] original is dropped
    torch.testing.assert_close(run(gm, ctx.weights, x)[0],
                               moe_softmax_selection_bias(x, *weights.values()),
                               atol=1e-5, rtol=0)


def test_topk_without_experts_does_not_match():
    def top_k_pooling(x, router):
        probs = torch.softmax(F.linear(x, router), dim=-1)
        w, idx = torch.topk(probs, K)
        return x * w.sum(-1, keepdim=True) + idx.sum(-1, keepdim=True)

    gm, _, _ = _recognise(top_k_pooling, _weights(router=(E, H)))
    assert not _moe_nodes(gm) and ops(gm)["topk"] == 1


def test_experts_dsc_cannot_express_do_not_match():
    def sigmoid_glu_moe(x, router, gate_up, down):
        t = x.reshape(-1, H)
        dense = _route(t, router)
        gate, up = torch.einsum("th,efh->etf", t, gate_up).chunk(2, dim=-1)
        y = torch.einsum("etf,ehf->eth", torch.sigmoid(gate) * up, down)
        return torch.einsum("eth,te->th", y, dense).reshape(x.shape)

    weights = _weights(router=(E, H), gate_up=(E, 2 * FFN, H), down=(E, H, FFN))
    gm, ctx, x = _recognise(sigmoid_glu_moe, weights)
    # The probe finds no reading of the block as dsc.moe: graph and weights are left as they were.
    assert not _moe_nodes(gm) and ops(gm)["topk"] == 1
    assert sorted(ctx.weights) == ["down", "gate_up", "router"]
    torch.testing.assert_close(run(gm, ctx.weights, x)[0], sigmoid_glu_moe(x, *weights.values()))


def test_zoo_mixtral():
    t = frontend.trace(zoo.build("tiny-mixtral", init_std=0.3))
    ids = torch.randint(0, t.info.vocab_size, (2, 7))
    feeds = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(7).expand(2, 7),
    }
    inputs = [feeds[n] for n in t.inputs]
    expected = run(t.gm, t.weights, *inputs)[0]
    ctx = context(t.weights)
    gm = PassManager(ctx).run(t.gm, ["recognize_moe"])
    found = _moe_nodes(gm)
    # One MoE block per layer; no transformers:: op left; the stored layout is dsc's already.
    assert len(found) == t.info.num_layers
    assert {n.args[4:] for n in found} == {(2, True, "silu")}
    assert not [n for n in gm.graph.nodes if "transformers" in str(n.target)]
    assert not {"topk", "sort", "histc", "index_put"} & set(ops(gm))
    assert sorted(ctx.weights) == sorted(t.weights)
    torch.testing.assert_close(run(gm, ctx.weights, *inputs)[0], expected, atol=1e-4, rtol=1e-5)
