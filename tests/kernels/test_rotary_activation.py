import pytest
import torch

from dsc.kernels.activation import gated_activation
from dsc.kernels.rotary import rotary
from dsc.ops.mlp import apply_activation
from dsc.ops.rotary import rotary as rotary_op


def test_rotary_matches_reference_on_strided_input(assert_close, poisoned):
    base = torch.randn(2, 5, 3, 12)  # [B, S, H, D]: the layout a projection view gives
    x = base.transpose(1, 2)  # [B, H, S, D], non-contiguous
    cos, sin = torch.randn(2, 1, 5, 12), torch.randn(2, 1, 5, 12)
    out = rotary(x, cos, sin, out=poisoned((2, 3, 5, 12)))
    assert_close(out, rotary_op(x, cos, sin))


def test_rotary_refuses_odd_head_dim():
    with pytest.raises(ValueError, match="even head dimension"):
        rotary(torch.randn(1, 1, 2, 7), torch.randn(1, 1, 2, 7), torch.randn(1, 1, 2, 7))


@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh", "relu"])
def test_gated_activation_on_halves_of_one_projection(kind, assert_close, poisoned):
    merged = torch.randn(3, 2, 2 * 37)
    gate, up = merged[..., :37], merged[..., 37:]
    out = gated_activation(gate, up, kind, out=poisoned((3, 2, 37)))
    assert_close(out, apply_activation(gate, kind) * up)


def test_gated_activation_refuses_unknown_kind():
    with pytest.raises(ValueError, match="unknown activation"):
        gated_activation(torch.randn(2, 3), torch.randn(2, 3), "swish2")
