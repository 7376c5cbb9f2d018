import torch

import dsc.ops  # noqa: F401  (registers the dsc ops)
from dsc.passes.fuse_linear_all_reduce import fuse_linear_all_reduce  # noqa: F401  (registers)
from dsc.passes.manager import PassManager
from tests.passes.helpers import context, export_and_run_passes, export_fn, ops, run

dsc_ops = torch.ops.dsc
F = torch.nn.functional


def _fuse(fn, *inputs, weights=None):
    return export_and_run_passes(fn, *inputs, passes=["fuse_linear_all_reduce"], weights=weights)


def test_row_product_and_its_sum_before_expected():
    """Before: linear(x, W) -> all_reduce -> + bias -> residual add.
    Expected: linear_all_reduce(x, W) -> + bias -> residual add (the bias stays after the sum)."""
    def block(stream, x, w, b):
        return dsc_ops.residual_add(stream, dsc_ops.all_reduce(F.linear(x, w)) + b)

    s, x = torch.randn(1, 1, 12), torch.randn(1, 1, 20)
    weights = {"w": torch.randn(12, 20), "b": torch.randn(12)}
    gm, weights = _fuse(block, s, x, weights=weights)
    assert ops(gm) == {"linear_all_reduce": 1, "add": 1, "residual_add": 1}
    fused = next(n for n in gm.graph.nodes if "linear_all_reduce" in str(n.target))
    assert [a.meta.get("dsc_weight", a.meta.get("dsc_input")) for a in fused.args] == ["x1", "w"]
    # One process: the sum over ranks is the rank's own product.
    torch.testing.assert_close(run(gm, weights, s, x)[0], block(s, x, *weights.values()))


def test_every_row_product_of_a_layer():
    def layer(x, wo, wd, wu):
        h = x + dsc_ops.all_reduce(F.linear(x, wo))
        return h + dsc_ops.all_reduce(F.linear(F.silu(F.linear(h, wu)), wd))

    x = torch.randn(2, 16)
    weights = {"wo": torch.randn(16, 16), "wd": torch.randn(16, 24), "wu": torch.randn(24, 16)}
    gm, weights = _fuse(layer, x, weights=weights)
    assert ops(gm)["linear_all_reduce"] == 2 and ops(gm)["linear"] == 1  # the up projection
    assert "all_reduce" not in ops(gm)
    torch.testing.assert_close(run(gm, weights, x)[0], layer(x, *weights.values()))


def test_bias_free_product_spelled_with_a_none_bias():
    """addmm_to_linear writes GPT-2's row products as linear(x, W_t, None)."""
    def block(x, w):
        return dsc_ops.all_reduce(F.linear(x, w, None))

    x = torch.randn(1, 8)
    gm, weights = export_fn(block, x, weights={"w": torch.randn(4, 8)})
    product = next(n for n in gm.graph.nodes if "linear" in str(n.target))
    product.args = (*product.args[:2], None)  # export drops the None; the pass writes it
    gm = PassManager(context(weights)).run(gm, ["fuse_linear_all_reduce"])
    assert ops(gm) == {"linear_all_reduce": 1}
    fused = next(n for n in gm.graph.nodes if "linear_all_reduce" in str(n.target))
    assert len(fused.args) == 2


def test_does_not_match():
    def with_bias(x, w, b):  # a bias inside the product would be summed once per rank
        return dsc_ops.all_reduce(F.linear(x, w, b))

    def shared_partial(x, w):  # the partial is needed on its own too
        p = F.linear(x, w)
        return dsc_ops.all_reduce(p), p * 2

    def not_a_product(x):  # the vocab-parallel embedding's sum, the MoE block's
        return dsc_ops.all_reduce(x * 3)

    def computed_weight(x, w):  # the weight is not a plan weight
        return dsc_ops.all_reduce(F.linear(x, w * 2))

    x = torch.randn(1, 8)
    w, b = torch.randn(4, 8), torch.randn(4)
    for fn, weights in ((with_bias, {"w": w, "b": b}), (shared_partial, {"w": w}),
                        (not_a_product, {}), (computed_weight, {"w": w})):
        gm, _ = _fuse(fn, x, weights=weights)
        assert "linear_all_reduce" not in ops(gm), fn.__name__
        assert ops(gm)["all_reduce"] == 1, fn.__name__
