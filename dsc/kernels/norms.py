"""RMSNorm and LayerNorm over the last dimension, optionally fused with the residual add.

A decoder layer ends its attention and MLP blocks with `h = x + residual; y = norm(h)`. Done as
two kernels that is five passes over [rows, hidden] (read x, read residual, write h, read h,
write y); fused it is four, and the statistics come from registers. Each program holds BLOCK_M
whole rows in registers (hidden sizes up to 64K elements), so every input is read exactly once and
every output written once: the kernel is a pure stream, and its speed is the copy bandwidth.

Statistics and the normalisation are computed in fp32. RMSNorm rounds the normalised value to the
input dtype before the weight multiplies it (what Hugging Face's Llama-family norms do); LayerNorm
rounds once, at the end (what `torch.nn.LayerNorm` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import pdl
from dsc.kernels.checks import check_device

__all__ = ["layer_norm", "rms_norm"]

_MAX_ROW = 65536  # elements of one row held in registers by one program


@triton.jit
def _norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    h_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_o,
    stride_h,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait_and_release(USE_PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    # Read the rows once; everything after this works from registers.
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # h is rounded to the activation dtype: it is the value the next block adds to.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h
    xf = x.to(tl.float32)

    if IS_RMS:
        mean_sq = tl.sum(xf * xf, axis=1) / n_cols
        y = xf * tl.rsqrt(mean_sq + eps)[:, None]
        y = y.to(x.dtype).to(tl.float32)
    else:
        mean = tl.sum(xf, axis=1) / n_cols
        centred = tl.where(col_ok[None, :], xf - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / n_cols
        y = centred * tl.rsqrt(var + eps)[:, None]

    # The per-column weight and bias are shared by all rows of the block (L2/L1 resident).
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # Write the normalised rows in the input dtype.
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], y.to(x.dtype), mask=mask)


def _as_rows(t: Tensor, name: str) -> Tensor:
    """View t as [rows, hidden] without copying when its last dim is contiguous."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    rows = t.reshape(-1, t.shape[-1])  # a view unless the leading dims cannot be merged
    if rows.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension")
    return rows


def _output(given: Tensor | None, x: Tensor, name: str) -> Tensor:
    if given is None:
        return torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if given.shape != x.shape or given.dtype != x.dtype or given.device != x.device:
        raise ValueError(
            f"{name} must be {tuple(x.shape)} {x.dtype} on {x.device}; "
            f"got {tuple(given.shape)} {given.dtype} on {given.device}"
        )
    if not given.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return given


def _launch_params(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n_cols)
    # Short rows: several per program, so each program still moves a few KB.
    block_m = max(1, min(16, 2048 // block_n))
    block_m = min(block_m, triton.next_power_of_2(n_rows))
    elems = block_m * block_n
    # About 16 elements per thread: two 16-byte loads per input in flight for 2-byte types.
    num_warps = max(1, min(16, elems // 512))
    return block_m, block_n, num_warps


def _norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None,
    is_rms: bool,
    out: Tensor | None,
    residual_out: Tensor | None,
    num_warps: int | None,
) -> Tensor | tuple[Tensor, Tensor]:
    kind = "rms_norm" if is_rms else "layer_norm"
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{kind}: x must have a non-empty last dimension; got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{kind}: x must be a floating-point tensor; got {x.dtype}")
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (hidden,):
            raise ValueError(f"{kind}: {name} must be [{hidden}]; got shape {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"{kind}: residual must match x's shape {tuple(x.shape)}; got {tuple(residual.shape)}"
        )
    if hidden > _MAX_ROW:
        raise ValueError(f"{kind}: rows longer than {_MAX_ROW} elements are not supported")
    check_device(*(t for t in (x, weight, bias, residual) if t is not None))

    x2 = _as_rows(x, "x")
    n_rows = x2.shape[0]
    out = _output(out, x, "out")
    out2 = out.view(-1, hidden)
    if residual is not None:
        r2 = _as_rows(residual, "residual")
        h = _output(residual_out, x, "residual_out")
        h2 = h.view(-1, hidden)
    else:
        r2 = h2 = x2
    if n_rows == 0:
        return out if residual is None else (out, h)

    block_m, block_n, warps = _launch_params(n_rows, hidden)
    _norm_kernel[(triton.cdiv(n_rows, block_m),)](
        x2,
        r2,
        weight if weight is not None else x2,
        bias if bias is not None else x2,
        out2,
        h2,
        n_rows,
        hidden,
        x2.stride(0),
        r2.stride(0),
        out2.stride(0),
        h2.stride(0),
        eps,
        IS_RMS=is_rms,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps or warps,
        **pdl.launch_options(x.device),
    )
    return out if residual is None else (out, h)


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    *,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
    num_warps: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dim: weight * h / sqrt(mean(h^2) + eps), h = x (+ residual).

    x: [..., hidden]; weight: [hidden] or None; fp32 math, output in x.dtype. With a residual of
    x's shape, returns (normed, h) where h = x + residual (the fused add + norm of a decoder layer).
    `out` / `residual_out` (contiguous, x's shape and dtype) receive normed / h if given.
    """
    return _norm(x, weight, None, eps, residual, True, out, residual_out, num_warps)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    *,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
    num_warps: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim of h = x (+ residual), fp32 math, output in x.dtype.

    weight and bias: [hidden] or None. With a residual, returns (normed, h).
    `out` / `residual_out` as in `rms_norm`.
    """
    return _norm(x, weight, bias, eps, residual, False, out, residual_out, num_warps)
