"""End-to-end: dsc.compile on small HF configs equals eager HF, at two shapes after one compile."""

import pytest
import torch

import dsc
from dsc import zoo

ARCHS = ["tiny-gpt2", "tiny-opt", "tiny-llama", "tiny-mistral", "tiny-mixtral", "tiny-bert"]


def _eager(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("name", ARCHS)
def test_forward_matches_eager_at_two_shapes(name):
    model = zoo.build(name, init_std=0.2)
    compiled = dsc.compile(model, target="cpu")
    for shape in [(2, 9), (3, 5)]:
        ids = torch.randint(0, 200, shape)
        mask = torch.ones(shape, dtype=torch.long)
        mask[0, :2] = 0  # left padding in the first row
        key = "logits" if compiled.info["output"] == "logits" else "last_hidden_state"
        out = compiled(ids, attention_mask=mask)[key]
        ref = _eager(model, ids, mask)
        assert out.shape == ref.shape
        torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)


def test_recognised_ops_on_llama():
    compiled = dsc.compile(zoo.build("tiny-llama"), target="cpu")
    counts = compiled.history[-1].counts
    # 2 layers: 2 norms each + final norm; rotary on q and k; one attention per layer.
    assert counts["dsc.rms_norm"] == 5
    assert counts["dsc.rotary"] == 4
    assert counts["dsc.cached_attention"] == 2
    assert "aten.scaled_dot_product_attention" not in counts
    assert {"prefill", "decode", "forward"} <= set(compiled.plan.programs)
