"""addmm_to_linear: Before/Expected and does-not-match."""

import torch

from dsc.passes.addmm_to_linear import addmm_to_linear
from tests.passes.helpers import context, export_fn, ops


def _run(fn, x, weights):
    gm, weights = export_fn(fn, x, weights=weights)
    ctx = context(weights)
    return addmm_to_linear(gm, ctx), ctx


def test_before_expected_addmm_and_mm():
    # Before: addmm(b, x, W) and mm(x, W2) with [in, out] weights (GPT-2's Conv1D).
    # Expected: linear(x, W^T, b) and linear(x, W2^T) over new contiguous [out, in] weights.
    w = torch.randn(6, 10)
    w2 = torch.randn(6, 5)
    b = torch.randn(10)
    x = torch.randn(3, 6)

    def fn(x, w, b, w2):
        return torch.addmm(b, x, w), torch.mm(x, w2)

    gm, ctx = _run(fn, x, {"w": w, "b": b, "w2": w2})
    assert ops(gm)["linear"] == 2 and ops(gm)["addmm"] == 0 and ops(gm)["mm"] == 0
    names = {n.meta["dsc_weight"] for n in gm.graph.nodes if "dsc_weight" in n.meta}
    assert names == {"transposed:w", "transposed:w2", "b"}  # the originals are gone
    assert ctx.weights["transposed:w"].is_contiguous()
    assert torch.equal(ctx.weights["transposed:w"], w.t())
    env = {"w": w, "b": b, "w2": w2, "transposed:w": ctx.weights["transposed:w"],
           "transposed:w2": ctx.weights["transposed:w2"]}
    args = [env[n.meta["dsc_weight"]] if "dsc_weight" in n.meta else x
            for n in gm.graph.nodes if n.op == "placeholder"]
    gm.recompile()
    y, y2 = gm(*args)
    torch.testing.assert_close(y, torch.addmm(b, x, w))
    torch.testing.assert_close(y2, x @ w2)


def test_a_weight_read_twice_is_transposed_once():
    w, x = torch.randn(4, 4), torch.randn(2, 4)
    gm, ctx = _run(lambda x, w: torch.mm(torch.mm(x, w), w), x, {"w": w})
    assert ops(gm)["linear"] == 2
    assert [k for k in ctx.weights if k.startswith("transposed:")] == ["transposed:w"]


def test_does_not_match_computed_weights_2d_bias_or_scaled_addmm():
    w, x = torch.randn(4, 5), torch.randn(3, 4)
    b2 = torch.randn(3, 5)

    def fn(x, w, b2):
        computed = torch.mm(x, w * 2.0)  # the weight is computed in the graph
        with_2d_bias = torch.addmm(b2, x, w)  # a bias per row, not per column
        scaled = torch.addmm(b2[0], x, w, beta=0.5)  # beta changes the sum
        return computed, with_2d_bias, scaled

    gm, ctx = _run(fn, x, {"w": w, "b2": b2})
    assert ops(gm)["linear"] == 0
    assert not [k for k in ctx.weights if k.startswith("transposed:")]


def test_before_expected_conv1d_views_fold_into_the_linear():
    # Before: view(addmm(b, view(x, [-1, K]), W), [B, S, N])   (GPT-2's Conv1D)
    # Expected: linear(x, W^T, b) over the 3-D x, neither view left.
    w, b, x = torch.randn(6, 10), torch.randn(10), torch.randn(2, 3, 6)

    def fn(x, w, b):
        return torch.addmm(b, x.view(-1, 6), w).view(2, 3, 10)

    gm, ctx = _run(fn, x, {"w": w, "b": b})
    assert ops(gm) == {"linear": 1}
    linear = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert linear.args[0].op == "placeholder" and tuple(linear.meta["val"].shape) == (2, 3, 10)


def test_does_not_match_views_that_change_the_lead_dims():
    # The product is viewed to other lead dims ([3, 2] from [2, 3]), or the flat x is read
    # elsewhere too: the linear keeps the flat input, and the view after it stays.
    w, b, x = torch.randn(6, 10), torch.randn(10), torch.randn(2, 3, 6)

    def fn(x, w, b):
        flat = x.view(-1, 6)
        return torch.addmm(b, flat, w).view(3, 2, 10), flat.sum()

    gm, ctx = _run(fn, x, {"w": w, "b": b})
    assert ops(gm)["linear"] == 1 and ops(gm)["view"] == 2
