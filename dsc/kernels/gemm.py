"""Tiled GEMM with a fused epilogue, for prefill-sized batches.

`linear_fused` computes act(x @ weight^T + bias) + residual in one kernel: the bias, activation and
residual add happen on the fp32 accumulator before the single store, so the [M, N] result is
written once instead of read and rewritten by three elementwise kernels.

`gated_linear` is the fused MLP up-projection of gated MLPs (SwiGLU, GeGLU): the weight stacks the
gate rows on top of the up rows, each program accumulates the matching gate and up tiles side by
side from the same x tile, and only act(gate) * up is written, so neither [M, N] intermediate ever
reaches device memory.

Both use the classic tiled scheme: program (i, j) owns a [BLOCK_M, BLOCK_N] output tile and walks K
with `tl.dot`; programs are grouped along M (GROUP_M) so consecutive programs share weight tiles
in L2. Weight tiles are read straight from the [N, K] layout as transposed [BLOCK_K, BLOCK_N]
operands (no copy of the weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels.checks import check_device, check_out

__all__ = ["ACTIVATIONS", "GemmConfig", "gated_linear", "linear_fused"]

#: Activation names the epilogue accepts (None means identity; "gelu" is the erf form).
ACTIVATIONS = (None, "silu", "gelu", "gelu_tanh", "relu")


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and pipelining of the tiled GEMM kernels."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


@triton.jit
def _apply_activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # tanh from exp(-2|y|) <= 1: no overflow, and only functions every backend provides.
        y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        x = 0.5 * x * (1.0 + tl.where(y >= 0.0, t, -t))
    elif ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Walk output tiles in column-major groups of GROUP_M row blocks: programs that run together
    # share the same weight tiles, which then come from L2 rather than device memory.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _linear_fused_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped indices keep the K loop free of row/column masks; wrapped results are not stored.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        # Load the x tile [BLOCK_M, BLOCK_K] and the weight tile as W^T [BLOCK_K, BLOCK_N].
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue on the fp32 accumulator: bias, activation, residual, then one store.
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = _apply_activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_linear_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Gate row n and up row N + n of the stacked weight feed the same output column.
    g_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = w_ptr + (cols + N)[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        # One x tile feeds both products.
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        # The gate and up weight tiles, each as W^T [BLOCK_K, BLOCK_N].
        bg = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
        bu = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk

    out = _apply_activation(acc_g, ACTIVATION) * acc_u
    # Only act(gate) * up leaves the chip.
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_operands(x: Tensor, weight: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K]; got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K]; got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"K mismatch: x is {tuple(x.shape)} but weight is {tuple(weight.shape)} (weight is [N, K])"
        )
    if 0 in x.shape or 0 in weight.shape:
        raise ValueError(f"empty operands: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {t.dtype}")


def _check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _default_config(m: int, n: int) -> GemmConfig:
    # Measured best of a small sweep at M=2048, N=K=4096 on an H100 (bench/NOTES-kernels.md).
    if m <= 64:
        return GemmConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)
    return GemmConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)


def linear_fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
    *,
    out: Tensor | None = None,
    config: GemmConfig | None = None,
) -> Tensor:
    """act(x @ weight^T + bias) + residual in one kernel.

    x: [M, K]; weight: [N, K] (nn.Linear layout); bias: [N] or None; activation: one of
    `ACTIVATIONS`; residual: [M, N] or None. Returns [M, N] in x.dtype; fp32 accumulation.
    `out` ([M, N], any strides) receives the result if given; `config` overrides the tiles.
    """
    _check_operands(x, weight)
    _check_activation(activation)
    m, k = x.shape
    n = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must be [N={n}]; got shape {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (m, n):
        raise ValueError(f"residual must be [M, N] = [{m}, {n}]; got {tuple(residual.shape)}")
    check_device(*(t for t in (x, weight, bias, residual) if t is not None))

    cfg = config or _default_config(m, n)
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        check_out(out, (m, n), x)
    res = residual if residual is not None else out
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _linear_fused_kernel[grid](
        x,
        weight,
        bias if bias is not None else out,
        res,
        out,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        res.stride(0),
        res.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=activation,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def gated_linear(
    x: Tensor,
    weight_gate_up: Tensor,
    activation: str | None = "silu",
    *,
    out: Tensor | None = None,
    config: GemmConfig | None = None,
) -> Tensor:
    """act(x @ Wg^T) * (x @ Wu^T) in one kernel, the fused up-projection of a gated MLP.

    x: [M, K]; weight_gate_up: [2N, K], the N gate rows first, then the N up rows.
    Returns [M, N] in x.dtype; fp32 accumulation. `out` and `config` as in `linear_fused`.
    """
    _check_operands(x, weight_gate_up)
    _check_activation(activation)
    if weight_gate_up.shape[0] % 2:
        raise ValueError(
            f"weight_gate_up must stack gate and up rows ([2N, K]); got an odd row count "
            f"{weight_gate_up.shape[0]}"
        )
    check_device(x, weight_gate_up)
    m, k = x.shape
    n = weight_gate_up.shape[0] // 2

    # Two accumulators per program, so half the single-GEMM tile width (measured best at
    # M=2048, N=11008, K=4096 on an H100).
    cfg = config or GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)
    if m <= 64 and config is None:
        cfg = GemmConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4)
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        check_out(out, (m, n), x)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _gated_linear_kernel[grid](
        x,
        weight_gate_up,
        out,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        weight_gate_up.stride(0),
        weight_gate_up.stride(1),
        out.stride(0),
        out.stride(1),
        ACTIVATION=activation,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
