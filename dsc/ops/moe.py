"""Mixture-of-experts block: `dsc::moe` (router softmax, top-k, optional renormalise, experts)."""

from __future__ import annotations

import torch
from torch import Tensor

from dsc.ops.mlp import ACTIVATIONS, apply_activation

__all__ = ["EXPERT_ACTIVATIONS", "GROUP_SCORINGS", "SCORINGS", "expert_activation", "moe",
           "moe_reference", "route_reference"]

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


#: How router logits become scores: a softmax over the experts, or each expert's sigmoid.
SCORINGS = ("softmax", "sigmoid")

#: How group-limited routing ranks a group: by the sum of its two best experts' choice values
#: (DeepSeek-V3, GLM-4.5) or by its best expert's alone (DeepSeek-V2's group_limited_greedy).
GROUP_SCORINGS = ("top2", "max")


def route_reference(
    logits: Tensor,
    top_k: int,
    normalize: bool,
    scoring: str = "softmax",
    selection_bias: Tensor | None = None,
    groups: int = 1,
    group_top_k: int = 1,
    scale: float = 1.0,
    group_scoring: str = "top2",
) -> tuple[Tensor, Tensor]:
    """(weights [T, k] float32, experts [T, k]) from router logits [T, E].

    scores = softmax or sigmoid of the logits (fp32). The experts are the top_k of
    scores + selection_bias (the bias steers the choice only: DeepSeek-V3, GLM-4.5, MiniMax-M2,
    ERNIE 4.5), among the experts of the group_top_k of `groups` equal groups that score highest:
    by their two best experts (group_scoring "top2": DeepSeek-V3's group-limited routing) or by
    their best one ("max": DeepSeek-V2's). The weights are the chosen
    experts' scores, renormalised to sum to one when `normalize`, times `scale`.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    if group_scoring not in GROUP_SCORINGS:
        raise ValueError(f"unknown group_scoring {group_scoring!r}; expected one of "
                         f"{GROUP_SCORINGS}")
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if selection_bias is None else scores + selection_bias.float()
    if groups > 1:
        tokens, experts = choice.shape
        by_group = choice.view(tokens, groups, experts // groups)
        best_of = 1 if group_scoring == "max" else min(2, experts // groups)
        best = by_group.topk(best_of, dim=-1).values.sum(-1)
        kept = torch.zeros_like(best, dtype=torch.bool)
        kept.scatter_(1, best.topk(group_top_k, dim=-1).indices, True)
        choice = choice.masked_fill(~kept.repeat_interleave(experts // groups, dim=1), -torch.inf)
    experts = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scale, experts


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
    scoring: str = "softmax",
    selection_bias: Tensor | None = None,
    groups: int = 1,
    group_top_k: int = 1,
    scale: float = 1.0,
    group_scoring: str = "top2",
) -> Tensor:
    """x [..., H]; router_weight [E, H]; gate_up [E, 2F, H] (gate rows then up rows); down [E, H, F];
    optional biases: router [E], gate_up [E, 2F], down [E, H].

    Each token goes to top_k experts as `route_reference` picks them from its router logits
    (by default: the top_k softmax probabilities, renormalised when `normalize`); an expert
    computes down @ expert_activation(gate @ x, up @ x), scaled by its routing weight.
    """
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    logits = torch.nn.functional.linear(tokens, router_weight, router_bias)
    weights, experts = route_reference(logits, top_k, normalize, scoring, selection_bias, groups,
                                       group_top_k, scale, group_scoring)
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
    scoring: str = "softmax",
    selection_bias: Tensor | None = None,
    groups: int = 1,
    group_top_k: int = 1,
    scale: float = 1.0,
    group_scoring: str = "top2",
) -> Tensor:
    return moe_reference(x, router_weight, gate_up, down, top_k, normalize, kind, router_bias,
                         gate_up_bias, down_bias, scoring, selection_bias, groups, group_top_k,
                         scale, group_scoring)


@moe.register_fake
def _(x, router_weight, gate_up, down, top_k, normalize, kind, router_bias=None,
      gate_up_bias=None, down_bias=None, scoring="softmax", selection_bias=None, groups=1,
      group_top_k=1, scale=1.0, group_scoring="top2"):
    return torch.empty_like(x)
