"""fold_query_scale: Before/Expected and does-not-match."""

import torch

from dsc.passes.fold_query_scale import fold_query_scale  # noqa: F401  (registers)
from dsc.passes.manager import PassManager
from tests.passes.helpers import context, export_fn, ops, run

dsc = torch.ops.dsc


def _heads(t):  # [B, S, H*D] -> [B, H, S, D]
    return t.view(1, 5, 2, 4).transpose(1, 2)


def test_before_expected_scale_moves_into_the_attention():
    # Before: attention(transpose(view(mul(q, 0.5))), k, v, scale=0.25)
    # Expected: attention(transpose(view(q)), k, v, scale=0.125), no mul.
    def before(q, k, v):
        return dsc.attention(_heads(q * 0.5), _heads(k), _heads(v), None, True, 0.25)

    q, k, v = (torch.randn(1, 5, 8) for _ in range(3))
    gm, weights = export_fn(before, q, k, v)
    expected = run(gm, weights, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["fold_query_scale"])
    assert "mul" not in ops(gm)
    attention = next(n for n in gm.graph.nodes if n.target is dsc.attention.default)
    assert attention.args[5] == 0.125
    torch.testing.assert_close(run(gm, weights, q, k, v), expected)


def test_does_not_match_shared_tensor_or_key_scaling():
    def before(q, k, v, c):
        scaled = q * 0.5
        shared = dsc.attention(_heads(scaled), _heads(k), _heads(v), None, True, 0.25)
        by_tensor = dsc.attention(_heads(q * c), _heads(k), _heads(v), None, True, 0.25)
        keys = dsc.attention(_heads(q), _heads(k * 0.5), _heads(v), None, True, 0.25)
        return shared, scaled, by_tensor, keys  # the scaled queries are also a result

    q, k, v = (torch.randn(1, 5, 8) for _ in range(3))
    c = torch.tensor(0.5)
    gm, weights = export_fn(before, q, k, v, c)
    gm = PassManager(context(weights)).run(gm, ["fold_query_scale"])
    assert ops(gm)["mul"] == 3
    assert all(n.args[5] == 0.25 for n in gm.graph.nodes if n.target is dsc.attention.default)
