"""Residual connection: `dsc::residual_add` (the residual stream plus a block's projection).

A plain add, but named, so later passes know where a block ends: the add can be fused into the
epilogue of the GEMM that produced `y`, and it is where tensor-parallel partial sums must already
have been reduced.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["residual_add"]


@torch.library.custom_op("dsc::residual_add", mutates_args=())
def residual_add(x: Tensor, y: Tensor) -> Tensor:
    """x + y with torch's broadcasting and dtype promotion; x is the stream, y the block output."""
    return x + y


@residual_add.register_fake
def _(x, y):
    shape = torch.broadcast_shapes(x.shape, y.shape)
    return x.new_empty(shape, dtype=torch.promote_types(x.dtype, y.dtype))
