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


def test_clone_and_real_casts_are_kept():
    def copies(x):
        return x.t().contiguous().view(-1).to(torch.float64)

    x = torch.randn(3, 4)
    gm, weights = export_fn(copies, x)
    gm = PassManager(context(weights)).run(gm, ["canonicalize"])
    # the view relies on the contiguous copy; the cast changes dtype
    assert ops(gm)["clone"] == 1 and ops(gm)["_to_copy"] == 1
    torch.testing.assert_close(run(gm, weights, x)[0], copies(x))
