"""Mixture-of-experts block: `dsc::moe` (router softmax, top-k, optional renormalise, experts)."""

from __future__ import annotations

import torch
from torch import Tensor

from dsc.ops.mlp import ACTIVATIONS, apply_activation

__all__ = ["EXPERT_ACTIVATIONS", "expert_activation", "moe", "moe_reference"]

# GPT-OSS's experts: gate clamped from above, up clamped both ways, a sharper sigmoid, and up
# shifted by one: gate * sigmoid(1.702 * gate) * (up + 1).
CLAMPED_SWIGLU_LIMIT, CLAMPED_SWIGLU_ALPHA = 7.0, 1.702

#: What an expert computes from its gate and up halves: act(gate) * up for the MLP
#: activations, or GPT-OSS's "clamped_swiglu".
EXPERT_ACTIVATIONS = (*ACTIVATIONS, "clamped_swiglu")


def expert_activation(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    if kind == "clamped_swiglu":
        gate = gate.clamp(max=CLAMPED_SWIGLU_LIMIT)
        up = up.clamp(-CLAMPED_SWIGLU_LIMIT, CLAMPED_SWIGLU_LIMIT)
        return gate * torch.sigmoid(gate * CLAMPED_SWIGLU_ALPHA) * (up + 1)
    return apply_activation(gate, kind) * up


def moe_reference(
    x: Tensor,
    router_weight: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k: int,
    normalize: bool,
    kind: str,
    router_bias: Tensor | None = None,
    gate_up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
) -> Tensor:
    """x [..., H]; router_weight [E, H]; gate_up [E, 2F, H] (gate rows then up rows); down [E, H, F];
    optional biases: router [E], gate_up [E, 2F], down [E, H].

    Each token goes to its top_k experts by softmax(router) probability (renormalised over the
    chosen k when `normalize`); an expert computes down @ expert_activation(gate @ x, up @ x).
    """
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    logits = torch.nn.functional.linear(tokens, router_weight, router_bias)
    weights, experts = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(tokens)
    ffn = down.shape[-1]
    for expert in range(router_weight.shape[0]):
        token_idx, slot = torch.nonzero(experts == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        h = torch.nn.functional.linear(
            tokens[token_idx], gate_up[expert], None if gate_up_bias is None else gate_up_bias[expert]
        )
        h = expert_activation(h[:, :ffn], h[:, ffn:], kind)
        y = torch.nn.functional.linear(
            h, down[expert], None if down_bias is None else down_bias[expert]
        )
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
    return out.reshape(shape)


@torch.library.custom_op("dsc::moe", mutates_args=())
def moe(
    x: Tensor,
    router_weight: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k: int,
    normalize: bool,
    kind: str,
    router_bias: Tensor | None = None,
    gate_up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
) -> Tensor:
    return moe_reference(x, router_weight, gate_up, down, top_k, normalize, kind, router_bias,
                         gate_up_bias, down_bias)


@moe.register_fake
def _(x, router_weight, gate_up, down, top_k, normalize, kind, router_bias=None,
      gate_up_bias=None, down_bias=None):
    return torch.empty_like(x)
