"""Collective ops as graph nodes: `dsc::all_reduce`, `dsc::all_gather`,
`dsc::all_reduce_residual` (an all_reduce with the residual add after it),
`dsc::all_reduce_residual_norm` (an all_reduce with the residual add and RMSNorm after it), and
`dsc::linear_all_reduce` (a row-parallel product and the all_reduce of its partials).

They run on the default torch.distributed process group (NCCL on GPUs, gloo on CPU). In a single
process they are identities, so a partitioned graph can still be checked on one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dsc.ops.norms import rms_norm

__all__ = ["all_reduce", "all_gather", "all_reduce_residual", "all_reduce_residual_norm",
           "linear_all_reduce"]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.library.custom_op("dsc::all_reduce", mutates_args=())
def all_reduce(x: Tensor) -> Tensor:
    """Sum of x over all ranks."""
    out = x.clone()
    if _world() > 1:
        dist.all_reduce(out)
    return out


@all_reduce.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("dsc::all_gather", mutates_args=())
def all_gather(x: Tensor, dim: int) -> Tensor:
    """Concatenation of every rank's x along dim, in rank order."""
    world = _world()
    if world == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


@all_gather.register_fake
def _(x, dim):
    shape = list(x.shape)
    shape[dim] = shape[dim] * _world()
    return x.new_empty(shape)


@torch.library.custom_op("dsc::all_reduce_residual", mutates_args=())
def all_reduce_residual(x: Tensor, residual: Tensor) -> Tensor:
    """h = residual + all_reduce(x): a row-parallel block's output joined to the residual stream,
    the sum rounded to x.dtype before the add as the two ops it replaces round."""
    return residual + all_reduce(x)


@all_reduce_residual.register_fake
def _(x, residual):
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    return x.new_empty(shape, dtype=torch.promote_types(x.dtype, residual.dtype))


@torch.library.custom_op("dsc::all_reduce_residual_norm", mutates_args=())
def all_reduce_residual_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(h, rms_norm(h)) with h = residual + all_reduce(x): a row-parallel block's output joined
    to the residual stream and normalised for the next block, as one op.

    Each step rounds as the three ops it replaces do: the sum to x.dtype, h to the promoted
    dtype, the normalised value to h.dtype before the weight multiplies it.
    """
    h = residual + all_reduce(x)
    return h, rms_norm(h, weight, eps, out_dtype)


@all_reduce_residual_norm.register_fake
def _(x, residual, weight, eps, out_dtype):
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    h = x.new_empty(shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return h, h.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("dsc::linear_all_reduce", mutates_args=())
def linear_all_reduce(x: Tensor, weight: Tensor) -> Tensor:
    """Sum over all ranks of x @ weight^T (each rank's shard of a row-parallel projection), the
    product rounded to x's dtype before the sum as the two ops it replaces round."""
    return all_reduce(torch.nn.functional.linear(x, weight))


@linear_all_reduce.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
