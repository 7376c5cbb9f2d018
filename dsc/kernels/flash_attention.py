"""Prefill attention over a KV cache: a flash-attention forward kernel, and the `attention` entry.

Program (i, b*Hq + h) owns BLOCK_M query rows of one head and walks the keys in BLOCK_N blocks
with an online softmax (running max m, running sum l, fp32 accumulator), so the [S, T] score
matrix never exists in memory. GQA costs nothing extra: the program simply reads kv head
h // (Hq // Hkv); programs of heads sharing it run close together and find its tiles in L2.

The key loop has two parts. Blocks that every query row of the program may see in full (below the
causal diagonal, or inside the live length when not causal) need only the padding mask; the last
few blocks, which the diagonal or the live length cuts, also apply the position masks. Key blocks
entirely above the diagonal are never loaded, which halves the work of a causal prefill.

Padding costs about a third of the time when handled per tile (a mask byte load feeding the K/V
load masks and the score bias; bench/NOTES-kernels.md), so the kernel is compiled in two
variants: with `padded=False` — the caller knows there is no padding below start + S
(`keys_unpadded`) — it loads whole K/V tiles unmasked below the diagonal; otherwise a program
first reads the padding bytes of the keys it will visit, and if none is padding its per-tile
mask loads are predicated off.

Semantics (shared with `decode_attention`): query i of sequence b sits at slot start + i and may
attend key slot j iff j < start + S, kv_valid[b, j], (not causal or j <= start + i), and
(window == 0 or j > start + i - window); `alibi` slopes [Hq] add alibi[h] * (j - (start + i))
to the scores of query head h. A query with no key to attend gets zeros. `start` lives in device
memory (an int64 tensor [1]). With a sliding window, key blocks below every row's window
are skipped like those above the diagonal, and the blocks the window's edge cuts take the
position masks. Values may have a head size of their own (latent attention); the output
takes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels.checks import check_out, check_sinks, check_window
from dsc.kernels.decode_attention import (
    MAX_WHOLE_HEAD_DIM,
    QK_CHUNK,
    check_attention_inputs,
    check_slopes,
    decode_attention,
    uses_decode_kernel,
)
from dsc.kernels.flash_attention_tma import flash_attention_tma, tma_eligible
from dsc.kernels.online_softmax import LOG2E, online_softmax_step

__all__ = ["FlashConfig", "attention", "flash_attention", "keys_unpadded"]



# Set by `keys_unpadded`: the flash calls inside may assume no padding below start + S.
_UNPADDED: ContextVar[bool] = ContextVar("dsc_flash_keys_unpadded", default=False)


@contextlib.contextmanager
def keys_unpadded(promise: bool = True) -> Iterator[None]:
    """Within the block, `flash_attention` may assume kv_valid has no False below start + S.

    The caller checks it once (a prefill whose attention mask is all ones) instead of every
    layer's kernel reading the mask bytes per tile; with promise=False nothing changes. A wrong
    promise attends to padding slots, so only code that has just written the mask makes it.
    """
    token = _UNPADDED.set(bool(promise))
    try:
        yield
    finally:
        _UNPADDED.reset(token)


@dataclass(frozen=True)
class FlashConfig:
    """Tile shape and pipelining of the prefill kernel."""

    block_m: int = 64
    block_n: int = 64  # 112 KB of shared memory at 3 stages and D = 128: two programs per SM
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _attend_block(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    valid_base,
    n0,
    live,
    query_pos,
    d,
    d_ok,
    dv,
    dv_ok,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    stride_mt,
    scale_log2e,
    CAUSAL: tl.constexpr,
    POSITION_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PADDED: tl.constexpr,
    FULL_D: tl.constexpr,
    FULL_DV: tl.constexpr,
    holes,
    WINDOW: tl.constexpr,
    seen_from,
    ALIBI: tl.constexpr,
    slope,
    q_rows,
    row_ok,
    stride_qd,
    HEAD_D: tl.constexpr,
    QK_CHUNK: tl.constexpr,
):
    n = n0 + tl.arange(0, BLOCK_N)
    in_range = n < live
    if WINDOW > 0 and POSITION_MASK:
        # Slots below seen_from are behind every row's window: they load as zeros, like padding
        # (their scores are masked below, and a NaN V row there would survive a zero weight).
        in_range = in_range & (n >= seen_from)
    if PADDED:
        # Padding mask of these slots (one byte each), as an additive bias: 0 or -inf. Not read
        # at all when this program's keys hold no padding (`holes` = 0).
        ok = tl.load(valid_base + n * stride_mt, mask=in_range & (holes > 0), other=1) != 0
        bias = tl.where(ok, 0.0, float("-inf"))
        load_ok = ok & in_range
    else:
        load_ok = in_range
    # K tile [BLOCK_N, D]; padding rows read as zeros (their scores get the -inf bias, and a
    # NaN there would survive the addition).
    if QK_CHUNK > 0:
        # Keys too wide for one product: scores summed over QK_CHUNK lanes at a time, the
        # query's chunk read again from L1 for each key block.
        qk = tl.zeros((q_rows.shape[0], BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(0, HEAD_D, QK_CHUNK):
            dc = c + tl.arange(0, QK_CHUNK)
            dc_ok = dc < HEAD_D
            q_c = tl.load(q_rows[:, None] + dc[None, :] * stride_qd,
                          mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
            k_c = tl.load(k_base + n[:, None] * stride_kt + dc[None, :] * stride_kd,
                          mask=load_ok[:, None] & dc_ok[None, :], other=0.0)
            qk += tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION)
        qk = qk * scale_log2e
    else:
        if PADDED or POSITION_MASK or not FULL_D:
            k = tl.load(
                k_base + n[:, None] * stride_kt + d[None, :] * stride_kd,
                mask=load_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
        else:  # a block inside the live length with no padding: every row is real
            k = tl.load(k_base + n[:, None] * stride_kt + d[None, :] * stride_kd)
        # Scores in base 2 with the padding bias folded into the same multiply-add.
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
    if PADDED:
        qk = qk + bias[None, :]
    if ALIBI:
        qk += slope * (n[None, :] - query_pos[:, None]).to(tl.float32)
    if POSITION_MASK:
        allowed = in_range[None, :]
        if CAUSAL:
            allowed = allowed & (n[None, :] <= query_pos[:, None])
        if WINDOW > 0:
            allowed = allowed & (n[None, :] > query_pos[:, None] - WINDOW)
        qk = tl.where(allowed, qk, float("-inf"))

    p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
    # V tile [BLOCK_N, Dv]; unattendable slots are zeroed so whatever they hold cannot leak in.
    if PADDED or POSITION_MASK or not FULL_DV:
        v = tl.load(
            v_base + n[:, None] * stride_vt + dv[None, :] * stride_vd,
            mask=load_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
    else:
        v = tl.load(v_base + n[:, None] * stride_vt + dv[None, :] * stride_vd)
    # Rescale, then let the tensor cores accumulate P @ V onto it.
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _flash_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    valid_ptr,
    start_ptr,
    out_ptr,
    slopes_ptr,
    sinks_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_mb,
    stride_mt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    S,
    T,
    HQ,
    scale_log2e,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    V_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    QK_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PADDED: tl.constexpr,
    CHECK_BLOCK: tl.constexpr,
    WINDOW: tl.constexpr,
    ALIBI: tl.constexpr,
    SINKS: tl.constexpr,
):
    # Causal blocks further down the sequence have more keys to visit: start them first so the
    # short ones fill in the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    kvh = (h // GROUP).to(tl.int64)

    start = tl.load(start_ptr).to(tl.int32)
    live = tl.minimum(start + S, T)
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = i < S
    query_pos = start + i
    d = tl.arange(0, BLOCK_D)
    if HEAD_D == BLOCK_D:
        # A constant-true mask folds away, leaving plain 16-byte loads along D.
        d_ok = tl.full((BLOCK_D,), True, tl.int1)
    else:
        d_ok = d < HEAD_D
    # The values' lanes: the keys' own, or a head size of their own (latent attention).
    if V_D == HEAD_D:
        dv = d
        dv_ok = d_ok
    else:
        dv = tl.arange(0, BLOCK_DV)
        if V_D == BLOCK_DV:
            dv_ok = tl.full((BLOCK_DV,), True, tl.int1)
        else:
            dv_ok = dv < V_D

    # This program's query rows, loaded once (keys too wide for one product: by chunks).
    q_rows = q_ptr + b * stride_qb + h * stride_qh + i * stride_qs
    if QK_CHUNK > 0:
        q = 0.0
    else:
        q_ptrs = q_rows[:, None] + d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if ALIBI:
        slope = tl.load(slopes_ptr + h) * 1.4426950408889634  # base-2 units, like the scores
    else:
        slope = 0.0
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    valid_base = valid_ptr + b * stride_mb

    # Keys [0, full_end) are visible to every row of the block up to padding; [full_end, hi)
    # needs the position masks; keys from hi on are visible to no row and are skipped.
    if CAUSAL:
        first_row_pos = start + pid_m * BLOCK_M
        full_end = tl.minimum((first_row_pos + 1) // BLOCK_N, live // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start + tl.minimum(pid_m * BLOCK_M + BLOCK_M, S), live)
    else:
        full_end = (live // BLOCK_N) * BLOCK_N
        hi = live
    # With a window, keys below lo are visible to no row, and [lo, full_lo) only to some: the
    # window's edge cuts those blocks as the diagonal cuts [full_end, hi).
    if WINDOW > 0:
        last_row_pos = start + tl.minimum(pid_m * BLOCK_M + BLOCK_M, S) - 1
        seen_from = tl.maximum(first_row_pos - WINDOW + 1, 0)
        lo = (seen_from // BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.cdiv(tl.maximum(last_row_pos - WINDOW + 1, 0), BLOCK_N) * BLOCK_N,
                             full_end)
    else:
        seen_from = 0
        lo = 0
        full_lo = 0

    if PADDED:
        # Is any key this program visits padding? If not, the loop never reads the mask bytes:
        # their loads are predicated off, so no tile waits on them.
        holes = 0
        for c0 in range(lo, hi, CHECK_BLOCK):
            c = c0 + tl.arange(0, CHECK_BLOCK)
            valid_c = tl.load(valid_base + c * stride_mt, mask=c < hi, other=1)
            holes += tl.sum((valid_c == 0).to(tl.int32), axis=0)
    else:
        holes = 0

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    if WINDOW > 0:
        for n0 in range(lo, full_lo, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, k_base, v_base, valid_base, n0, live, query_pos, d, d_ok, dv,
                dv_ok, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt, scale_log2e,
                CAUSAL, True, BLOCK_N, DOT_PRECISION, PADDED, HEAD_D == BLOCK_D, V_D == BLOCK_DV,
                holes, WINDOW, seen_from, ALIBI, slope, q_rows, row_ok, stride_qd, HEAD_D,
                QK_CHUNK,
            )  # fmt: skip
    for n0 in range(full_lo, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, valid_base, n0, live, query_pos, d, d_ok, dv,
            dv_ok, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt, scale_log2e,
            CAUSAL, False, BLOCK_N, DOT_PRECISION, PADDED, HEAD_D == BLOCK_D, V_D == BLOCK_DV,
            holes, WINDOW, seen_from, ALIBI, slope, q_rows, row_ok, stride_qd, HEAD_D,
            QK_CHUNK,
        )  # fmt: skip
    for n0 in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, valid_base, n0, live, query_pos, d, d_ok, dv,
            dv_ok, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt, scale_log2e,
            CAUSAL, True, BLOCK_N, DOT_PRECISION, PADDED, HEAD_D == BLOCK_D, V_D == BLOCK_DV,
            holes, WINDOW, seen_from, ALIBI, slope, q_rows, row_ok, stride_qd, HEAD_D,
            QK_CHUNK,
        )  # fmt: skip

    # Normalise; rows that attended nothing have l = 0 and get zeros. An attention sink (a
    # logit of the head's, base 2 like the scores) only adds its share to the denominator.
    if SINKS:
        l_i += tl.exp2(tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634 - m_i)
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_ptrs = (
        out_ptr + b * stride_ob + h * stride_oh + i[:, None] * stride_os + dv[None, :] * stride_od
    )
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


def flash_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_valid: Tensor,
    start: Tensor,
    causal: bool,
    scale: float,
    *,
    out: Tensor | None = None,
    config: FlashConfig | None = None,
    padded: bool | None = None,
    window: int = 0,
    alibi: Tensor | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention of S query tokens over a KV cache (prefill); see the module docstring.

    q [B, Hq, S, D]; k_cache [B, Hkv, T, D], v_cache [B, Hkv, T, Dv] (Hq a multiple of Hkv);
    kv_valid [B, T] bool; start: int64 tensor [1] on the device; returns [B, Hq, S, Dv] in
    q.dtype. Any strides. `out` ([B, Hq, S, Dv] in q's dtype) receives the result if given.
    padded=False promises every slot below start + S is valid (no padding): the kernel then
    skips the padding mask and loads whole K/V tiles unmasked below the diagonal. None (the
    default) takes the promise from `keys_unpadded` if the caller is inside one, else assumes
    padding may be present (always correct).
    `window`: a causal sliding window (0: none). `alibi`: float32 slopes [Hq] on q's device.
    `sinks`: a logit per query head [Hq] on q's device (attention sinks), or None.
    """
    check_attention_inputs(q, k_cache, v_cache, kv_valid, start, scale)
    check_window(window, causal)
    check_slopes(alibi, q, causal)
    check_sinks(sinks, q.shape[1])
    if kv_valid.shape[1] != k_cache.shape[2]:
        raise ValueError(f"flash_attention reads a cache of one slot per position; got "
                         f"{k_cache.shape[2]} slots for {kv_valid.shape[1]} positions (a ring "
                         "cache: attend over the step's keys, see cuda_impls.cached_attention)")
    if padded is None:
        padded = not _UNPADDED.get()
    batch, hq, s, d = q.shape
    hkv, t, d_v = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    cfg = config or FlashConfig()
    qk_chunk = QK_CHUNK if d > MAX_WHOLE_HEAD_DIM else 0
    if max(d, d_v) > 128 and config is None:
        cfg = FlashConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    if max(d, d_v) > MAX_WHOLE_HEAD_DIM and config is None:
        # Latent attention's 576-wide keys and 512-wide values: of the tiles tried with ptxas -v
        # for sm_90, 32 rows by 16 keys at 8 warps spill the least (0.8 KB; 32 by 32: 1.6 KB).
        cfg = FlashConfig(block_m=32, block_n=16, num_warps=8, num_stages=2)

    out_shape = (batch, hq, s, d_v)
    if out is None:
        out = torch.empty(out_shape, device=q.device, dtype=q.dtype)
    else:
        check_out(out, out_shape, q)
    if (not padded and not window and alibi is None and sinks is None and config is None
            and d_v == d and tma_eligible(q, k_cache, v_cache, out)):
        return flash_attention_tma(q, k_cache, v_cache, start, causal, scale, out)
    valid = kv_valid.view(torch.uint8)
    grid = (triton.cdiv(s, cfg.block_m), batch * hq)
    _flash_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        valid,
        start,
        out,
        start if alibi is None else alibi,  # placeholder pointers when unused
        start if sinks is None else sinks,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *valid.stride(),
        *out.stride(),
        s,
        t,
        hq,
        float(scale) * LOG2E,
        GROUP=hq // hkv,
        CAUSAL=bool(causal),
        HEAD_D=d,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        V_D=d_v,
        BLOCK_DV=max(16, triton.next_power_of_2(d_v)),
        QK_CHUNK=qk_chunk,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PADDED=padded,
        CHECK_BLOCK=1024,
        WINDOW=window,
        ALIBI=alibi is not None,
        SINKS=sinks is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_valid: Tensor,
    start: Tensor,
    causal: bool,
    scale: float,
    *,
    out: Tensor | None = None,
    padded: bool | None = None,
    window: int = 0,
    alibi: Tensor | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """The KV-cache attention op of dsc: decode kernel for a few new tokens, flash otherwise.

    A few query rows per kv head cannot fill flash tiles, and their cost is reading the cache,
    which the split-key decode kernel spreads over the whole GPU.
    """
    check_attention_inputs(q, k_cache, v_cache, kv_valid, start, scale)
    if uses_decode_kernel(q, k_cache):
        return decode_attention(q, k_cache, v_cache, kv_valid, start, causal, scale, out=out,
                                window=window, alibi=alibi, sinks=sinks)
    return flash_attention(q, k_cache, v_cache, kv_valid, start, causal, scale, out=out,
                           padded=padded, window=window, alibi=alibi, sinks=sinks)
