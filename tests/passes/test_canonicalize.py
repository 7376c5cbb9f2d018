import torch

from dsc.passes.canonicalize import canonicalize  # noqa: F401  (registers)
from dsc.passes.manager import PassManager
from tests.passes.helpers import context, export_fn, ops, run


def test_noops_are_removed():
    def noisy(x):
        return torch.ops.aten.alias(x.detach()).to(torch.float32) * 2

    x = torch.randn(3, 4)
    gm, weights = export_fn(noisy, x)
    gm = PassManager(context(weights)).run(gm, ["canonicalize"])
    assert ops(gm) == {"mul": 1}
    torch.testing.assert_close(run(gm, weights, x)[0], noisy(x))


def test_layout_keeping_clone_is_removed():
    # Before: y = clone(x * 2) + 1 (eval-mode dropout traces to the clone).
    # Expected: y = (x * 2) + 1.
    def dropped(x):
        return torch.ops.aten.clone(x * 2) + 1

    x = torch.randn(3, 4)
    gm, weights = export_fn(dropped, x)
    assert ops(gm)["clone"] == 1
    gm = PassManager(context(weights)).run(gm, ["canonicalize"])
    assert ops(gm) == {"mul": 1, "add": 1}
    torch.testing.assert_close(run(gm, weights, x)[0], dropped(x))


def test_clone_of_an_input_or_a_graph_output_is_kept():
    def copies(x):
        y = x * 2
        return torch.ops.aten.clone(x) + 1, torch.ops.aten.clone(y)

    x = torch.randn(3, 4)
    gm, weights = export_fn(copies, x)
    gm = PassManager(context(weights)).run(gm, ["canonicalize"])
    assert ops(gm)["clone"] == 2  # an input's copy, and a result returned as the copy
    torch.testing.assert_close(run(gm, weights, x), list(copies(x)))


def test_clone_and_real_casts_are_kept():
    def copies(x):
        return x.t().contiguous().view(-1).to(torch.float64)

    x = torch.randn(3, 4)
    gm, weights = export_fn(copies, x)
    gm = PassManager(context(weights)).run(gm, ["canonicalize"])
    # the view relies on the contiguous copy; the cast changes dtype
    assert ops(gm)["clone"] == 1 and ops(gm)["_to_copy"] == 1
    torch.testing.assert_close(run(gm, weights, x)[0], copies(x))


def test_whole_slices_are_removed():
    def sliced(x):
        x = torch.ops.aten.slice.Tensor(x, 0, 0, 9223372036854775807)
        return torch.ops.aten.slice.Tensor(x, 1, 0, 4) * 2

    x = torch.randn(3, 4)
    gm, weights = export_fn(sliced, x)
    assert ops(gm)["slice"] == 2
    gm = PassManager(context(weights)).run(gm, ["canonicalize"])
    assert ops(gm) == {"mul": 1}
    torch.testing.assert_close(run(gm, weights, x)[0], sliced(x))


def test_slices_that_drop_or_step_are_kept():
    def sliced(x):
        a = torch.ops.aten.slice.Tensor(x, 1, 0, 3)  # drops the last column
        b = torch.ops.aten.slice.Tensor(x, 0, 1)  # drops the first row
        c = torch.ops.aten.slice.Tensor(x, 1, 0, 9223372036854775807, 2)  # every other column
        return a.sum() + b.sum() + c.sum()

    x = torch.randn(3, 4)
    gm, weights = export_fn(sliced, x)
    gm = PassManager(context(weights)).run(gm, ["canonicalize"])
    assert ops(gm)["slice"] == 3
    torch.testing.assert_close(run(gm, weights, x)[0], sliced(x))
