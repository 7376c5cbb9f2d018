"""Tracing a few layers and stamping out the rest (dsc.repeat_layers).

Before: a model with a stack of identical layers, traced whole.
Expected: the stamped trace is the same graph — the same ops in the same order, the same weights
under the same names, the same outputs — and compiled models built from it match eager HF.
Does not match: layers that differ (in their attributes, or in what their code bakes into the
graph) are traced whole, and so is a stamp the example run disagrees with.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dsc
from dsc import repeat_layers, zoo
from dsc.frontend import trace

LIMITS = dict(dtype=torch.float32, max_batch=4, max_seq_len=64)


def _ops(traced) -> list[str]:
    return [str(n.target) for n in traced.gm.graph.nodes if n.op == "call_function"]


def _run(traced, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions}
    args = [traced.weights[n.meta["dsc_weight"]] if "dsc_weight" in n.meta
            else feed[n.meta["dsc_input"]] for n in traced.gm.graph.nodes if n.op == "placeholder"]
    out = traced.gm(*args)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize(
    "name,key", [("tiny-llama", "num_hidden_layers"), ("tiny-gpt2", "n_layer"),
                 ("tiny-mixtral", "num_hidden_layers"), ("tiny-opt", "num_hidden_layers"),
                 ("tiny-bert", "num_hidden_layers")]
)
def test_stamped_trace_is_the_whole_trace(name, key):
    model = zoo.build(name, init_std=0.3, **{key: 6})
    stamped = trace(model, **LIMITS, position_ids=True)
    whole = trace(model, **LIMITS, position_ids=True, repeat_layers=False)
    assert stamped.stamped_layers == 6 - repeat_layers.TRACED_LAYERS
    assert whole.stamped_layers == 0
    assert _ops(stamped) == _ops(whole)
    assert stamped.weights.keys() == whole.weights.keys()
    assert all(torch.equal(stamped.weights[k], whole.weights[k]) for k in whole.weights)
    ids = torch.randint(0, 200, (3, 7), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(7).expand(3, 7)
    torch.testing.assert_close(_run(stamped, ids, positions), _run(whole, ids, positions),
                               rtol=0, atol=0)
    # Copies name their own layer: the weights layer 5 reads are layer 5's.
    prefix = f"model.{repeat_layers.find_layer_stack(model).path}."
    layer5 = [n for n in stamped.gm.graph.nodes if repeat_layers._layer_of(n, prefix) == 5]
    read = {a.meta["dsc_weight"] for n in layer5 for a in n.all_input_nodes
            if "dsc_weight" in a.meta}
    assert read and all(".5." in w for w in read)


def test_few_layers_are_traced_whole():
    model = zoo.build("tiny-llama", num_hidden_layers=repeat_layers.TRACED_LAYERS)
    assert repeat_layers.find_layer_stack(model) is None
    assert trace(model, **LIMITS).stamped_layers == 0


def test_compiled_deep_model_matches_hf():
    model = zoo.build("tiny-llama", init_std=0.3, num_hidden_layers=5)
    compiled = dsc.compile(model, dsc.Target(device="cpu", max_batch=2, max_seq_len=48))
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        hf_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(compiled(ids).logits, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8), hf_tokens)
    assert "trace: 3 of 5 layers traced, 2 stamped" in compiled.report()


class _Block(nn.Module):
    def __init__(self, width: int, layer_idx: int, width_scale: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.layer_idx = layer_idx
        self.width_scale = width_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.proj(x)) * self.width_scale


class _IndexScaledBlock(_Block):
    """Bakes its depth into the graph: every layer multiplies by a different constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.proj(x)) / (self.layer_idx + 1)


class _TokenModel(nn.Module):
    def __init__(self, block: type[_Block], depth: int = 6, width: int = 16, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, width)
        self.layers = nn.ModuleList(block(width, i, **kwargs) for i in range(depth))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_plain_token_model_is_stamped():
    model = _TokenModel(_Block).eval()
    traced = trace(model, **LIMITS)
    assert traced.stamped_layers == 3
    ids = torch.randint(0, 50, (2, 4))
    torch.testing.assert_close(_run(traced, ids), model(ids), rtol=1e-6, atol=1e-6)


def test_layers_with_different_attributes_are_not_a_stack():
    model = _TokenModel(_Block).eval()
    model.layers[4].width_scale = 0.5
    assert repeat_layers.find_layer_stack(model) is None
    traced = trace(model, **LIMITS)
    ids = torch.randint(0, 50, (2, 4))
    torch.testing.assert_close(_run(traced, ids), model(ids), rtol=1e-6, atol=1e-6)


def test_depth_baked_into_the_graph_is_traced_whole():
    model = _TokenModel(_IndexScaledBlock).eval()
    assert repeat_layers.find_layer_stack(model) is not None  # the attributes agree...
    traced = trace(model, **LIMITS)
    assert traced.stamped_layers == 0  # ...but layers 1 and 2 multiply by different constants
    assert "differs from layer 1" in traced.not_stamped_because
    ids = torch.randint(0, 50, (2, 4))
    torch.testing.assert_close(_run(traced, ids), model(ids), rtol=1e-6, atol=1e-6)


def test_example_run_catches_a_wrong_stamp(monkeypatch):
    """With the structural check switched off, the run on the example input still refuses."""
    monkeypatch.setattr(repeat_layers, "_check_repeat", lambda *args: None)
    model = _TokenModel(_IndexScaledBlock).eval()
    traced = trace(model, **LIMITS)
    assert traced.stamped_layers == 0
    assert "differs from the model" in traced.not_stamped_because
    ids = torch.randint(0, 50, (2, 4))
    torch.testing.assert_close(_run(traced, ids), model(ids), rtol=1e-6, atol=1e-6)


class _ExpertBlock(nn.Module):
    def __init__(self, width: int, layer_idx: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + sum(torch.tanh(expert(x)) for expert in self.experts) / 8


def test_the_stack_is_the_layers_not_a_longer_list_inside_them():
    model = _TokenModel(_ExpertBlock, depth=5).eval()
    assert repeat_layers.find_layer_stack(model).path == "layers"  # not layers.0.experts (8 long)
    traced = trace(model, **LIMITS)
    assert traced.stamped_layers == 2
    ids = torch.randint(0, 50, (2, 4))
    torch.testing.assert_close(_run(traced, ids), model(ids), rtol=1e-6, atol=1e-6)


class _DepthCheckingModel(_TokenModel):
    """Refuses to run with fewer layers than it was built with (as some model code does)."""

    def __init__(self):
        super().__init__(_Block)
        self.depth = len(self.layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if len(self.layers) != self.depth:
            raise RuntimeError(f"expected {self.depth} layers")
        return super().forward(input_ids)


def test_a_model_that_refuses_the_cut_is_traced_whole():
    model = _DepthCheckingModel().eval()
    traced = trace(model, **LIMITS)
    assert traced.stamped_layers == 0
    assert "TraceError" in traced.not_stamped_because
    ids = torch.randint(0, 50, (2, 4))
    torch.testing.assert_close(_run(traced, ids), model(ids), rtol=1e-6, atol=1e-6)
