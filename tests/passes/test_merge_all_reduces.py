"""merge_all_reduces: Before/Expected graphs and the cases it must leave alone."""

import torch

import dsc.ops  # noqa: F401  (registers the dsc ops)
from dsc.passes.merge_all_reduces import merge_all_reduces  # noqa: F401  (registers)
from tests.passes.helpers import export_and_run_passes, ops, run

dsc_ops = torch.ops.dsc


def _merge(fn, *inputs):
    return export_and_run_passes(fn, *inputs, passes=["merge_all_reduces"])


def test_two_sums_added_before_expected():
    """Before: all_reduce(routed) + all_reduce(shared) -> residual_add.
    Expected: all_reduce(routed + shared) -> residual_add: one collective."""
    def block(stream, routed, shared):
        return dsc_ops.residual_add(
            stream, dsc_ops.all_reduce(routed) + dsc_ops.all_reduce(shared))

    x, p, q = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    gm, weights = _merge(block, x, p, q)
    assert ops(gm) == {"add": 1, "all_reduce": 1, "residual_add": 1}
    reduced = next(n for n in gm.graph.nodes if "all_reduce" in str(n.target))
    assert "add" in str(reduced.args[0].target)  # the parts are added first
    # One process: all_reduce returns its input, so the sums equal the unmerged graph's.
    torch.testing.assert_close(run(gm, weights, x, p, q)[0], block(x, p, q))


def test_a_sum_behind_a_view_moves_after_it_first():
    """Before: view(all_reduce(routed)) + all_reduce(shared) (the MoE output reshaped back).
    Expected: all_reduce(view(routed) + shared)."""
    def block(routed, shared):
        return dsc_ops.all_reduce(routed).view(2, 3, 16) + dsc_ops.all_reduce(shared)

    p, q = torch.randn(6, 16), torch.randn(2, 3, 16)
    gm, weights = _merge(block, p, q)
    assert ops(gm) == {"view": 1, "add": 1, "all_reduce": 1}
    torch.testing.assert_close(run(gm, weights, p, q)[0], block(p, q))


def test_does_not_match_a_shared_sum_a_broadcast_or_a_scaled_add():
    def shared_sum(p, q):  # one of the sums is needed on its own too
        a = dsc_ops.all_reduce(p)
        return a + dsc_ops.all_reduce(q), a

    def broadcast(p, q):  # [2, 16] + [1, 16]: merging would add q's part twice per rank
        return dsc_ops.all_reduce(p) + dsc_ops.all_reduce(q)

    def scaled(p, q):
        return torch.add(dsc_ops.all_reduce(p), dsc_ops.all_reduce(q), alpha=2)

    for fn, inputs in ((shared_sum, (torch.randn(2, 16), torch.randn(2, 16))),
                       (broadcast, (torch.randn(2, 16), torch.randn(1, 16))),
                       (scaled, (torch.randn(2, 16), torch.randn(2, 16)))):
        gm, _ = _merge(fn, *inputs)
        assert ops(gm)["all_reduce"] == 2, fn.__name__
