"""Activation ops of transformer MLPs: `dsc::activation`, `dsc::gated_activation`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ACTIVATIONS", "activation", "gated_activation", "apply_activation"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def apply_activation(x: Tensor, kind: str) -> Tensor:
    if kind == "silu":
        return torch.nn.functional.silu(x)
    if kind == "gelu":
        return torch.nn.functional.gelu(x)
    if kind == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if kind == "relu":
        return torch.relu(x)
    raise ValueError(f"unknown activation {kind!r}; known: {ACTIVATIONS}")


@torch.library.custom_op("dsc::activation", mutates_args=())
def activation(x: Tensor, kind: str) -> Tensor:
    """An ungated MLP activation (GeLU, tanh-GeLU, ReLU, SiLU)."""
    return apply_activation(x, kind)


@activation.register_fake
def _(x, kind):
    return torch.empty_like(x)


@torch.library.custom_op("dsc::gated_activation", mutates_args=())
def gated_activation(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    """act(gate) * up — the gated MLP of Llama-style models (SwiGLU, GeGLU)."""
    return apply_activation(gate, kind) * up


@gated_activation.register_fake
def _(gate, up, kind):
    return gate.new_empty(torch.broadcast_shapes(gate.shape, up.shape))
