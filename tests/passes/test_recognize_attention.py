import math

import torch
import torch.nn.functional as F

from dsc import zoo
from dsc.frontend import trace
from dsc.passes.context import PassContext
from dsc.passes.manager import PassManager
from dsc.passes.canonicalize import canonicalize  # noqa: F401  (registers)
from dsc.passes.recognize_attention import recognize_attention  # noqa: F401  (registers)
from dsc.target import Target
from tests.passes.helpers import context, export_fn, ops, run


def test_sdpa_causal_before_expected():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    gm, weights = export_fn(attn, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert ops(gm) == {"attention": 1}
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.args[4] is True and math.isclose(node.args[5], 1 / math.sqrt(8))
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], attn(q, k, v))


def test_gqa_repeat_is_folded_into_the_op():
    def gqa(q, k, v):
        k = k[:, :, None].expand(2, 2, 2, 5, 8).reshape(2, 4, 5, 8)
        v = v[:, :, None].expand(2, 2, 2, 5, 8).reshape(2, 4, 5, 8)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    gm, weights = export_fn(gqa, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert ops(gm) == {"attention": 1}  # no expand/reshape left: K/V stay at 2 heads
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], gqa(q, k, v))


def test_gqa_repeat_spelled_with_whole_slices_is_folded():
    """A CUDA trace spells repeat_kv's `x[:, :, None, :, :]` with a slice per `:`; canonicalize
    drops them, so the cache still holds the 2 KV heads rather than 4 repeated ones."""
    whole = 9223372036854775807

    def repeat(x):
        x = torch.ops.aten.slice.Tensor(torch.ops.aten.slice.Tensor(x, 0, 0, whole), 1, 0, whole)
        x = torch.ops.aten.slice.Tensor(x.unsqueeze(2), 3, 0, whole)
        return x.expand(2, 2, 2, 5, 8).reshape(2, 4, 5, 8)

    def gqa(q, k, v):
        return F.scaled_dot_product_attention(q, repeat(k), repeat(v), is_causal=True)

    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    gm, weights = export_fn(gqa, q, k, v)
    assert ops(gm)["slice"] == 6
    gm = PassManager(context(weights)).run(gm, ["canonicalize", "recognize_attention"])
    assert ops(gm) == {"attention": 1}
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], gqa(q, k, v))


def test_softmax_form_before_expected():
    def eager(q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.3
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    gm, weights = export_fn(eager, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert ops(gm) == {"attention": 1}
    torch.testing.assert_close(run(gm, weights, q, k, v)[0], eager(q, k, v))


def test_dropout_does_not_match():
    def dropped(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True)

    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    gm, weights = export_fn(dropped, q, k, v)
    gm = PassManager(context(weights)).run(gm, ["recognize_attention"])
    assert "attention" not in ops(gm)


def _recognised(model):
    traced = trace(model)
    ctx = PassContext(Target(), traced.weights, traced.info, traced.inputs)
    gm = PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    return [n for n in gm.graph.nodes if n.target is torch.ops.dsc.attention.default]


def test_hf_masks_are_classified_by_probe():
    llama = _recognised(zoo.build("tiny-llama"))
    assert len(llama) == 2 and all(n.args[4] is True and n.args[3] is not None for n in llama)
    bert = _recognised(zoo.build("tiny-bert"))
    assert len(bert) == 2 and all(n.args[4] is False and n.args[3] is not None for n in bert)


def test_sliding_window_mask_does_not_match():
    # A window of 2 tokens differs from plain causal on the 6-token probe: left as sdpa.
    model = zoo.build("tiny-mistral", sliding_window=2)
    traced = trace(model)
    ctx = PassContext(Target(), traced.weights, traced.info, traced.inputs)
    gm = PassManager(ctx).run(traced.gm, ["canonicalize", "recognize_attention"])
    assert "scaled_dot_product_attention" in ops(gm)
    assert "attention" not in ops(gm)
