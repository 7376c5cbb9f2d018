import functools

import pytest
import torch

from dsc import frontend, zoo
from dsc.passes.manager import PassManager
from dsc.passes.recognize_layer_norm import recognize_layer_norm  # noqa: F401  (registers)
from tests.passes.helpers import context, export_fn, ops, run


def aten_layer_norm(x, weight, bias):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, 1e-5) + 1.0


def written_out_layer_norm(x, weight, bias, eps=1e-6):
    dtype = x.dtype
    h = x.to(torch.float32)
    d = h - h.mean(-1, keepdim=True)
    var = d.pow(2).mean(-1, keepdim=True)
    return weight * (d * torch.rsqrt(var + eps)).to(dtype) + bias


def divided_layer_norm(x, weight, bias):
    d = x - x.mean(-1, keepdim=True)
    return weight * (d / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)) + bias


def correction_layer_norm(x, weight, bias):
    d = x - x.mean(-1, keepdim=True)
    var = torch.var(x, -1, correction=0, keepdim=True)
    return (d * torch.rsqrt(var + 1e-5)) * weight + bias


def _run_pass(fn, x, weights):
    gm, weights = export_fn(fn, x, weights=weights)
    gm = PassManager(context(weights)).run(gm, ["recognize_layer_norm"])
    return gm, weights


def test_aten_layer_norm_before_expected():
    x = torch.randn(2, 3, 16)
    weights = {"w": torch.randn(16), "b": torch.randn(16)}
    gm, weights = export_fn(aten_layer_norm, x, weights=weights)
    assert ops(gm)["layer_norm"] == 1
    gm = PassManager(context(weights)).run(gm, ["recognize_layer_norm"])
    # Expected: the aten op became dsc.layer_norm(x, w, b, eps); the add after it is untouched.
    assert ops(gm) == {"layer_norm": 1, "add": 1}
    assert not any(n.target is torch.ops.aten.layer_norm.default for n in gm.graph.nodes)
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.dsc.layer_norm.default)
    assert node.args[3] == 1e-5
    assert [a.meta["dsc_weight"] for a in node.args[1:3]] == ["w", "b"]
    torch.testing.assert_close(
        run(gm, weights, x)[0], aten_layer_norm(x, weights["w"], weights["b"]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("fn", [written_out_layer_norm, divided_layer_norm, correction_layer_norm])
def test_written_out_layer_norm_before_expected(fn):
    x = torch.randn(2, 3, 16) * 3 + 1
    weights = {"w": torch.randn(16), "b": torch.randn(16)}
    gm, weights = export_fn(fn, x, weights=weights)
    assert ops(gm)["mean"] >= 1
    gm = PassManager(context(weights)).run(gm, ["recognize_layer_norm"])
    # Expected: one dsc.layer_norm and nothing left of the mean/var/rsqrt chain.
    assert ops(gm) == {"layer_norm": 1}
    expected = fn(x, weights["w"], weights["b"])
    torch.testing.assert_close(run(gm, weights, x)[0], expected, atol=1e-5, rtol=0)


def test_written_out_bf16_keeps_cast_semantics():
    x = (torch.randn(2, 3, 16) * 3 + 1).to(torch.bfloat16)
    weights = {"w": torch.randn(16).to(torch.bfloat16), "b": torch.randn(16).to(torch.bfloat16)}
    gm, weights = _run_pass(written_out_layer_norm, x, weights)
    assert ops(gm) == {"layer_norm": 1}
    out = run(gm, weights, x)[0]
    assert out.dtype == torch.bfloat16
    expected = written_out_layer_norm(x, weights["w"], weights["b"])
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=1e-2)


def test_layer_norm_without_affine():
    def plain(x):
        d = x - x.mean(-1, keepdim=True)
        return d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5)

    x = torch.randn(4, 8)
    gm, weights = _run_pass(plain, x, {})
    assert ops(gm) == {"layer_norm": 1}
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.args[1] is None and node.args[2] is None
    torch.testing.assert_close(run(gm, weights, x)[0], plain(x), atol=1e-5, rtol=0)


def test_norm_over_two_dims_does_not_match():
    def two_dims(x, weight):
        return torch.nn.functional.layer_norm(x, x.shape[-2:], weight)

    gm, _ = _run_pass(two_dims, torch.randn(2, 3, 8), {"w": torch.randn(3, 8)})
    assert "layer_norm" in ops(gm)
    assert not any(n.target is torch.ops.dsc.layer_norm.default for n in gm.graph.nodes)


def test_unbiased_variance_does_not_match():
    def unbiased(x):
        d = x - x.mean(-1, keepdim=True)
        return d / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)

    gm, _ = _run_pass(unbiased, torch.randn(2, 8), {})
    assert not any(n.target is torch.ops.dsc.layer_norm.default for n in gm.graph.nodes)


def test_statistics_over_another_dim_does_not_match():
    def wrong_dim(x):
        d = x - x.mean(1, keepdim=True)
        return d * torch.rsqrt(d.pow(2).mean(1, keepdim=True) + 1e-5)

    gm, _ = _run_pass(wrong_dim, torch.randn(2, 3, 8), {})
    assert not any(n.target is torch.ops.dsc.layer_norm.default for n in gm.graph.nodes)


@functools.cache
def _traced(name: str):
    return frontend.trace(zoo.build(name, init_std=0.3))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_zoo_model_layer_norms(name):
    t = _traced(name)
    ids = torch.randint(0, t.info.vocab_size, (2, 7))
    feeds = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(7).expand(2, 7),
    }
    inputs = [feeds[n] for n in t.inputs]
    expected = run(t.gm, t.weights, *inputs)[0]
    ctx = context(t.weights)
    gm = PassManager(ctx).run(t.gm, ["recognize_layer_norm"])
    # GPT-2: ln_1, ln_2 per layer and ln_f; BERT: two per layer and one after the embeddings.
    assert ops(gm)["layer_norm"] == 2 * t.info.num_layers + 1
    assert sum(n.target is torch.ops.dsc.layer_norm.default for n in gm.graph.nodes) == (
        2 * t.info.num_layers + 1
    )
    torch.testing.assert_close(run(gm, ctx.weights, *inputs)[0], expected, atol=1e-4, rtol=1e-5)
