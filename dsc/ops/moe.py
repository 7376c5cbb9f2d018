"""Mixture-of-experts block: `dsc::moe` (router softmax, top-k, optional renormalise, experts)."""

from __future__ import annotations

import torch
from torch import Tensor

from dsc.ops.mlp import apply_activation

__all__ = ["moe", "moe_reference"]


def moe_reference(
    x: Tensor,
    router_weight: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k: int,
    normalize: bool,
    kind: str,
) -> Tensor:
    """x [..., H]; router_weight [E, H]; gate_up [E, 2F, H] (gate rows then up rows); down [E, H, F].

    Each token goes to its top_k experts by softmax(router) probability (renormalised over the
    chosen k when `normalize`); an expert computes down @ (act(gate @ x) * (up @ x)).
    """
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    probs = torch.softmax(torch.nn.functional.linear(tokens, router_weight).float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(tokens)
    ffn = down.shape[-1]
    for expert in range(router_weight.shape[0]):
        token_idx, slot = torch.nonzero(experts == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        h = torch.nn.functional.linear(tokens[token_idx], gate_up[expert])
        h = apply_activation(h[:, :ffn], kind) * h[:, ffn:]
        y = torch.nn.functional.linear(h, down[expert])
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
) -> Tensor:
    return moe_reference(x, router_weight, gate_up, down, top_k, normalize, kind)


@moe.register_fake
def _(x, router_weight, gate_up, down, top_k, normalize, kind):
    return torch.empty_like(x)
