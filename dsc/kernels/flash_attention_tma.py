"""Prefill attention through tensor-memory-accelerator descriptors (Hopper), for unpadded keys.

The same algorithm as `flash_attention`'s unpadded variant — program (i, b*Hq + h) owns BLOCK_M
query rows of one head, walks the key tiles with an online softmax, skips tiles above the causal
diagonal and masks only the tiles the diagonal or the live length cuts — but every Q, K, V tile
comes in through a tensor descriptor and the output leaves through one. The copy engine then
computes the addresses and the bounds (rows past S or T read as zeros, stores past S are
dropped), and the tiles land in shared memory in the layout the tensor-core instructions read,
so no thread spends registers or instructions on pointers or masks.

Slots past the live length inside the last tile may hold anything (NaN included): their scores
are masked to -inf and their V rows zeroed in registers, as the pointer kernel zeroes them on
load. Only used when the caller promises no padding below start + S, the head dimension is a
power of two from 16 to 128, and every tensor's last dimension is contiguous with 16-byte
aligned strides (what a descriptor needs). Opt-in with DSC_FLASH_TMA=1: on an H100 it reached
50.2 % of the GEMM rate against the pointer kernel's 49.7 % (bench/NOTES.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from dsc.kernels.online_softmax import LOG2E, online_softmax_step

__all__ = ["TmaFlashConfig", "flash_attention_tma", "tma_eligible"]

@dataclass(frozen=True)
class TmaFlashConfig:
    """Tile shape and pipelining: two warpgroups of 64 query rows each by default."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


def tma_eligible(q: Tensor, k_cache: Tensor, v_cache: Tensor, out: Tensor | None) -> bool:
    """DSC_FLASH_TMA=1 and tensors a descriptor can describe (see the module docstring)."""
    if os.environ.get("DSC_FLASH_TMA", "0") != "1":
        return False
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        return False
    for t in (q, k_cache, v_cache) + ((out,) if out is not None else ()):
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
            return False
    return True


@triton.jit
def _flash_tma_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    start_ptr,
    S,
    T,
    HQ,
    scale_log2e,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Causal blocks further down the sequence have more keys to visit: start them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // GROUP
    start = tl.load(start_ptr).to(tl.int32)
    live = tl.minimum(start + S, T)
    m0 = pid_m * BLOCK_M
    query_pos = start + m0 + tl.arange(0, BLOCK_M)
    q = q_desc.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_D)

    # Keys [0, full_end) are visible to every row of the block; [full_end, hi) need the position
    # masks; keys from hi on are visible to no row and are never loaded.
    if CAUSAL:
        full_end = tl.minimum((start + m0 + 1) // BLOCK_N, live // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start + tl.minimum(m0 + BLOCK_M, S), live)
    else:
        full_end = (live // BLOCK_N) * BLOCK_N
        hi = live

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_D), dtype=tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        k = k_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: every key here is real
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = v_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    for n0 in range(full_end, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_range = n < live
        k = k_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        allowed = in_range[None, :]
        if CAUSAL:
            allowed = allowed & (n[None, :] <= query_pos[:, None])
        qk = tl.where(allowed, qk, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
        v = v_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D)
        v = tl.where(in_range[:, None], v, 0.0).to(v.dtype)  # slots past live may hold NaN
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_desc.store([b, h, m0, 0], o.to(q.dtype).reshape(1, 1, BLOCK_M, HEAD_D))


def flash_attention_tma(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    start: Tensor,
    causal: bool,
    scale: float,
    out: Tensor,
    config: TmaFlashConfig | None = None,
) -> Tensor:
    """`flash_attention` for unpadded keys through descriptors; the caller checked the inputs
    (`check_attention_inputs`) and `tma_eligible`. Writes and returns out."""
    cfg = config or TmaFlashConfig()
    batch, hq, s, d = q.shape
    hkv, t = k_cache.shape[1], k_cache.shape[2]

    def describe(x: Tensor, rows: int) -> TensorDescriptor:
        return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, d])

    grid = (triton.cdiv(s, cfg.block_m), batch * hq)
    _flash_tma_kernel[grid](
        describe(q, cfg.block_m),
        describe(k_cache, cfg.block_n),
        describe(v_cache, cfg.block_n),
        describe(out, cfg.block_m),
        start,
        s,
        t,
        hq,
        float(scale) * LOG2E,
        GROUP=hq // hkv,
        CAUSAL=bool(causal),
        HEAD_D=d,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
