import functools
import math

import pytest
import torch
import torch.nn.functional as F

from dsc import frontend, zoo
from dsc.passes.manager import PassManager
from dsc.passes.recognize_mlp import recognize_mlp  # noqa: F401  (registers)
from tests.passes.helpers import context, export_fn, ops, run

dsc = torch.ops.dsc


def gpt2_gelu(x):
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


def respelled_gelu_tanh(x):
    inner = 0.7978845608028654 * x + 0.7978845608028654 * 0.044715 * (x * x * x)
    return (x + x * torch.tanh(inner)) * 0.5


def erf_gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def sigmoid_silu(x):
    return x * torch.sigmoid(x)


def _dsc_nodes(gm, op):
    return [n for n in gm.graph.nodes if n.target is op.default]


def _check(fn, gm, weights, *inputs):
    torch.testing.assert_close(
        run(gm, weights, *inputs)[0], fn(*inputs, *weights.values()), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("fn", "kind"),
    [
        (F.silu, "silu"),
        (F.relu, "relu"),
        (F.gelu, "gelu"),
        (functools.partial(F.gelu, approximate="tanh"), "gelu_tanh"),
        (gpt2_gelu, "gelu_tanh"),
        (respelled_gelu_tanh, "gelu_tanh"),
        (erf_gelu, "gelu"),
        (sigmoid_silu, "silu"),
    ],
)
def test_activation_before_expected(fn, kind):
    def mlp(x, w_in, w_out):
        return F.linear(fn(F.linear(x, w_in)), w_out)

    x = torch.randn(2, 3, 8)
    weights = {"w_in": torch.randn(16, 8), "w_out": torch.randn(8, 16)}
    gm, weights = export_fn(mlp, x, weights=weights)
    gm = PassManager(context(weights)).run(gm, ["recognize_mlp"])
    # Expected: linear -> dsc.activation(kind) -> linear, nothing else.
    assert ops(gm) == {"linear": 2, "activation": 1}
    assert _dsc_nodes(gm, dsc.activation)[0].args[1] == kind
    _check(mlp, gm, weights, x)


def swiglu(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def fused_gate_up(x, w_gate_up, w_down):
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.gelu(gate, approximate="tanh") * up, w_down)


def sliced_up_first(x, w_up_gate, w_down):
    h = F.linear(x, w_up_gate)
    return F.linear(h[..., :16] * F.silu(h[..., 16:]), w_down)


@pytest.mark.parametrize(
    ("fn", "shapes", "kind"),
    [
        (swiglu, {"w_gate": (16, 8), "w_up": (16, 8), "w_down": (8, 16)}, "silu"),
        (fused_gate_up, {"w_gate_up": (32, 8), "w_down": (8, 16)}, "gelu_tanh"),
        (sliced_up_first, {"w_up_gate": (32, 8), "w_down": (8, 16)}, "silu"),
    ],
)
def test_gated_before_expected(fn, shapes, kind):
    x = torch.randn(2, 3, 8)
    weights = {k: torch.randn(s) for k, s in shapes.items()}
    gm, weights = export_fn(fn, x, weights=weights)
    gm = PassManager(context(weights)).run(gm, ["recognize_mlp"])
    after = ops(gm)
    # Expected: one dsc.gated_activation, no activation or mul left over.
    assert after["gated_activation"] == 1
    assert "activation" not in after and "mul" not in after and "silu" not in after
    assert _dsc_nodes(gm, dsc.gated_activation)[0].args[2] == kind
    _check(fn, gm, weights, x)


def test_act_times_residual_does_not_gate():
    def act_times_residual(x, w):
        return F.silu(F.linear(x, w)) * x

    x = torch.randn(2, 3, 8)
    gm, weights = export_fn(act_times_residual, x, weights={"w": torch.randn(8, 8)})
    gm = PassManager(context(weights)).run(gm, ["recognize_mlp"])
    # The activation is recognised, the product with the residual is not a gate.
    assert ops(gm) == {"linear": 1, "activation": 1, "mul": 1}
    _check(act_times_residual, gm, weights, x)


def test_projections_of_different_inputs_do_not_gate():
    def two_inputs(x, y, w_gate, w_up):
        return F.silu(F.linear(x, w_gate)) * F.linear(y, w_up)

    x, y = torch.randn(2, 8), torch.randn(2, 8)
    weights = {"w_gate": torch.randn(16, 8), "w_up": torch.randn(16, 8)}
    gm, weights = export_fn(two_inputs, x, y, weights=weights)
    gm = PassManager(context(weights)).run(gm, ["recognize_mlp"])
    assert "gated_activation" not in ops(gm) and ops(gm)["mul"] == 1


def test_wrong_constant_does_not_match():
    def almost_gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978 * (x + 0.044715 * torch.pow(x, 3.0))))

    gm, weights = export_fn(almost_gelu, torch.randn(4, 8))
    gm = PassManager(context(weights)).run(gm, ["recognize_mlp"])
    assert "activation" not in ops(gm) and ops(gm)["tanh"] == 1


@functools.cache
def _traced(name: str):
    return frontend.trace(zoo.build(name, init_std=0.3))


@pytest.mark.parametrize(
    ("name", "op", "kind"),
    [
        ("tiny-gpt2", dsc.activation, "gelu_tanh"),
        ("tiny-opt", dsc.activation, "relu"),
        ("tiny-llama", dsc.gated_activation, "silu"),
    ],
)
def test_zoo_model_mlps(name, op, kind):
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
    gm = PassManager(ctx).run(t.gm, ["recognize_mlp"])
    found = _dsc_nodes(gm, op)
    # One activation per layer, of the model's kind, and no aten activation left.
    assert len(found) == t.info.num_layers
    assert {n.args[-1] for n in found} == {kind}
    assert not {"tanh", "silu", "gelu", "relu"} & set(ops(gm))
    torch.testing.assert_close(run(gm, ctx.weights, *inputs)[0], expected, atol=1e-4, rtol=1e-5)
