"""Rotary position embedding in one pass: out = x * cos + rotate_half(x) * sin.

Written as torch ops this is six kernels (two slices, a negation, a concatenation, two products
and a sum) and three round trips through memory; here each program loads one (batch, head,
position) row of x with its cos/sin row once, rotates in registers and stores once. The two
halves of the head dimension are loaded as two vectors, so rotate_half is a swap, not a copy.

x: [B, H, S, D] (any strides); cos, sin: broadcastable to x as [B, 1, S, D] (HF's layout) —
passed with their own strides, a broadcast dimension having stride 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import pdl

__all__ = ["rotary"]


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    H, S, half,
    sxb, sxh, sxs, sxd,
    scb, sch, scs, scd,
    ssb, ssh, sss, ssd,
    sob, soh, sos, sod,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait_and_release(USE_PDL)
    row = tl.program_id(0)
    s = row % S
    h = (row // S) % H
    b = row // (S * H)
    d = tl.arange(0, BLOCK)
    ok = d < half
    x_row = x_ptr + b * sxb + h * sxh + s * sxs
    c_row = cos_ptr + b * scb + h * sch + s * scs
    n_row = sin_ptr + b * ssb + h * ssh + s * sss
    # Load both halves of x and of cos/sin once.
    x1 = tl.load(x_row + d * sxd, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (d + half) * sxd, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(c_row + d * scd, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (d + half) * scd, mask=ok, other=0.0).to(tl.float32)
    n1 = tl.load(n_row + d * ssd, mask=ok, other=0.0).to(tl.float32)
    n2 = tl.load(n_row + (d + half) * ssd, mask=ok, other=0.0).to(tl.float32)
    # rotate_half(x) = (-x2, x1): the first half takes -x2 * sin, the second x1 * sin.
    o_row = out_ptr + b * sob + h * soh + s * sos
    tl.store(o_row + d * sod, (x1 * c1 - x2 * n1).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(o_row + (d + half) * sod, (x2 * c2 + x1 * n2).to(out_ptr.dtype.element_ty), mask=ok)


def rotary(x: Tensor, cos: Tensor, sin: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Rotate x [B, H, S, D] by cos/sin (broadcastable to x); result in promote(x, cos) dtype."""
    if x.dim() != 4:
        raise ValueError(f"rotary expects x of rank 4 [B, H, S, D], got shape {tuple(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError(f"rotary needs an even head dimension, got {x.shape[-1]}")
    try:
        cos = cos.expand(x.shape)
        sin = sin.expand(x.shape)
    except RuntimeError as exc:
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not broadcast to x {tuple(x.shape)}") from exc
    if not (x.device == cos.device == sin.device):
        raise ValueError("rotary: x, cos and sin must be on one device")
    batch, heads, seq, dim = x.shape
    dtype = torch.promote_types(x.dtype, cos.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    half = dim // 2
    _rotary_kernel[(batch * heads * seq,)](
        x, cos, sin, out, heads, seq, half,
        *x.stride(), *cos.stride(), *sin.stride(), *out.stride(),
        BLOCK=triton.next_power_of_2(half),
        **pdl.launch_options(x.device),
    )
    return out
