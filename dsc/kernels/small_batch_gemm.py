"""Small-batch GEMM (SBI-GeMM): `out = x @ weight^T + bias` for a handful of rows.

At decode time x has 1 to 32 rows while the weight has millions of elements, so the product does
almost no arithmetic per byte: its time is the time to stream the weight once through device
memory. The kernel is built around that stream:

* each program owns a block of BLOCK_N weight rows (output columns) and walks K in BLOCK_K steps,
  loading [BLOCK_N, BLOCK_K] tiles with 16-byte accesses along K, `num_stages` tiles in flight
  through shared memory (`tl.range` pipelining, which the multiply-add loop only gets when asked
  for explicitly), marked evict-first so the stream does not push reused data out of L2;
* the x block is tiny and stays in L1/L2, so it is re-read freely;
* a single row uses plain multiply-adds into an accumulator that keeps one lane per K position
  and is reduced once at the end, so column blocks can be as narrow as 8 rows (many programs,
  each a long stream); with more rows the tile product goes through `tl.dot` with the operands
  swapped (weight rows play the role of M, the batch the role of N), keeping the tensor cores,
  not the CUDA cores, on the arithmetic (a multiply-add path for 2 to 8 rows measured slower);
* when there are too few column blocks to fill the GPU, K is split across programs ("split-K"):
  each writes an fp32 partial and a second small kernel sums them, adds the bias and casts.
* an input norm (RMSNorm / LayerNorm of x) can ride along, so it needs no launch of its own: a
  one-row program adds an RMSNorm row's sum of squares from the x tiles it loads anyway and
  applies the norm to its finished sums (no statistics pass delays the weight stream; row
  tiles the same with DSC_NORM_DEFER_ROWS=1); a LayerNorm row's statistics come first, from
  one load of the row;
* `linear_push_partial` (a row-parallel shard under tensor parallelism) sends each output tile
  into the peers' push all-reduce buffers instead of storing it (opt-in, measured slower; see
  dsc/runtime/allreduce.py `gemv_push_enabled`).

The launcher picks block sizes from a small table keyed on the shape and the number of SMs (no
autotuning, so a first call never stalls and the interpreter runs the same code path).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import norms, pdl, push_all_reduce
from dsc.kernels.checks import check_device, check_out, shared_memory, sm_count
from dsc.kernels.gemm import ACTIVATIONS, _apply_activation

__all__ = [
    "MAX_ROWS", "SmallBatchConfig", "linear_push_partial", "linear_small_batch", "pick_config",
    "push_config", "small_batch_wins",
]

# Up to this many rows the small-batch kernel takes every product (DSC_SMALL_BATCH_ROWS
# overrides): on an H200 it streams the 7B's o and down projections 1.11-1.22x faster than
# cuBLAS at 4-16 rows and takes the residual add too (at 32 rows it is slower); weights of at
# least _WIDE_N output rows take it up to MAX_ROWS rows (bench/NOTES-kernels.md).
_ALL_SHAPES_ROWS = 16
_WIDE_N = 8192
MAX_ROWS = 64  # past this each program re-reads the weight per row tile: gemm.linear_fused's turn


@dataclass(frozen=True)
class SmallBatchConfig:
    """Launch parameters of the small-batch GEMM kernel.

    block_m: rows of x per program (1 selects the multiply-add path, a power of two >= 16 the
        `tl.dot` path); block_n: weight rows per program; block_k: K step;
    split_k: programs sharing one column block's K range (1 = no second reduction kernel).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _normalize(x, k, mean, rstd, nw_ptr, nb_ptr, K, HAS_NW: tl.constexpr, HAS_NB: tl.constexpr):
    """The norm prologue on one x tile, rounded where the unfused ops round: the normalised value
    to x's dtype, then weight * it, then + bias (as HF's RMSNorm / LayerNorm modules do)."""
    dtype = x.dtype
    y = ((x.to(tl.float32) - mean) * rstd).to(dtype)
    k_ok = k < K
    if HAS_NW:
        y = (y.to(tl.float32) * tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)).to(dtype)
    if HAS_NB:
        y = (y.to(tl.float32) + tl.load(nb_ptr + k, mask=k_ok, other=0.0).to(tl.float32)).to(dtype)
    return y


@triton.jit
def _accumulate(acc, acc_u, w, u, x, k, mean, rstd, nw_ptr, nb_ptr, K, NORM: tl.constexpr,
                HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, GATED: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K step: normalise x if there is a prologue, then add w's (and u's) products.

    x is one row [BLOCK_K] (multiply-adds, one lane per K position) or x^T [BLOCK_K, BLOCK_M]
    (`tl.dot`); k holds the step's K indices.
    """
    if BLOCK_M == 1:
        if NORM != 0:
            x = _normalize(x, k, mean, rstd, nw_ptr, nb_ptr, K, HAS_NW, HAS_NB)
        xv = x.to(tl.float32)[None, :]
        acc += w.to(tl.float32) * xv
        if GATED:
            acc_u += u.to(tl.float32) * xv
    else:
        if NORM != 0:
            x = _normalize(x, k[:, None], mean[None, :], rstd[None, :], nw_ptr, nb_ptr, K,
                           HAS_NW, HAS_NB)
        acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        if GATED:
            acc_u = tl.dot(u, x, acc_u, input_precision=DOT_PRECISION)
    return acc, acc_u


@triton.jit
def _masked_weight_step(w_ptrs, u_ptrs, k_ok, GATED: tl.constexpr):
    """A K step's weight tile (and the up half's, gated) with K positions past k_ok as zeros."""
    w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
    u = w
    if GATED:
        u = tl.load(u_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
    return w, u


@triton.jit
def _k_step(acc, acc_u, s2, w, u, x, k, mean, rstd, nw_ptr, nb_ptr, K, NORM: tl.constexpr,
            HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, GATED: tl.constexpr,
            BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DEFER_NORM: tl.constexpr):
    """One K step of the weight stream, whichever way the tile applies its norm."""
    if DEFER_NORM and BLOCK_M == 1:
        acc, acc_u, s2 = _accumulate_deferred(acc, acc_u, s2, w, u, x, k, nw_ptr, K, HAS_NW,
                                              GATED)
    elif DEFER_NORM:
        acc, acc_u, s2 = _accumulate_deferred_rows(acc, acc_u, s2, w, u, x, k, nw_ptr, K, HAS_NW,
                                                   GATED, DOT_PRECISION)
    else:
        acc, acc_u = _accumulate(acc, acc_u, w, u, x, k, mean, rstd, nw_ptr, nb_ptr, K, NORM,
                                 HAS_NW, HAS_NB, GATED, BLOCK_M, DOT_PRECISION)
    return acc, acc_u, s2


@triton.jit
def _accumulate_deferred(acc, acc_u, s2, w, u, x, k, nw_ptr, K, HAS_NW: tl.constexpr,
                         GATED: tl.constexpr):
    """One K step of a one-row product whose RMSNorm is applied after the loop: the row's sum
    of squares grows from the x tiles the stream loads anyway, and the products take
    x * gamma (see `_deferred_rms_norm`)."""
    xf = x.to(tl.float32)
    s2 += xf * xf
    if HAS_NW:
        xf = xf * tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    acc += w.to(tl.float32) * xf[None, :]
    if GATED:
        acc_u += u.to(tl.float32) * xf[None, :]
    return acc, acc_u, s2


@triton.jit
def _accumulate_deferred_rows(acc, acc_u, s2, w, u, x, k, nw_ptr, K, HAS_NW: tl.constexpr,
                              GATED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The same for a row tile: x^T [BLOCK_K, BLOCK_M] as in `_accumulate`, s2 per (K lane,
    row); x * gamma is rounded to x's dtype for `tl.dot`."""
    xf = x.to(tl.float32)
    s2 += xf * xf
    if HAS_NW:
        xf = xf * tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)[:, None]
    xg = xf.to(x.dtype)
    acc = tl.dot(w, xg, acc, input_precision=DOT_PRECISION)
    if GATED:
        acc_u = tl.dot(u, xg, acc_u, input_precision=DOT_PRECISION)
    return acc, acc_u, s2


@triton.jit
def _deferred_rms_norm(acc, s2, K, norm_eps):
    """W·rms_norm(x) per output column of one row, from the loop's sums (acc still per K lane):
    rstd * W·(x*gamma)."""
    return tl.sum(acc, axis=1) * tl.math.rsqrt(tl.sum(s2, axis=0) / K + norm_eps)


@triton.jit
def _deferred_rms_norm_rows(acc, s2, K, norm_eps):
    """The same for a row tile: acc [BLOCK_N, BLOCK_M], s2 [BLOCK_K, BLOCK_M]."""
    return acc * tl.math.rsqrt(tl.sum(s2, axis=0) / K + norm_eps)[None, :]


@triton.jit
def _epilogue(acc, acc_u, bias_ptr, res_ptr, rows, cols, mask, stride_rm, stride_rn,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
              GATED: tl.constexpr):
    """bias, then activation (of the gate times up when gated), then residual, on fp32 sums."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    acc = _apply_activation(acc, ACTIVATION)
    if GATED:
        acc = acc * acc_u
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows * stride_rm + cols * stride_rn, mask=mask,
                       other=0.0).to(tl.float32)
    return acc


@triton.jit
def _push_tile(values, count, offs_m, pid_n, M, N, buf_ptrs, rank, BLOCK_N: tl.constexpr,
               PACK: tl.constexpr, WORLD: tl.constexpr, MAX_ROWS_: tl.constexpr,
               ROW_WORDS: tl.constexpr):
    """Send the output tile values [BLOCK_N columns, BLOCK_M rows] to every rank's push
    all-reduce buffer as flagged words (dsc/kernels/push_all_reduce.py), instead of storing it."""
    words = push_all_reduce.pack_words(tl.trans(values), PACK)  # [BLOCK_M, BLOCK_N // PACK]
    at = pid_n * (BLOCK_N // PACK) + tl.arange(0, BLOCK_N // PACK)
    seq, half = push_all_reduce.sequence_and_half(count)
    mask = (offs_m < M)[:, None] & (at < N // PACK)[None, :]
    push_all_reduce.send_words(buf_ptrs, rank, offs_m[:, None], half[:, None], seq[:, None],
                               words, at[None, :], mask, WORLD, MAX_ROWS_, ROW_WORDS)


@triton.jit
def _small_batch_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    part_ptr,
    nw_ptr,
    nb_ptr,
    norm_eps,
    M,
    N,
    K,
    k_per_split,
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
    GATED: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    PRELOAD: tl.constexpr,
    RELEASE_LATE: tl.constexpr,
    NORM: tl.constexpr,
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    STATS_K: tl.constexpr,
    DEFER_NORM: tl.constexpr,
    push_ptrs,
    push_state,
    push_rank,
    PUSH: tl.constexpr,
    PUSH_WORLD: tl.constexpr,
    PACK: tl.constexpr,
    MAX_ROWS_: tl.constexpr,
    ROW_WORDS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrap out-of-range rows onto valid ones so the hot loop needs no row mask; their results
    # are never stored.
    rows_w = (offs_n % N).to(tl.int64)
    rows_x = offs_m % M

    # This program's K range; whole BLOCK_K steps run unmasked, a ragged end gets one masked step.
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    k_full = k_lo + ((k_hi - k_lo) // BLOCK_K) * BLOCK_K
    w_ptrs = w_ptr + rows_w[:, None] * stride_wn + (k_lo + offs_k)[None, :] * stride_wk
    # Gated: the weight is [gate; up] stacked ([2N, K]); row c of the up half sits N rows down.
    u_ptrs = w_ptrs + N * stride_wn
    if BLOCK_M == 1:
        # One activation row; products stay per K lane and are reduced once, after the loop.
        x_ptrs = x_ptr + rows_x * stride_xm + (k_lo + offs_k) * stride_xk
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        # x^T tile [BLOCK_K, BLOCK_M]: tiny, L1/L2 resident.
        x_ptrs = x_ptr + rows_x[None, :] * stride_xm + (k_lo + offs_k)[:, None] * stride_xk
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros_like(acc)
    k_first = k_lo  # where the L2 prefetch starts: past a preloaded step
    if PRELOAD:
        # The first K step's weight into registers before the wait (DSC_GEMV_PRELOAD=1): the
        # step after the wait then needs only x. Masked, so a range shorter than one step is
        # this step alone.
        w0, u0 = _masked_weight_step(w_ptrs, u_ptrs, (k_lo + offs_k) < k_hi, GATED)
        k_first = k_lo + BLOCK_K
    if USE_PDL and PREFETCH and BLOCK_K >= 64:
        # Placed before the previous kernel finished (dsc.kernels.pdl): pull this program's first
        # weight tiles toward L2 — weights never depend on earlier kernels — before waiting for
        # the previous kernel, whose output x may be.
        lines = rows_w[:, None] * stride_wn + (k_first + tl.arange(0, BLOCK_K // 64) * 64)[None, :]
        pdl.prefetch_l2(w_ptr + lines * stride_wk)
    pdl.wait(USE_PDL)
    if not RELEASE_LATE:
        pdl.release(USE_PDL)
    if PUSH:
        # The rows' call numbers, read after the wait (the previous receive advanced them) and
        # early, so the load's latency hides behind the weight stream.
        push_count = tl.load(push_state + offs_m, mask=offs_m < M, other=0, volatile=True)

    if NORM != 0 and not DEFER_NORM:
        # Norm prologue: this program's rows' statistics over all of K (x is a few KB and stays
        # in L1/L2), then each x tile is normalised as it is loaded. mean stays 0 for RMSNorm.
        if BLOCK_M == 1 and STATS_K > 0:
            # The whole row in one load: one L2 round trip before the weight stream starts,
            # where a loop over K steps would wait for each step's load in turn.
            kk = tl.arange(0, STATS_K)
            xs = tl.load(x_ptr + rows_x * stride_xm + kk * stride_xk, mask=kk < K,
                         other=0.0).to(tl.float32)
            sum1 = tl.sum(xs, axis=0)
            sum2 = tl.sum(xs * xs, axis=0)
        elif BLOCK_M == 1:
            s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
            s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                xs = tl.load(x_ptr + rows_x * stride_xm + kk * stride_xk, mask=kk < K,
                             other=0.0).to(tl.float32)
                s1 += xs
                s2 += xs * xs
            sum1 = tl.sum(s1, axis=0)
            sum2 = tl.sum(s2, axis=0)
        else:
            s1 = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
            s2 = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                xs = tl.load(x_ptr + rows_x[None, :] * stride_xm + kk[:, None] * stride_xk,
                             mask=(kk < K)[:, None], other=0.0).to(tl.float32)
                s1 += xs
                s2 += xs * xs
            sum1 = tl.sum(s1, axis=0)
            sum2 = tl.sum(s2, axis=0)
        if NORM == 1:
            mean = sum1 * 0.0
            rstd = tl.math.rsqrt(sum2 / K + norm_eps)
        else:
            mean = sum1 / K
            rstd = tl.math.rsqrt(tl.maximum(sum2 / K - mean * mean, 0.0) + norm_eps)
    else:
        mean = 0.0
        rstd = 1.0
    k_cur = k_lo + offs_k

    # The weight stream: NUM_STAGES tiles in flight through shared memory (cp.async), each read
    # once and marked evict-first so it does not push reused data out of L2.
    # The deferred RMSNorm's sums of squares, shaped like the x tiles.
    if BLOCK_M == 1:
        s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    else:
        s2 = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    loop_lo = k_lo
    if PRELOAD:
        # The preloaded step (one-row tiles only), then the loop from the second.
        x0 = tl.load(x_ptrs, mask=(k_lo + offs_k) < k_hi, other=0.0)
        acc, acc_u, s2 = _k_step(acc, acc_u, s2, w0, u0, x0, k_cur, mean, rstd, nw_ptr, nb_ptr,
                                 K, NORM, HAS_NW, HAS_NB, GATED, BLOCK_M, DOT_PRECISION,
                                 DEFER_NORM)
        w_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        k_cur += BLOCK_K
        loop_lo = k_lo + BLOCK_K
    for _ in tl.range(loop_lo, k_full, BLOCK_K, num_stages=NUM_STAGES):
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        u = w
        if GATED:
            u = tl.load(u_ptrs, eviction_policy="evict_first")
        acc, acc_u, s2 = _k_step(acc, acc_u, s2, w, u, tl.load(x_ptrs), k_cur, mean, rstd,
                                 nw_ptr, nb_ptr, K, NORM, HAS_NW, HAS_NB, GATED, BLOCK_M,
                                 DOT_PRECISION, DEFER_NORM)
        w_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        k_cur += BLOCK_K
    ragged = k_full < k_hi
    if PRELOAD:
        ragged = ragged & (k_full > k_lo)  # a range shorter than one step is already done
    if ragged:
        # Ragged end of K: one masked step.
        k_ok = (k_full + offs_k) < k_hi
        w, u = _masked_weight_step(w_ptrs, u_ptrs, k_ok, GATED)
        if BLOCK_M == 1:
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
        else:
            x = tl.load(x_ptrs, mask=k_ok[:, None], other=0.0)
        acc, acc_u, s2 = _k_step(acc, acc_u, s2, w, u, x, k_cur, mean, rstd, nw_ptr, nb_ptr,
                                 K, NORM, HAS_NW, HAS_NB, GATED, BLOCK_M, DOT_PRECISION,
                                 DEFER_NORM)

    if RELEASE_LATE:
        pdl.release(USE_PDL)  # the weight stream is done: the next kernel may be placed now

    # Bring the accumulator to out^T for this block: [BLOCK_N columns, BLOCK_M rows].
    if DEFER_NORM and BLOCK_M == 1:
        # Gated products share the row's statistics.
        acc_n = _deferred_rms_norm(acc, s2, K, norm_eps)
        if GATED:
            acc_u = _deferred_rms_norm(acc_u, s2, K, norm_eps)[:, None]
        acc = acc_n[:, None]
    elif DEFER_NORM:
        acc = _deferred_rms_norm_rows(acc, s2, K, norm_eps)
        if GATED:
            acc_u = _deferred_rms_norm_rows(acc_u, s2, K, norm_eps)
    elif BLOCK_M == 1:
        acc = tl.sum(acc, axis=1)[:, None]
        if GATED:
            acc_u = tl.sum(acc_u, axis=1)[:, None]

    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    if IS_SPLIT:
        # Partial sums go to an fp32 workspace [split, M, N] ([split, M, 2N] gated: gate then
        # up); the reduce kernel finishes them and applies the epilogue.
        width = 2 * N if GATED else N
        part_ptrs = part_ptr + pid_k * M * width + offs_m[None, :] * width + offs_n[:, None]
        tl.store(part_ptrs, acc, mask=mask)
        if GATED:
            tl.store(part_ptrs + N, acc_u, mask=mask)
    else:
        acc = _epilogue(acc, acc_u, bias_ptr, res_ptr, offs_m[None, :], offs_n[:, None], mask,
                        stride_rm, stride_rn, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, GATED)
        if PUSH:
            _push_tile(acc.to(out_ptr.dtype.element_ty), push_count, offs_m, pid_n, M, N,
                       push_ptrs, push_rank, BLOCK_N, PACK, PUSH_WORLD, MAX_ROWS_, ROW_WORDS)
        else:
            out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    part_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    N,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait_and_release(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    row = offs // N
    col = offs % N
    width = 2 * N if GATED else N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK,), dtype=tl.float32)
    # Sum the split-K partials of these outputs (the workspace is contiguous [split, M, width]).
    for s in tl.static_range(SPLIT_K):
        at = part_ptr + s * M * width + row * width + col
        acc += tl.load(at, mask=mask, other=0.0)
        if GATED:
            acc_u += tl.load(at + N, mask=mask, other=0.0)
    acc = _epilogue(acc, acc_u, bias_ptr, res_ptr, row, col, mask, stride_rm, stride_rn,
                    HAS_BIAS, HAS_RESIDUAL, ACTIVATION, GATED)
    # Write the finished outputs in the caller's dtype.
    tl.store(
        out_ptr + row * stride_om + col * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask
    )


def pick_config(m: int, n: int, k: int, sm_count: int, gated: bool = False,
                shared_memory: int = 232448) -> SmallBatchConfig:
    """Choose launch parameters for an [m, k] x [n, k]^T product on a GPU with sm_count SMs.

    The table comes from sweeps on an H100 and an H200 (bench/kernels.py --sweep,
    bench/sweep_gemv.py; bench/NOTES-kernels.md). One row streams best through the multiply-add
    path with 8-row blocks (many programs, each a long pipelined stream). Up to 16 rows: 64-row
    blocks, 128-wide K steps, three stages when the blocks fill the GPU, else K split until
    blocks x splits cover the SMs (the o and down projections). More rows use `tl.dot` with
    64-row blocks when that gives every SM a program, else narrower blocks, and split-K when K is
    long and blocks are few.
    `gated`: the weight stacks [gate; up] and each stage loads two tiles. `shared_memory`
    (bytes per program; an H100's by default) caps the stages in flight on smaller GPUs.
    """
    return _fit_stages(_pick(m, n, k, sm_count, gated), gated, shared_memory)


def _fit_stages(cfg: SmallBatchConfig, gated: bool, shared_memory: int) -> SmallBatchConfig:
    if cfg.block_m == 1:
        return cfg  # the multiply-add path keeps its tiles in registers
    tiles = (2 if gated else 1) * cfg.block_n + cfg.block_m
    per_stage = tiles * cfg.block_k * 2  # bf16/fp16 operands
    stages = max(2, min(cfg.num_stages, shared_memory // per_stage))
    return dataclasses.replace(cfg, num_stages=stages)


# One row, measured per shape (bench/sweep_gemv.py --focus 3, H100, medians of three rounds):
# (N, K, gated) -> (block_n, block_k) where 256-wide K steps beat 8 x 512 in the sweep *and* in
# the model (GPT-2 XL stream 1.88 ms per token with them, run 21; 2.07 without, run 19). The
# sweep also favoured 4 x 256 for Llama-7B's o and down projections (66 -> 86 %, 73 -> 87 % of
# copy bandwidth, GEMV after GEMV), but under the early PDL release the model's step got slower
# with them (7B 5.17 -> 5.36 ms, tp=2 3.13 -> 3.22). Under the late release the o projection
# gains in the model (tp run 18, stream: tp=1 4.956 -> 4.944 ms, tp=2 2.998 -> 2.985 with its
# 4096 x 2048 shard; run 11: 3.026 -> 3.008); the down projection stays at 8 x 512.
_ONE_ROW = {
    (4096, 4096, False): (4, 256),    # Llama-7B o
    (4096, 2048, False): (4, 256),    # Llama-7B o, tp=2 shard
    (4800, 1600, False): (8, 256),    # GPT-2 XL qkv
    (1600, 1600, False): (4, 256),    # GPT-2 XL out
    (6400, 1600, False): (16, 256),   # GPT-2 XL up
    # OPT-1.3B as a set, in the model: 1.290 -> 1.247 ms a token (bench/NOTES.md, run 30);
    # the 2048 x 2048 entry is Llama-1.1B's o projection too (1.046 -> 1.045, run 29)
    (6144, 2048, False): (8, 256),    # qkv
    (2048, 2048, False): (4, 256),    # out
    (8192, 2048, False): (16, 256),   # fc1
}


def _power_of_two(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _shape_entries(spec: str, variable: str, form: str) -> list[tuple[str, tuple, tuple]]:
    """The entries `NxK[g]=TILES` of an override variable, split at `+`, `;` or `,` (bench/e2e.py
    --ab-env's own list is comma-separated): (item, (N, K, gated), the integers of TILES in
    order, read across `x` and `/`). `form` shows how to write one when an item cannot be
    read."""
    entries = []
    for item in filter(None, (part.strip() for part in re.split(r"[+;,]", spec))):
        try:
            shape, tiles = item.split("=")
            gated = shape.endswith("g")
            n, k = (int(v) for v in shape.rstrip("g").split("x"))
            numbers = tuple(int(v) for v in re.split(r"[x/]", tiles))
        except ValueError:
            raise ValueError(f"{variable}: cannot read {item!r}; write {form}") from None
        entries.append((item, (n, k, gated), numbers))
    return entries


@functools.cache
def _one_row_overrides(spec: str) -> dict[tuple[int, int, bool], tuple[int, int]]:
    """DSC_GEMV_ONE_ROW, e.g. `4096x4096=4x256+5504x4096g=8x256`: one-row tiles per weight shape
    (N x K, `g` for a stacked [gate; up] weight) = block_n x block_k, over the table above —
    for trying a sweep's picks in the whole model."""
    form = "NxK[g]=BLOCK_NxBLOCK_K, e.g. 4096x4096=4x256"
    table = {}
    for item, shape, tiles in _shape_entries(spec, "DSC_GEMV_ONE_ROW", form):
        if len(tiles) != 2 or "/" in item:
            raise ValueError(f"DSC_GEMV_ONE_ROW: cannot read {item!r}; write {form}")
        block_n, block_k = tiles
        if not (_power_of_two(block_n) and _power_of_two(block_k) and block_k >= 16):
            raise ValueError(f"DSC_GEMV_ONE_ROW: {item!r} needs block_n and block_k powers of "
                             f"two, block_k at least 16")
        table[shape] = (block_n, block_k)
    return table


@functools.cache
def _row_tile_overrides(spec: str) -> dict[tuple[int, int, bool], tuple[int, int, int, int]]:
    """DSC_GEMV_ROWS, e.g. `12288x4096=64x128/1/3+4096x4096=64x128/2/5`: tiles for 2 to 16
    rows per weight shape (N x K, `g` for a stacked [gate; up] weight) = block_n x block_k /
    K splits / pipeline stages, over the heuristic — for trying a sweep's picks in the model."""
    form = "NxK[g]=BLOCK_NxBLOCK_K/SPLIT_K/STAGES, e.g. 4096x4096=64x128/2/5"
    table = {}
    for item, shape, tiles in _shape_entries(spec, "DSC_GEMV_ROWS", form):
        if len(tiles) != 4 or item.count("/") != 2:
            raise ValueError(f"DSC_GEMV_ROWS: cannot read {item!r}; write {form}")
        block_n, block_k, split_k, stages = tiles
        if not (_power_of_two(block_n) and _power_of_two(block_k) and block_n >= 16
                and block_k >= 16 and split_k >= 1 and stages >= 1):
            raise ValueError(f"DSC_GEMV_ROWS: {item!r} needs block_n and block_k powers of two "
                             f"of at least 16, and at least one split and one stage")
        table[shape] = tiles
    return table


def _pick(m: int, n: int, k: int, sm_count: int, gated: bool) -> SmallBatchConfig:
    rows_override = _row_tile_overrides(os.environ.get("DSC_GEMV_ROWS", "")).get((n, k, gated))
    if 1 < m <= 16 and rows_override:
        block_n, block_k, split_k, stages = rows_override
        return SmallBatchConfig(16, block_n, block_k, split_k, 4, stages)
    if m == 1:
        block_m, num_stages = 1, 4
        table = {**_ONE_ROW, **_one_row_overrides(os.environ.get("DSC_GEMV_ONE_ROW", ""))}
        block_n, block_k = table.get((n, k, gated), (8, 512))
    elif m <= 16:
        tiles = triton.cdiv(n, 64)
        if tiles >= sm_count:
            # 128-wide K steps, three stages (three programs an SM) for a plain weight: the 7B
            # qkv at 4-16 rows 82 -> 86-90 % of copy bandwidth on an H200, where 256 x 5 stages
            # (one program an SM) had won the H100 sweep (bench/NOTES-kernels.md).
            return SmallBatchConfig(16, 64, 128, 1, 4, 4 if gated else 3)
        # Too few column blocks: split K until blocks x splits cover the SMs (the 7B o
        # projection: 64 blocks, 2 splits, 67 -> 72 % on an H200).
        split_k = max(1, min(sm_count // tiles, k // 256))
        return SmallBatchConfig(16, 64, 128, split_k, 4, 4 if gated else 5)
    else:
        block_m = max(16, min(64, triton.next_power_of_2(m)))
        if triton.cdiv(n, 64) >= sm_count:
            block_n, block_k, num_stages = 64, 128, 4
        elif k >= 2 * n:
            block_n, block_k, num_stages = 32, 128, 4
        else:
            block_n, block_k, num_stages = 16, 128, 6
    tiles = triton.cdiv(n, block_n)
    split_k = 1
    if tiles < sm_count:
        # Too few column blocks: share K between programs, keeping >= 2 K steps per program.
        split_k = max(1, min(triton.cdiv(2 * sm_count, tiles), k // (2 * block_k)))
    return SmallBatchConfig(block_m, block_n, block_k, split_k, 4, num_stages)


def small_batch_wins(rows: int, out_features: int) -> bool:
    """Whether this kernel, rather than cuBLAS, should take a product of `rows` rows of x with
    a weight of `out_features` rows: every shape up to DSC_SMALL_BATCH_ROWS rows (default 16),
    wide weights (>= 8192 rows) up to 64 rows."""
    return rows <= _all_shapes_rows() or (rows <= MAX_ROWS and out_features >= _WIDE_N)


def _all_shapes_rows() -> int:
    value = os.environ.get("DSC_SMALL_BATCH_ROWS", str(_ALL_SHAPES_ROWS))
    if not value.isdigit():
        raise ValueError(f"DSC_SMALL_BATCH_ROWS={value!r}: expected a number of rows")
    return int(value)


def _validate(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K]; got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K]; got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"K mismatch: x is {tuple(x.shape)} but weight is {tuple(weight.shape)} (weight is [N, K])"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [N={weight.shape[0]}]; got shape {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {t.dtype}")
    if x.shape[0] == 0 or weight.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"empty operands: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    check_device(*(t for t in (x, weight, bias) if t is not None))


def linear_small_batch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = None,
    gated: bool = False,
    residual: Tensor | None = None,
    norm: tuple[str, Tensor | None, Tensor | None, float] | None = None,
    out: Tensor | None = None,
    config: SmallBatchConfig | None = None,
) -> Tensor:
    """act(norm(x) @ weight^T + bias) (+ residual) for small M, streaming the weight once.

    x: [M, K]; weight: [N, K] (nn.Linear layout, any strides); bias: [N] or None.
    Returns [M, N] in x.dtype, accumulated in fp32; the epilogue runs on the fp32 sums.
    activation: one of `dsc.kernels.gemm.ACTIVATIONS`. gated: weight is [gate; up] stacked
    ([2N, K], no bias) and the result is act(x @ gate^T) * (x @ up^T), [M, N] — the gated MLP's
    merged up projection with its activation, in one weight stream. residual: [M, N] added last.
    norm: ("rms" | "layer", weight [K] or None, bias [K] or None (layer only), eps) normalises
    each row of x, as `dsc.ops.norms` does (the input norm of a QKV or up projection): a
    one-row tile applies an RMSNorm inside the kernel to the finished sums when the whole of K
    is its own (see `_defer_norm`: the unfused ops' roundings to x's dtype are skipped; row
    tiles too with DSC_NORM_DEFER_ROWS=1); else one-row tiles take the statistics first and
    row tiles run the norm kernel, then the GEMM.
    Correct for any M; fastest for M <= 32 (past 64 rows each program re-reads the weight once
    per 64 rows: use `gemm.linear_fused` there). `out` ([M, N], any strides) receives the result
    if given; `config` overrides the heuristic (tests and tuning use it).
    """
    _validate(x, weight, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    m, k = x.shape
    n = weight.shape[0]
    if gated:
        if n % 2 or bias is not None:
            raise ValueError(
                f"gated needs a [2N, K] weight ([gate; up]) and no bias; got weight "
                f"{tuple(weight.shape)}{' and a bias' if bias is not None else ''}"
            )
        n //= 2
    if residual is not None:
        check_out(residual, (m, n), x, "residual")
    norm_kind, norm_w, norm_b, norm_eps = norm if norm is not None else (None, None, None, 0.0)
    if norm_kind not in (None, "rms", "layer") or (norm_kind == "rms" and norm_b is not None):
        raise ValueError(f"norm must be ('rms', w, None, eps) or ('layer', w, b, eps); got "
                         f"kind {norm_kind!r}{' with a bias' if norm_b is not None else ''}")
    for name, t in (("norm weight", norm_w), ("norm bias", norm_b)):
        if t is not None and (tuple(t.shape) != (k,) or t.device != x.device):
            raise ValueError(f"{name} must be [K={k}] on {x.device}; got {tuple(t.shape)} on "
                             f"{t.device}")
    cfg = config or pick_config(m, 2 * n if gated else n, k, sm_count(x.device), gated=gated,
                               shared_memory=shared_memory(x.device))
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        check_out(out, (m, n), x)
    if (norm_kind is not None and cfg.block_m != 1
            and not _defer_norm(norm_kind, cfg, _splits(k, cfg)[0], gated)):
        # Row tiles that cannot apply the norm after the stream: a statistics pass per program
        # over [K, rows] costs more than the norm's own launch (Llama-7B batch 16: 7.86
        # against 6.00 ms a step, bench/NOTES.md run 27), so the norm kernel runs first and
        # the GEMM reads its output.
        x = (norms.rms_norm(x, norm_w, norm_eps) if norm_kind == "rms"
             else norms.layer_norm(x, norm_w, norm_b, norm_eps))
        norm_kind = None
    _launch(x, weight, bias, out, cfg, activation=activation, gated=gated, residual=residual,
            norm=(norm_kind, norm_w, norm_b, norm_eps))
    return out


def _splits(k: int, cfg: SmallBatchConfig) -> tuple[int, int]:
    """(programs sharing K, K per program): each split covers a whole number of K steps, so only
    the last split can be ragged."""
    k_steps = triton.cdiv(k, cfg.block_k)
    split_k = max(1, min(cfg.split_k, k_steps))
    k_per_split = triton.cdiv(k_steps, split_k) * cfg.block_k
    return triton.cdiv(k, k_per_split), k_per_split


def push_config(x: Tensor, weight: Tensor,
                config: SmallBatchConfig | None = None) -> SmallBatchConfig | None:
    """The configuration `linear_push_partial` launches x @ weight^T with (`config`, else the
    heuristic's), or None when it cannot push that product: a K split (the partial would need
    the reduce kernel first), an output row the push buffers do not take, or tiles narrower
    than a 32-bit word."""
    m, k = x.shape
    n = weight.shape[0]
    if not push_all_reduce.fits_shape((m, n), x.dtype):
        return None
    cfg = config or pick_config(m, n, k, sm_count(x.device),
                                shared_memory=shared_memory(x.device))
    if _splits(k, cfg)[0] > 1 or cfg.block_n % (4 // x.element_size()):
        return None
    return cfg


def linear_push_partial(x: Tensor, weight: Tensor, *, rank: int, world: int,
                        buffer_ptrs: Tensor, state: Tensor,
                        config: SmallBatchConfig | None = None) -> None:
    """x @ weight^T, sent tile by tile into every rank's push all-reduce buffer instead of being
    stored: this rank's share of a row-parallel product, to be summed by
    `push_all_reduce.receive_sum` (which every rank calls next). x: [M, K] with M at most
    push_all_reduce.MAX_ROWS; buffers and state as for `push_all_reduce.push_all_reduce`;
    `config` overrides the heuristic (tests use it)."""
    _validate(x, weight, None)
    cfg = push_config(x, weight, config)
    if cfg is None:
        raise ValueError(
            f"x {tuple(x.shape)} @ weight^T {tuple(weight.shape[::-1])} ({x.dtype}) cannot be "
            f"pushed: it needs at most {push_all_reduce.MAX_ROWS} rows, an output row of whole "
            f"32-bit words that fits the buffers, and no K split; use linear_small_batch and "
            f"an all-reduce")
    _launch(x, weight, None, None, cfg, push=(rank, world, buffer_ptrs, state))


def _defer_norm(norm_kind: str | None, cfg: SmallBatchConfig, split_k: int, gated: bool) -> bool:
    """Apply an RMSNorm prologue after the weight stream instead of before it: no statistics
    pass holds the stream back, each row's sum of squares comes from the x tiles the loop
    loads. Row tiles do so only with DSC_NORM_DEFER_ROWS=1 (instead of the norm kernel first;
    correct on the GPU, but Llama-7B batch 16 measured 4.29 -> 5.15 ms a step with it,
    bench/NOTES.md tenth session). Needs the whole of K in one
    program; skips the roundings of the unfused ops
    (normalised value, then times gamma, each to x's dtype), so DSC_NORM_PROLOGUE_EXACT=1 keeps
    the statistics-first order that reproduces them. LayerNorm always takes its statistics
    first: deferred, it needed W·gamma and W·beta summed beside W·x, three accumulators in the
    loop — GPT-2 XL 1.863 -> 2.056 ms a token, OPT-1.3B 1.290 -> 1.486 (bench/NOTES.md,
    run 30)."""
    if cfg.block_m != 1 and os.environ.get("DSC_NORM_DEFER_ROWS", "0") != "1":
        return False
    return (norm_kind == "rms" and split_k == 1
            and os.environ.get("DSC_NORM_PROLOGUE_EXACT", "0") != "1")


def _preload_first_step() -> bool:
    """DSC_GEMV_PRELOAD=1: one-row tiles load their first K step's weight into registers before
    the PDL wait, so the step after it needs only x (opt-in until timed)."""
    value = os.environ.get("DSC_GEMV_PRELOAD", "0")
    if value not in ("0", "1"):
        raise ValueError(f"DSC_GEMV_PRELOAD={value!r}: expected 0 or 1")
    return value == "1"


def _stats_block(k: int) -> int:
    """Row length a norm prologue loads at once for its statistics (0: rows longer than 8192
    elements are summed in K steps instead)."""
    return triton.next_power_of_2(k) if k <= 8192 else 0


def _launch(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None,
            cfg: SmallBatchConfig, *, activation: str | None = None, gated: bool = False,
            residual: Tensor | None = None, norm: tuple = (None, None, None, 0.0),
            push: tuple[int, int, Tensor, Tensor] | None = None) -> None:
    m, k = x.shape
    n = weight.shape[0] // (2 if gated else 1)
    norm_kind, norm_w, norm_b, norm_eps = norm
    if cfg.block_m != 1 and (cfg.block_m < 16 or cfg.block_m & (cfg.block_m - 1)):
        raise ValueError(f"block_m must be 1 or a power of two >= 16; got {cfg.block_m}")
    split_k, k_per_split = _splits(k, cfg)
    defer = _defer_norm(norm_kind, cfg, split_k, gated)
    if out is None:
        out = x.new_empty((1, 1))  # pushing: a placeholder that gives the kernel the dtype
    push_rank, push_world, push_ptrs, push_state = push or (0, 1, out, out)

    part = out  # placeholder pointers when unused
    if split_k > 1:
        part = torch.empty((split_k, m, 2 * n if gated else n), device=x.device,
                           dtype=torch.float32)
    res = residual if residual is not None else out
    epilogue = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                    ACTIVATION=activation, GATED=gated)
    grid = (triton.cdiv(n, cfg.block_n), split_k, triton.cdiv(m, cfg.block_m))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    launch = pdl.gemv_options(x.device)
    _small_batch_gemm_kernel[grid](
        x,
        weight,
        bias if bias is not None else out,
        res,
        out,
        part,
        norm_w if norm_w is not None else out,
        norm_b if norm_b is not None else out,
        float(norm_eps),
        m,
        n,
        k,
        k_per_split,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        res.stride(0),
        res.stride(1),
        out.stride(0),
        out.stride(1),
        **epilogue,
        IS_SPLIT=split_k > 1,
        DOT_PRECISION=precision,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        NUM_STAGES=cfg.num_stages,
        NORM={None: 0, "rms": 1, "layer": 2}[norm_kind],
        HAS_NW=norm_w is not None,
        HAS_NB=norm_b is not None,
        # Only the statistics-first prologue reads the row at once.
        STATS_K=_stats_block(k) if norm_kind and cfg.block_m == 1 and not defer else 0,
        DEFER_NORM=defer,
        push_ptrs=push_ptrs,
        push_state=push_state,
        push_rank=push_rank,
        PUSH=push is not None,
        PUSH_WORLD=push_world,
        PACK=4 // x.element_size(),
        MAX_ROWS_=push_all_reduce.MAX_ROWS,
        ROW_WORDS=push_all_reduce.MAX_ROW_WORDS,
        num_warps=cfg.num_warps,
        PREFETCH=pdl.prefetch_weights(),
        PRELOAD=cfg.block_m == 1 and _preload_first_step(),
        RELEASE_LATE=pdl.gemv_release_late(),
        num_stages=cfg.num_stages,
        **launch,
    )
    if split_k > 1:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            part,
            bias if bias is not None else out,
            res,
            out,
            m,
            n,
            res.stride(0),
            res.stride(1),
            out.stride(0),
            out.stride(1),
            SPLIT_K=split_k,
            **epilogue,
            BLOCK=block,
            num_warps=4,
            **launch,
        )
