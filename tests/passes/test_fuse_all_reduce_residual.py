"""fuse_all_reduce_residual: Before/Expected graphs and the cases it must leave alone."""

import torch

import dsc.ops  # noqa: F401  (registers the dsc ops)
from dsc.passes.fuse_all_reduce_residual import fuse_all_reduce_residual  # noqa: F401  (registers)
from tests.passes.helpers import export_and_run_passes, ops, run

dsc_ops = torch.ops.dsc


def _fuse(fn, *inputs, weights=None):
    return export_and_run_passes(fn, *inputs, passes=["fuse_all_reduce_residual"], weights=weights)


def test_all_reduce_then_add_before_expected():
    """Before: all_reduce -> residual_add, h read by a norm and by the next add.
    Expected: one all_reduce_residual(partial, stream); the norm and the next add read it."""
    def block(stream, partial, w):
        h = dsc_ops.residual_add(stream, dsc_ops.all_reduce(partial))
        n = dsc_ops.rms_norm(h, w, 1e-6, torch.float32)
        return dsc_ops.residual_add(h, n * 2)

    x, p, w = torch.randn(1, 1, 16), torch.randn(1, 1, 16), torch.randn(16)
    gm, weights = _fuse(block, x, p, weights={"w": w})
    assert ops(gm) == {"all_reduce_residual": 1, "rms_norm": 1, "mul": 1, "residual_add": 1}
    fused = next(n for n in gm.graph.nodes if "all_reduce_residual" in str(n.target))
    assert [a.name for a in fused.args] == ["xs_1", "xs_0"]  # (partial, stream)
    torch.testing.assert_close(run(gm, weights, x, p)[0], block(x, p, w))


def test_operands_in_either_order():
    def block(stream, partial):
        return dsc_ops.residual_add(dsc_ops.all_reduce(partial), stream) * 3

    x, p = torch.randn(2, 16), torch.randn(2, 16)
    gm, weights = _fuse(block, x, p)
    assert ops(gm) == {"all_reduce_residual": 1, "mul": 1}
    torch.testing.assert_close(run(gm, weights, x, p)[0], block(x, p))


def test_does_not_match_a_shared_sum_a_plain_sum_or_a_broadcast():
    def shared_sum(stream, partial):  # the sum is needed on its own too
        r = dsc_ops.all_reduce(partial)
        return dsc_ops.residual_add(stream, r), r

    def plain_sum(stream, partial):  # the vocab-parallel embedding's: no residual add
        return dsc_ops.all_reduce(partial) * stream

    def broadcast(stream, partial):  # stream [2, 16] + sum [1, 16]
        return dsc_ops.residual_add(stream, dsc_ops.all_reduce(partial[:1]))

    x, p = torch.randn(2, 16), torch.randn(2, 16)
    for fn in (shared_sum, plain_sum, broadcast):
        gm, _ = _fuse(fn, x, p)
        assert "all_reduce_residual" not in ops(gm), fn.__name__
        assert ops(gm)["all_reduce"] == 1, fn.__name__
