"""Normalisation ops: `dsc::rms_norm`, `dsc::layer_norm`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rms_norm", "layer_norm"]


@torch.library.custom_op("dsc::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype) -> Tensor:
    """weight * (x / sqrt(mean(x², -1) + eps)), computed in fp32, cast to out_dtype.

    The normalised value is cast to x.dtype before the weight multiplies it, as HF models do.
    """
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = normed if weight is None else weight * normed
    return out.to(out_dtype)


@rms_norm.register_fake
def _(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("dsc::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dimension (fp32 statistics)."""
    out = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], None, None, eps).to(x.dtype)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)
