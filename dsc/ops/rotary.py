"""Rotary position embedding: `dsc::rotary`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rotary"]


@torch.library.custom_op("dsc::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]).

    x: [B, H, S, D]; cos, sin: broadcastable to x (HF passes [B, 1, S, D]).
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@rotary.register_fake
def _(x, cos, sin):
    shape = torch.broadcast_shapes(x.shape, cos.shape, sin.shape)
    dtype = torch.promote_types(x.dtype, cos.dtype)
    return x.new_empty(shape, dtype=dtype)
