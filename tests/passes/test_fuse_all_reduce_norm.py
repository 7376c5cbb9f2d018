import torch

import dsc.ops  # noqa: F401  (registers the dsc ops)
from dsc.passes.fuse_all_reduce_norm import fuse_all_reduce_norm  # noqa: F401  (registers)
from tests.passes.helpers import export_and_run_passes, ops, run

dsc_ops = torch.ops.dsc


def _fuse(fn, *inputs, weights=None):
    return export_and_run_passes(fn, *inputs, passes=["fuse_all_reduce_norm"], weights=weights)


def test_all_reduce_add_norm_before_expected():
    """Before: all_reduce -> residual_add -> rms_norm, h also read by the next residual add.
    Expected: one all_reduce_residual_norm, its two outputs taken by getitem."""
    def block(stream, partial, w):
        h = dsc_ops.residual_add(stream, dsc_ops.all_reduce(partial))
        n = dsc_ops.rms_norm(h, w, 1e-6, torch.float32)
        return dsc_ops.residual_add(h, n * 2)

    x, p, w = torch.randn(1, 1, 16), torch.randn(1, 1, 16), torch.randn(16)
    gm, weights = _fuse(block, x, p, weights={"w": w})
    assert ops(gm) == {"all_reduce_residual_norm": 1, "getitem": 2, "mul": 1, "residual_add": 1}
    fused = next(n for n in gm.graph.nodes if "all_reduce_residual_norm" in str(n.target))
    assert fused.args[2:] == (fused.args[2], 1e-6, torch.float32)  # the norm's eps and dtype
    torch.testing.assert_close(run(gm, weights, x, p)[0], block(x, p, w))


def test_operands_in_either_order():
    def block(stream, partial, w):
        h = dsc_ops.residual_add(dsc_ops.all_reduce(partial), stream)
        return dsc_ops.rms_norm(h, w, 1e-6, torch.float32), h

    x, p, w = torch.randn(2, 16), torch.randn(2, 16), torch.randn(16)
    gm, weights = _fuse(block, x, p, weights={"w": w})
    assert ops(gm)["all_reduce_residual_norm"] == 1 and "all_reduce" not in ops(gm)
    for got, want in zip(run(gm, weights, x, p), block(x, p, w)):
        torch.testing.assert_close(got, want)


def test_does_not_match_without_a_norm_or_with_other_readers():
    def no_norm(stream, partial):  # the embedding's sum, or a LayerNorm model
        return dsc_ops.residual_add(stream, dsc_ops.all_reduce(partial)) * 3

    def shared_sum(stream, partial, w):  # the sum is needed on its own too
        r = dsc_ops.all_reduce(partial)
        h = dsc_ops.residual_add(stream, r)
        return dsc_ops.rms_norm(h, w, 1e-6, torch.float32), r

    def norm_of_a_view(stream, partial, w):  # the norm reads a reshape of h, not h
        h = dsc_ops.residual_add(stream, dsc_ops.all_reduce(partial))
        return dsc_ops.rms_norm(h.reshape(2, 16), w, 1e-6, torch.float32)

    x, p, w = torch.randn(1, 2, 16), torch.randn(1, 2, 16), torch.randn(16)
    gm, _ = _fuse(no_norm, x, p)
    assert "all_reduce_residual_norm" not in ops(gm)
    gm, _ = _fuse(shared_sum, x, p, weights={"w": w})
    assert "all_reduce_residual_norm" not in ops(gm)
    gm, _ = _fuse(norm_of_a_view, x, p, weights={"w": w})
    assert "all_reduce_residual_norm" not in ops(gm)
