import torch

from dsc.passes.manager import PassManager
from dsc.passes.recognize_rms_norm import recognize_rms_norm  # noqa: F401  (registers)
from tests.passes.helpers import context, export_fn, ops, run


def hf_rms_norm(x, weight, eps=1e-6):
    dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(dtype)


def test_rms_norm_before_expected():
    x = torch.randn(3, 5, 24)
    weights = {"w": torch.randn(24)}
    gm, weights = export_fn(hf_rms_norm, x, weights=weights)
    before = ops(gm)
    assert before["rsqrt"] == 1 and before["pow"] == 1 and before["mean"] == 1
    ctx = context(weights)
    gm = PassManager(ctx).run(gm, ["recognize_rms_norm"])
    after = ops(gm)
    # Expected: one dsc.rms_norm and nothing left of the pattern.
    assert after == {"rms_norm": 1}
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.args[2] == 1e-6
    torch.testing.assert_close(run(gm, weights, x)[0], hf_rms_norm(x, weights["w"]))


def test_rms_norm_bf16_keeps_cast_semantics():
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    weights = {"w": torch.randn(16).to(torch.bfloat16)}
    gm, weights = export_fn(hf_rms_norm, x, weights=weights)
    gm = PassManager(context(weights)).run(gm, ["recognize_rms_norm"])
    assert ops(gm) == {"rms_norm": 1}
    out = run(gm, weights, x)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, hf_rms_norm(x, weights["w"]))


def test_scaling_another_tensor_does_not_match():
    def cross(x, y):
        return x * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)

    gm, weights = export_fn(cross, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    gm = PassManager(context(weights)).run(gm, ["recognize_rms_norm"])
    assert "rms_norm" not in ops(gm)


def test_mean_over_other_dim_does_not_match():
    def wrong(x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5)

    gm, weights = export_fn(wrong, torch.randn(2, 3, 8))
    gm = PassManager(context(weights)).run(gm, ["recognize_rms_norm"])
    assert "rms_norm" not in ops(gm)
