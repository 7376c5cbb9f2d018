import pytest
import torch

from dsc.kernels.moe import align, moe_experts, route
from dsc.ops.moe import expert_activation, moe_reference


def _weights(experts=5, hidden=24, ffn=20, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(experts, 2 * ffn, hidden, generator=gen, dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, ffn, generator=gen, dtype=dtype) / ffn**0.5
    router = torch.randn(experts, hidden, generator=gen, dtype=dtype)
    return router, gate_up, down


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, True), (3, False)])
def test_route_picks_the_top_k_of_the_softmax(top_k, normalize, assert_close):
    logits = torch.randn(7, 6)
    weights, experts = route(logits, top_k, normalize)
    probs, ids = torch.topk(torch.softmax(logits, -1), top_k)
    if normalize:
        probs = probs / probs.sum(-1, keepdim=True)
    assert experts.dtype == torch.int32 and torch.equal(experts.long(), ids)
    assert_close(weights, probs, tol=1e-6)


@pytest.mark.parametrize("scoring,biased,groups,group_top_k,normalize,scale,group_scoring", [
    ("sigmoid", True, 1, 1, True, 1.0, "top2"),     # MiniMax-M2
    ("sigmoid", True, 4, 2, True, 2.5, "top2"),     # DeepSeek-V3, GLM-4.5: groups, a scale
    ("softmax", True, 1, 1, True, 1.0, "top2"),     # ERNIE 4.5
    ("softmax", False, 2, 1, False, 1.0, "top2"),
    ("softmax", False, 4, 2, False, 16.0, "max"),   # DeepSeek-V2: a group ranked by its best
])
def test_route_with_a_selection_bias_groups_and_a_scale(scoring, biased, groups, group_top_k,
                                                       normalize, scale, group_scoring,
                                                       assert_close):
    from dsc.ops.moe import route_reference

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 16, generator=gen)
    bias = torch.randn(16, generator=gen) * 0.5 if biased else None
    weights, experts = route(logits, 3, normalize, scoring=scoring, selection_bias=bias,
                             groups=groups, group_top_k=group_top_k, scale=scale,
                             group_scoring=group_scoring)
    ref_w, ref_e = route_reference(logits, 3, normalize, scoring, bias, groups, group_top_k,
                                   scale, group_scoring)
    order, ref_order = experts.long().sort(-1), ref_e.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    assert_close(weights.gather(1, order.indices), ref_w.gather(1, ref_order.indices), tol=1e-6)
    if groups > 1:  # every chosen expert lies in one of the group_top_k kept groups
        assert all(len(set((row // (16 // groups)).tolist())) <= group_top_k
                   for row in experts.long())


def test_route_refuses_more_slots_than_experts():
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        route(torch.randn(2, 4), 5, True)


def test_align_groups_pairs_by_expert_in_padded_blocks():
    experts = torch.tensor([[2, 0], [2, 3], [0, 2]])  # pairs 0..5
    grouped, block_expert = align(experts, num_experts=4, block_m=4)
    sentinel = 6
    # Expert 0: pairs 1, 4; expert 2: pairs 0, 2, 5; expert 3: pair 3 (expert 1 gets none).
    assert grouped.tolist()[:12] == [1, 4, sentinel, sentinel, 0, 2, 5, sentinel,
                                     3, sentinel, sentinel, sentinel]
    assert block_expert.tolist() == [0, 2, 3, -1, -1, -1][: block_expert.numel()]
    assert block_expert.numel() == min(6, 2 + 4)
    assert (grouped[12:] == sentinel).all()


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [(1, 2, 8, 16), (16, 2, 8, 16),
                                                         (13, 4, 32, 16), (500, 2, 5, 64)])
def test_align_in_one_program_equals_the_sorted_grouping(tokens, top_k, experts, block_m,
                                                        monkeypatch):
    from dsc.kernels import moe as module

    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids = ids.to(torch.int32)
    one_program = align(ids, experts, block_m)
    monkeypatch.setattr(module, "ALIGN_IN_ONE_PROGRAM", 0)  # torch's sort and scans
    by_torch = align(ids, experts, block_m)
    assert all(torch.equal(a, b) for a, b in zip(one_program, by_torch))
    grouped, block_expert = one_program
    real = grouped < tokens * top_k
    assert sorted(grouped[real].tolist()) == list(range(tokens * top_k))
    for b, e in enumerate(block_expert.tolist()):  # each block's pairs belong to its expert
        rows = grouped[b * block_m : (b + 1) * block_m]
        rows = rows[rows < tokens * top_k].long()
        assert (e == -1) == (rows.numel() == 0)
        assert (ids.reshape(-1)[rows] == e).all()


def _reference(x, router, gate_up, down, top_k, normalize, kind):
    return moe_reference(x, router, gate_up, down, top_k, normalize, kind)


@pytest.mark.parametrize("tokens", [1, 3, 37])  # 37 * 2 pairs: 64-row blocks
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_moe_experts_match_the_reference(tokens, kind, assert_close):
    router, gate_up, down = _weights()
    x = torch.randn(tokens, 24)
    weights, experts = route(torch.nn.functional.linear(x, router), 2, True)
    out = moe_experts(x, weights, experts, gate_up, down, kind)
    assert_close(out, _reference(x, router, gate_up, down, 2, True, kind))


def test_cuda_moe_with_biases_matches_the_op(assert_close):
    # The runtime's entry: router product (with its bias), routing, experts, on the interpreter.
    from dsc.runtime.cuda_impls import moe

    router, gate_up, down = _weights()
    gen = torch.Generator().manual_seed(2)
    biases = (torch.randn(5, generator=gen), torch.randn(5, 40, generator=gen),
              torch.randn(5, 24, generator=gen))
    x = torch.randn(2, 3, 24)
    out = moe(x, router, gate_up, down, 2, True, "clamped_swiglu", *biases)
    assert_close(out, moe_reference(x, router, gate_up, down, 2, True, "clamped_swiglu", *biases))


@pytest.mark.parametrize("group_scoring", ["top2", "max"])
def test_cuda_moe_with_group_limited_sigmoid_routing_matches_the_op(group_scoring, assert_close):
    router, gate_up, down = _weights(experts=8)
    selection_bias = torch.randn(8, generator=torch.Generator().manual_seed(4))
    routing = {"scoring": "sigmoid", "selection_bias": selection_bias, "groups": 4,
               "group_top_k": 2, "scale": 2.5, "group_scoring": group_scoring}
    from dsc.runtime.cuda_impls import moe

    x = torch.randn(5, 24)
    out = moe(x, router, gate_up, down, 3, True, "silu", **routing)
    assert_close(out, moe_reference(x, router, gate_up, down, 3, True, "silu", **routing))


@pytest.mark.parametrize("kind", ["relu", "clamped_swiglu"])
def test_moe_experts_add_the_expert_biases(kind, assert_close):
    router, gate_up, down = _weights(experts=3, hidden=16, ffn=72)  # F past one 64-column tile
    gen = torch.Generator().manual_seed(1)
    gate_up_bias, down_bias = torch.randn(3, 144, generator=gen), torch.randn(3, 16, generator=gen)
    x = torch.randn(5, 16) * 8  # some gate and up sums past the clamp's limit of 7
    weights, experts = route(torch.nn.functional.linear(x, router), 1, False)
    out = moe_experts(x, weights, experts, gate_up, down, kind, gate_up_bias=gate_up_bias,
                      down_bias=down_bias)
    ref = torch.zeros_like(x)
    for t in range(5):
        e = int(experts[t, 0])
        h = gate_up[e] @ x[t] + gate_up_bias[e]
        h = expert_activation(h[:72], h[72:], kind)
        ref[t] = weights[t, 0] * (down[e] @ h + down_bias[e])
    assert_close(out, ref)
    if kind == "clamped_swiglu":
        sums = torch.einsum("efh,th->tef", gate_up, x) + gate_up_bias
        assert (sums.abs() > 7).any()  # the clamp took effect somewhere


def test_moe_experts_half_precision(assert_close):
    # float16: the interpreter's tl.dot on bfloat16 operands returns garbage (numpy has no
    # bfloat16); the GPU tests run bfloat16.
    router, gate_up, down = _weights(dtype=torch.float16)
    x = torch.randn(4, 24, dtype=torch.float16)
    weights, experts = route(torch.nn.functional.linear(x, router), 2, False)
    out = moe_experts(x, weights, experts, gate_up, down, "silu")
    ref = _reference(x.float(), router.float(), gate_up.float(), down.float(), 2, False, "silu")
    assert_close(out.float(), ref, tol=2e-2)


def test_moe_experts_refuse_mismatched_weights():
    router, gate_up, down = _weights()
    x = torch.randn(2, 24)
    weights, experts = route(torch.nn.functional.linear(x, router), 2, True)
    with pytest.raises(ValueError, match="disagree"):
        moe_experts(x, weights, experts, gate_up, down.transpose(1, 2), "silu")
    with pytest.raises(ValueError, match="unknown activation"):
        moe_experts(x, weights, experts, gate_up, down, "swish")
