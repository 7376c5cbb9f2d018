import functools

import pytest
import torch
import torch.nn.functional as F

import dsc.ops.residual  # noqa: F401  (registers dsc::residual_add)
from dsc import frontend, zoo
from dsc.passes.manager import PassManager
from dsc.passes.recognize_residual import recognize_residual  # noqa: F401  (registers)
from tests.passes.helpers import context, export_fn, ops, run

H = 8


def pre_norm_block(x, w_qkv, w_o, w_fc, w_proj):
    h = x + F.linear(F.linear(F.layer_norm(x, (H,)), w_qkv).relu(), w_o)
    return F.layer_norm(h + F.linear(F.gelu(F.linear(F.layer_norm(h, (H,)), w_fc)), w_proj), (H,))


def post_norm_block(x, w_o, w_fc, w_proj):
    x = F.layer_norm(x, (H,))
    h = F.layer_norm(F.linear(x.tanh(), w_o) + x, (H,))
    return F.layer_norm(
        F.linear(F.gelu(F.linear(h, w_fc)), w_proj).view(-1, H) + h.view(-1, H), (H,)
    )


def _weights(**shapes):
    return {k: torch.randn(s) * 0.5 for k, s in shapes.items()}


def _residual_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.dsc.residual_add.default]


@pytest.mark.parametrize(
    ("fn", "weights"),
    [
        (pre_norm_block, _weights(w_qkv=(H, H), w_o=(H, H), w_fc=(16, H), w_proj=(H, 16))),
        (post_norm_block, _weights(w_o=(H, H), w_fc=(16, H), w_proj=(H, 16))),
    ],
)
def test_residual_before_expected(fn, weights):
    x = torch.randn(2, 3, H)
    gm, weights = export_fn(fn, x, weights=weights)
    adds = ops(gm)["add"]
    gm = PassManager(context(weights)).run(gm, ["recognize_residual"])
    # Expected: both block-closing adds became dsc.residual_add(stream, projection).
    found = _residual_nodes(gm)
    assert len(found) == 2 and ops(gm)["add"] == adds - 2
    for node in found:
        assert node.args[1].target in (torch.ops.aten.linear.default, torch.ops.aten.view.default)
    torch.testing.assert_close(run(gm, weights, x)[0], fn(x, *weights.values()), atol=1e-5, rtol=0)


def test_projection_plus_bias_or_unrelated_input_does_not_match():
    def not_residual(x, y, w, b):
        # y feeds a norm, like a stream would, but the projection is not computed from it.
        side = F.layer_norm(y, (H,))
        return F.linear(x, w) + b, F.linear(x, w) + y, side

    gm, weights = export_fn(
        not_residual, torch.randn(2, H), torch.randn(2, H), weights=_weights(w=(H, H), b=(H,))
    )
    gm = PassManager(context(weights)).run(gm, ["recognize_residual"])
    assert not _residual_nodes(gm) and ops(gm)["add"] == 2


def test_sum_of_two_projections_does_not_match():
    def parallel(x, w_a, w_b):
        h = F.layer_norm(x, (H,))
        return F.linear(h, w_a) + F.linear(h, w_b)

    gm, weights = export_fn(parallel, torch.randn(2, H), weights=_weights(w_a=(H, H), w_b=(H, H)))
    gm = PassManager(context(weights)).run(gm, ["recognize_residual"])
    assert not _residual_nodes(gm)


@functools.cache
def _traced(name: str):
    return frontend.trace(zoo.build(name, init_std=0.3))


# OPT: pre-LayerNorm; BERT: post-LayerNorm; Llama: RMSNorm still written out (no norm pass ran).
@pytest.mark.parametrize("name", ["tiny-opt", "tiny-bert", "tiny-llama"])
def test_zoo_model_residuals(name):
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
    gm = PassManager(ctx).run(t.gm, ["recognize_residual"])
    # Two residual adds per layer (after attention, after the MLP); the embedding sums are not.
    assert len(_residual_nodes(gm)) == 2 * t.info.num_layers
    torch.testing.assert_close(run(gm, ctx.weights, *inputs)[0], expected, atol=1e-4, rtol=1e-5)
