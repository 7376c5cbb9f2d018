"""Decode attention over a KV cache: flash-decoding with GQA-aware programs.

At decode time each sequence brings one (or a few) new query tokens and attends to thousands of
cached keys. The work is reading the cache: for every (sequence, kv head) the K and V rows of the
live prefix must come through device memory once. The kernel is arranged around that:

* one program serves all query heads that share a kv head (GQA group) and all S query tokens:
  their G*S query rows form one [BLOCK_R, D] block, so each K/V tile is loaded once and used for
  the whole group through `tl.dot`;
* the key sequence is cut into `num_splits` chunks, one program each ("split-K" over keys), so a
  batch of one still puts hundreds of programs on the GPU. Each program runs an online softmax over
  its chunk and writes an unnormalised partial (acc, running max m, running sum l); a second small
  kernel merges the partials of each query row. With one split the first kernel writes the output
  directly and the merge kernel is skipped;
* placed early under programmatic dependent launch, each program asks L2 for the first K/V rows
  of its chunk before waiting for the kernel that writes q (those rows were written steps ago);
* with `DecodeConfig.merge_in_split` (DSC_DECODE_MERGE=split) the last split program of each
  (sequence, kv head), found by an arrival counter, merges the partials itself instead of the
  second kernel (measured mixed: bench/NOTES.md, sixth session);
* with `DecodeConfig.v_with_k` (DSC_DECODE_V_WITH_K=1) a tile's V rows are loaded beside its K
  rows: by default they are requested after the softmax, whose reductions put barriers between
  the two, so a tile that the pipeline does not prefetch (one stage, or a chunk of one tile)
  waits for memory twice;
* the cache position `start` is read from device memory and the grid is sized from the cache
  capacity T, never from start, so a captured CUDA graph stays valid as the sequence grows. The
  chunks divide the *live* length (start + S, read in the kernel), not T: a cache allocated for
  4096 tokens holding 300 still spreads them over every split program instead of leaving them
  to the first. A program whose chunk is empty stores nothing.

Semantics (shared with `flash_attention`): query i of sequence b sits at slot start + i and may
attend key slot j iff j < start + S, kv_valid[b, j], (not causal or j <= start + i), and
(window == 0 or j > start + i - window); `alibi` slopes [Hq] add alibi[h] * (j - (start + i))
to the scores of query head h. A query with no key to attend gets zeros. With a sliding
window the split programs share only the slots from start - window + 1 on: the keys no query
of the step can see are never read. Masked K/V slots may hold anything, NaN included: V rows
that are not attended are zeroed on load so they cannot poison the sums.

Values may have a head size of their own (multi-head latent attention: DeepSeek's queries and
keys are 192 wide, its values 128): the output and the partials take the values' size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import l2_prefetch, pdl
from dsc.kernels.checks import (
    check_alibi, check_device, check_out, check_ring, check_sinks, check_window, sm_count,
)
from dsc.kernels.online_softmax import LOG2E, online_softmax_step

__all__ = [
    "MAX_WHOLE_HEAD_DIM", "QK_CHUNK", "DecodeConfig", "check_attention_inputs", "check_slopes",
    "decode_attention", "pick_decode_config", "uses_decode_kernel",
]

MAX_WHOLE_HEAD_DIM = 256  # keys one dot product takes whole
_MAX_CHUNKED_HEAD_DIM = 1024  # keys taken QK_CHUNK lanes at a time (latent attention: 576)
_MAX_VALUE_DIM = 512  # values (latent attention's are its 512-wide latent)
QK_CHUNK = 64
_MAX_ACC = 16 * 512  # fp32 accumulator elements a program holds: rows * value lanes
_MAX_ROWS = 128  # G * S query rows one program can hold
_MAX_INLINE_SPLITS = 32  # splits the last program merges itself (its loads are unrolled)
_PREFETCH_KEYS = 128  # K and V rows a program placed early asks L2 for
_SHORT_CHUNK_TILES = 4  # key tiles up to which an unsplit program takes one pipeline stage


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters: keys per tile, number of key splits, warps and pipeline depth;
    `merge_in_split`: the last split program of each (sequence, kv head) merges the partials
    instead of a second launch (up to `_MAX_INLINE_SPLITS` splits); `v_with_k`: each tile's V
    rows are requested together with its K rows, before the softmax (DSC_DECODE_V_WITH_K=1)."""

    block_n: int = 64
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    merge_in_split: bool = False
    v_with_k: bool = False


@triton.jit
def _rotate(x, x_pair, cos_ptr, sin_ptr, base, s, d, row_ok, d_ok, stride_cs, stride_cd,
            HEAD_D: tl.constexpr):
    """Rotary embedding of rows x (token s of each row), x_pair holding lanes d ± D/2."""
    at = base + s[:, None] * stride_cs + d[None, :] * stride_cd
    ok = row_ok[:, None] & d_ok[None, :]
    c = tl.load(cos_ptr + at, mask=ok, other=0.0).to(tl.float32)
    n = tl.load(sin_ptr + at, mask=ok, other=0.0).to(tl.float32)
    sign = tl.where(d < HEAD_D // 2, -1.0, 1.0)[None, :]
    return (x.to(tl.float32) * c + sign * x_pair.to(tl.float32) * n).to(x.dtype)


@triton.jit
def _chunk(live, num_splits, BLOCK_N: tl.constexpr):
    """Keys per split program: the live length in whole key tiles, shared evenly."""
    return tl.cdiv(tl.cdiv(live, BLOCK_N), num_splits) * BLOCK_N


@triton.jit
def _key_range(start, S, T, WINDOW: tl.constexpr):
    """(first, live): the slots some query of the step may see are first .. live - 1."""
    live = tl.minimum(start + S, T)
    if WINDOW > 0:
        first = tl.maximum(start - WINDOW + 1, 0)
    else:
        first = 0
    return first, live


@triton.jit
def _slot(n, ring, RING: tl.constexpr):
    """The cache row of position n: n itself, or n % ring in a ring cache (a windowed layer's
    cache of `ring` slots)."""
    if RING:
        row = n % ring
    else:
        row = n
    return row


@triton.jit
def _prefetch_chunk(k_base, v_base, start_ptr, S, T, num_splits, pid_split, stride_kt, stride_kd,
                    stride_vt, stride_vd, ring, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, PREFETCH_KEYS: tl.constexpr,
                    LINE_ELEMS: tl.constexpr, WINDOW: tl.constexpr, RING: tl.constexpr):
    """Ask L2 for the first PREFETCH_KEYS K and V rows of this program's chunk, one request per
    128-byte line."""
    first, live = _key_range(tl.load(start_ptr).to(tl.int32), S, T, WINDOW)
    chunk = _chunk(live - first, num_splits, BLOCK_N)
    n_lo = first + pid_split * chunk
    n_hi = tl.minimum(tl.minimum(n_lo + chunk, live), n_lo + PREFETCH_KEYS)
    n = n_lo + tl.arange(0, PREFETCH_KEYS)
    n = tl.minimum(n, tl.maximum(n_hi - 1, 0))  # requests past the chunk repeat its last row
    n = _slot(n, ring, RING)
    line = tl.arange(0, BLOCK_D // LINE_ELEMS) * LINE_ELEMS
    v_line = tl.arange(0, BLOCK_DV // LINE_ELEMS) * LINE_ELEMS
    if n_lo < live:
        pdl.prefetch_l2(k_base + n[:, None] * stride_kt + line[None, :] * stride_kd)
        pdl.prefetch_l2(v_base + n[:, None] * stride_vt + v_line[None, :] * stride_vd)


@triton.jit
def _last_to_arrive(counter_ptr, num_splits):
    """True in the last of a group's num_splits programs to get here, once each has stored its
    partials (the ticket orders every thread's stores before it); that program resets the counter
    for the next launch."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == num_splits - 1
    if last:
        tl.store(counter_ptr, 0)
    return last


@triton.jit
def _merge_partials(part_acc_ptr, part_ml_ptr, row_id, row_ok, d, d_ok, span, chunk, num_splits,
                    sink, SPLITS_P2: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr, SINKS: tl.constexpr):
    """The normalised attention output of rows row_id from every split's partial (acc, m, l);
    `span` slots were shared out in chunks of `chunk`.
    The loads are independent (the split loop is unrolled), so they are in flight together
    rather than one L2 round trip per split; volatile, so no stale L1 line is read.
    With SINKS, each row's sink logit (base 2) takes its share of the denominator."""
    sp = tl.arange(0, SPLITS_P2)
    sp_ok = (sp < num_splits) & (sp * chunk < span)
    slots = row_id.to(tl.int64)[:, None] * num_splits + sp[None, :]
    ok = row_ok[:, None] & sp_ok[None, :]
    m = tl.load(part_ml_ptr + slots * 2, mask=ok, other=float("-inf"), volatile=True)
    l = tl.load(part_ml_ptr + slots * 2 + 1, mask=ok, other=0.0, volatile=True)
    m_max = tl.max(m, axis=1)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe[:, None])
    l_sum = tl.sum(w * l, axis=1)
    if SINKS:
        l_sum += tl.exp2(sink - m_safe)
    o = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(SPLITS_P2):
        j_ok = row_ok & (j < num_splits) & (j * chunk < span)
        part = tl.load(
            part_acc_ptr + (row_id.to(tl.int64) * num_splits + j)[:, None] * BLOCK_D + d[None, :],
            mask=j_ok[:, None] & d_ok[None, :], other=0.0, volatile=True,
        )
        w_j = tl.sum(tl.where(sp[None, :] == j, w, 0.0), axis=1)
        o += part * w_j[:, None]
    return o / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    valid_ptr,
    start_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    k_new_ptr,
    v_new_ptr,
    cos_ptr,
    sin_ptr,
    arrivals_ptr,
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
    stride_nb,
    stride_nh,
    stride_ns,
    stride_nd,
    stride_wb,
    stride_wh,
    stride_ws,
    stride_wd,
    stride_cb,
    stride_cs,
    stride_cd,
    S,
    T,
    HKV,
    num_splits,
    ring,
    scale_log2e,
    pf_ptr,
    pf_rows,
    pf_lines,
    pf_stride,
    pf_bytes,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    WRITE_NEW: tl.constexpr,
    ROTARY: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    V_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    QK_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MERGE_IN_SPLIT: tl.constexpr,
    V_WITH_K: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    PREFETCH_KEYS: tl.constexpr,
    LINE_ELEMS: tl.constexpr,
    PREFETCH_W: tl.constexpr,
    PF_LINE_ELEMS: tl.constexpr,
    USE_PDL: tl.constexpr,
    WINDOW: tl.constexpr,
    ALIBI: tl.constexpr,
    SINKS: tl.constexpr,
    RING: tl.constexpr,
):
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if PREFETCH_W:
        # The next projection's weight, toward L2 while this short kernel leaves HBM idle
        # (dsc.kernels.l2_prefetch); weights depend on no earlier kernel, so before the wait.
        l2_prefetch.prefetch(pf_ptr, pf_rows, pf_lines, pf_stride, pf_bytes,
                             pid_bh * num_splits + pid_split, num_splits * tl.num_programs(1),
                             PF_LINE_ELEMS)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    b64 = b.to(tl.int64)
    k_base = k_ptr + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    if USE_PDL and PREFETCH_KEYS > 0:
        # Placed while the previous kernel still runs (dsc.kernels.pdl): the cached rows before
        # `start` were written by earlier steps, so this program's first keys and values can be
        # pulled toward L2 now. `start` may still be changing; a stale value only moves what is
        # prefetched, the loop below reads it again after the wait.
        _prefetch_chunk(k_base, v_base, start_ptr, S, T, num_splits, pid_split, stride_kt,
                        stride_kd, stride_vt, stride_vd, ring, BLOCK_N, BLOCK_D, BLOCK_DV,
                        PREFETCH_KEYS,
                        LINE_ELEMS, WINDOW, RING)
    pdl.wait_and_release(USE_PDL)

    # The live length comes from device memory (CUDA-graph replay changes it between runs).
    start = tl.load(start_ptr).to(tl.int32)
    first, live = _key_range(start, S, T, WINDOW)
    span = live - first
    chunk = _chunk(span, num_splits, BLOCK_N)
    n_lo = first + pid_split * chunk
    n_hi = tl.minimum(n_lo + chunk, live)

    # Row r of the block is query token s = r % S of query head kvh * GROUP + r // S.
    r = tl.arange(0, BLOCK_R)
    row_ok = r < GROUP * S
    head = kvh * GROUP + r // S
    s = r % S
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

    # Load the group's query rows once (keys too wide for one product: a chunk per product,
    # read again for each key tile from L1).
    q_rows = q_ptr + b64 * stride_qb + head * stride_qh + s * stride_qs
    q_ptrs = (
        q_ptr
        + b64 * stride_qb
        + head[:, None] * stride_qh
        + s[:, None] * stride_qs
        + d[None, :] * stride_qd
    )
    if QK_CHUNK == 0:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if ROTARY:
        # The step's queries arrive unrotated: x * cos + rotate_half(x) * sin, in fp32, rounded
        # once to q's dtype as the rotary kernel does. rotate_half pairs lane d with d ± D/2.
        partner = tl.where(d < HEAD_D // 2, d + HEAD_D // 2, d - HEAD_D // 2)
        q_pair = tl.load(q_ptrs + (partner - d)[None, :] * stride_qd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q = _rotate(q, q_pair, cos_ptr, sin_ptr, b64 * stride_cb, s, d, row_ok, d_ok, stride_cs,
                    stride_cd, HEAD_D)

    if WRITE_NEW:
        # The step's own keys/values go into the cache here, not in a launch of their own: the
        # program whose key chunk holds slot start + i writes new row i, then a barrier makes the
        # rows visible to the loop below (no other program reads that chunk). new_v has new_k's
        # strides unless its head size differs.
        i = tl.arange(0, BLOCK_S)
        slot_i = start + i
        mine = (i < S) & (slot_i >= n_lo) & (slot_i < n_hi)
        new_off = b64 * stride_nb + kvh.to(tl.int64) * stride_nh + i[:, None] * stride_ns
        new_mask = mine[:, None] & d_ok[None, :]
        k_row = tl.load(k_new_ptr + new_off + d[None, :] * stride_nd, mask=new_mask)
        if ROTARY:
            k_pair = tl.load(k_new_ptr + new_off + partner[None, :] * stride_nd, mask=new_mask)
            k_row = _rotate(k_row, k_pair, cos_ptr, sin_ptr, b64 * stride_cb, i, d, mine, d_ok,
                            stride_cs, stride_cd, HEAD_D)
        if V_D == HEAD_D:
            v_row = tl.load(v_new_ptr + new_off + d[None, :] * stride_nd, mask=new_mask)
            new_v_mask = new_mask
        else:
            new_v_mask = mine[:, None] & dv_ok[None, :]
            v_row = tl.load(v_new_ptr + b64 * stride_wb + kvh.to(tl.int64) * stride_wh
                            + i[:, None] * stride_ws + dv[None, :] * stride_wd, mask=new_v_mask)
        row_i = _slot(slot_i, ring, RING)
        tl.store(k_base + row_i[:, None] * stride_kt + d[None, :] * stride_kd,
                 k_row.to(k_ptr.dtype.element_ty), mask=new_mask)
        tl.store(v_base + row_i[:, None] * stride_vt + dv[None, :] * stride_vd,
                 v_row.to(v_ptr.dtype.element_ty), mask=new_v_mask)
        tl.debug_barrier()
    valid_base = valid_ptr + b64 * stride_mb
    last_allowed = start + s  # causal limit of each row
    if ALIBI:
        # Each row's slope, in the base-2 units of the scores.
        slope = tl.load(slopes_ptr + head, mask=row_ok, other=0.0) * 1.4426950408889634
    if SINKS:
        # Each row's sink logit, in the same units: it joins the softmax's denominator only.
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        sink = 0.0

    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_range = n < n_hi
        # Which positions hold real tokens (one byte per position).
        ok = tl.load(valid_base + n * stride_mt, mask=in_range, other=0) != 0
        ok = ok & in_range
        row = _slot(n, ring, RING)  # where each position's key and value sit in the cache
        if QK_CHUNK == 0:
            # K tile [BLOCK_N, D]: one pass over these rows for every query row of the group.
            k = tl.load(
                k_base + row[:, None] * stride_kt + d[None, :] * stride_kd,
                mask=in_range[:, None] & d_ok[None, :],
                other=0.0,
            )
        if V_WITH_K:
            # Requested now, independent of the valid bytes, so K, V and the mask are in flight
            # together; the rows nobody may attend are zeroed below instead of masked here.
            v = tl.load(
                v_base + row[:, None] * stride_vt + dv[None, :] * stride_vd,
                mask=in_range[:, None] & dv_ok[None, :],
                other=0.0,
            )
        if QK_CHUNK == 0:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        else:
            # Keys wider than one product: their scores summed over QK_CHUNK lanes at a time.
            qk = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            for c in tl.static_range(0, HEAD_D, QK_CHUNK):
                dc = c + tl.arange(0, QK_CHUNK)
                dc_ok = dc < HEAD_D
                q_c = tl.load(q_rows[:, None] + dc[None, :] * stride_qd,
                              mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
                k_c = tl.load(k_base + row[:, None] * stride_kt + dc[None, :] * stride_kd,
                              mask=in_range[:, None] & dc_ok[None, :], other=0.0)
                qk += tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION)
            qk = qk * scale_log2e
        if ALIBI:
            qk += slope[:, None] * (n[None, :] - last_allowed[:, None]).to(tl.float32)
        allowed = ok[None, :]
        if CAUSAL:
            allowed = allowed & (n[None, :] <= last_allowed[:, None])
        if WINDOW > 0:
            allowed = allowed & (n[None, :] > last_allowed[:, None] - WINDOW)
        qk = tl.where(allowed, qk, float("-inf"))

        p, alpha, m_new, l_i = online_softmax_step(qk, m_i, l_i)
        # V tile: slots nobody may attend are zeroed so garbage there cannot reach the sums.
        if V_WITH_K:
            v = tl.where(ok[:, None], v, 0.0).to(v_ptr.dtype.element_ty)
        else:
            v = tl.load(
                v_base + row[:, None] * stride_vt + dv[None, :] * stride_vd,
                mask=ok[:, None] & dv_ok[None, :],
                other=0.0,
            )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_ptrs = (
        out_ptr
        + b64 * stride_ob
        + head[:, None] * stride_oh
        + s[:, None] * stride_os
        + dv[None, :] * stride_od
    )
    out_ok = row_ok[:, None] & dv_ok[None, :]
    if IS_SPLIT:
        # Unnormalised partials of this chunk, merged by the combine kernel (or by the group's
        # last split program).
        row_id = (b * (HKV * GROUP) + head) * S + s
        slot = row_id.to(tl.int64) * num_splits + pid_split
        store_ok = row_ok & (n_lo < live)
        tl.store(
            part_acc_ptr + slot[:, None] * BLOCK_DV + dv[None, :],
            acc,
            mask=store_ok[:, None] & dv_ok[None, :],
        )
        tl.store(part_ml_ptr + slot * 2, m_i, mask=store_ok)
        tl.store(part_ml_ptr + slot * 2 + 1, l_i, mask=store_ok)
        if MERGE_IN_SPLIT:
            if _last_to_arrive(arrivals_ptr + pid_bh, num_splits):
                o = _merge_partials(part_acc_ptr, part_ml_ptr, row_id, row_ok, dv, dv_ok, span,
                                    chunk, num_splits, sink, SPLITS_P2, BLOCK_R, BLOCK_DV, SINKS)
                tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        # The whole key range was ours: normalise and write; rows with no key get zeros.
        if SINKS:
            l_i += tl.exp2(sink - m_i)
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _decode_combine_kernel(
    part_acc_ptr,
    part_ml_ptr,
    start_ptr,
    out_ptr,
    sinks_ptr,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    S,
    T,
    HQ,
    num_splits,
    HEAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    USE_PDL: tl.constexpr,
    WINDOW: tl.constexpr,
    SINKS: tl.constexpr,
):
    pdl.wait_and_release(USE_PDL)
    row = tl.program_id(0)  # (b * HQ + h) * S + s
    b = row // (HQ * S)
    h = (row // S) % HQ
    s = row % S
    first, live = _key_range(tl.load(start_ptr).to(tl.int32), S, T, WINDOW)
    span = live - first

    # Only splits whose chunk starts inside the live length wrote partials.
    sp = tl.arange(0, SPLITS_P2)
    sp_ok = (sp < num_splits) & (sp * _chunk(span, num_splits, BLOCK_N) < span)
    slot = row.to(tl.int64) * num_splits + sp
    m = tl.load(part_ml_ptr + slot * 2, mask=sp_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + slot * 2 + 1, mask=sp_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)
    l_sum = tl.sum(w * l, axis=0)
    if SINKS:  # the head's sink logit joins the denominator
        l_sum += tl.exp2(tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634 - m_safe)

    # Weighted sum of the partial accumulators.
    d = tl.arange(0, BLOCK_D)
    if HEAD_D == BLOCK_D:
        # A constant-true mask folds away, leaving plain 16-byte loads along D.
        d_ok = tl.full((BLOCK_D,), True, tl.int1)
    else:
        d_ok = d < HEAD_D
    acc = tl.load(
        part_acc_ptr + slot[:, None] * BLOCK_D + d[None, :],
        mask=sp_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(l_sum > 0.0, l_sum, 1.0)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + s * stride_os + d * stride_od
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def check_attention_inputs(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_valid: Tensor, start: Tensor, scale: float
) -> None:
    """Raise ValueError naming the first problem with the inputs of the attention op.

    The cache may hold more sequences than q (a cache sized for the largest batch): the first B
    are used.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, Hq, S, D]; got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D [B, Hkv, T, D]; got shape {tuple(k_cache.shape)}")
    if v_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"v_cache shape {tuple(v_cache.shape)} must be k_cache's {tuple(k_cache.shape)} but "
            "for its head size: [B, Hkv, T, Dv]"
        )
    batch, hq, s, d = q.shape
    kb, hkv, t, kd = k_cache.shape
    if kb < batch:
        raise ValueError(f"batch mismatch: q has {batch} sequences, the cache only {kb}")
    if kd != d:
        raise ValueError(f"head dim mismatch: q has D={d}, the cache D={kd}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"Hq={hq} query heads is not a multiple of Hkv={hkv} kv heads")
    if 0 in q.shape:
        raise ValueError(f"q is empty: shape {tuple(q.shape)}")
    if d > _MAX_CHUNKED_HEAD_DIM or v_cache.shape[3] > _MAX_VALUE_DIM:
        raise ValueError(f"head dims D={d}, Dv={v_cache.shape[3]}: above the supported "
                         f"{_MAX_CHUNKED_HEAD_DIM} (keys) and {_MAX_VALUE_DIM} (values)")
    if s > t:
        raise ValueError(f"S={s} new tokens do not fit a cache of T={t} slots")
    # kv_valid is per position: as long as the cache, or longer for a ring cache.
    if kv_valid.dim() != 2 or kv_valid.shape[0] != batch or kv_valid.shape[1] < t:
        raise ValueError(f"kv_valid must be [B, T] = [{batch}, {t}] (or [B, T'] with T' > T for "
                         f"a ring cache); got {tuple(kv_valid.shape)}")
    if kv_valid.dtype != torch.bool:
        raise ValueError(f"kv_valid must be a bool tensor; got {kv_valid.dtype}")
    if not (
        isinstance(start, Tensor)
        and start.numel() == 1
        and start.dtype in (torch.int64, torch.int32)
    ):
        got = f"{start.dtype} {tuple(start.shape)}" if isinstance(start, Tensor) else repr(start)
        raise ValueError(
            "start must be an int64 tensor of shape [1] in device memory (CUDA-graph replay "
            f"moves it between runs); got {got}"
        )
    if not q.is_floating_point() or q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share one floating dtype; got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float; got {scale!r}")
    check_device(q, k_cache, v_cache, kv_valid, start)


def check_slopes(alibi: Tensor | None, q: Tensor, causal: bool) -> None:
    """ALiBi slopes for a kernel: None, or float32 [Hq] on q's device (causal attention only)."""
    check_alibi(alibi, q.shape[1], causal)
    if alibi is not None and (alibi.dtype != torch.float32 or alibi.device != q.device):
        raise ValueError(f"alibi slopes must be float32 on {q.device}; got {alibi.dtype} on "
                         f"{alibi.device}")


def uses_decode_kernel(q: Tensor, k_cache: Tensor) -> bool:
    """Few new query rows per kv head: the split-key decode kernel, not flash tiles."""
    group = q.shape[1] // k_cache.shape[1]
    return q.shape[2] <= 16 and group * q.shape[2] <= _MAX_ROWS


def _heads_per_launch(hq: int, hkv: int, s: int, d_v: int) -> int:
    """Query heads one launch takes: all of them, unless values past 256 lanes would give a
    program more than _MAX_ACC accumulator elements — then, over one kv head, as many as fit."""
    block_dv = max(16, triton.next_power_of_2(d_v))
    rows = hq // hkv * s
    block_r = max(16, triton.next_power_of_2(rows))
    if block_dv <= MAX_WHOLE_HEAD_DIM or block_r * block_dv <= _MAX_ACC:
        return hq
    if hkv != 1:
        raise ValueError(f"values {d_v} wide need one kv head (latent attention) when a kv head "
                         f"has {rows} query rows; got {hkv} kv heads")
    return max(1, _MAX_ACC // block_dv // s)


def pick_decode_config(batch: int, hkv: int, t: int, sm_count: int) -> DecodeConfig:
    """Enough key splits that every SM gets about two programs, each still a long K/V stream.

    Two pipeline stages leave shared memory for three or four programs per SM, which measured
    faster than deeper pipelines with fewer programs (an unsplit cache of at most four tiles
    takes one stage and twice the programs per SM); split programs, whose chunks are short,
    take wider key tiles — unless the cache is so short, and the kv heads so few, that wide
    tiles would leave only a handful of programs.
    """
    pairs = batch * hkv
    splits = max(1, triton.cdiv(2 * sm_count, pairs))
    block_n = 64 if splits == 1 else 128
    if pairs * triton.cdiv(t, block_n) < _min_programs():
        # A short cache over few kv heads leaves few programs, each a chain of dependent loads:
        # 64-key tiles double them (Llama-1.1B: 8 -> 16 programs, 1.28 -> 1.20 ms/token on an
        # H100, bench/NOTES.md run 6; under 128 programs rather than 32: GPT-2 XL 1.860 ->
        # 1.818 ms, OPT-1.3B 1.250 -> 1.239, Llama-7B 4.934 -> 4.910, at tp=2 2.980 -> 2.964,
        # runs 34 and tp 19).
        block_n = 64
    splits = min(splits, triton.cdiv(t, block_n))
    if t <= _single_pass_keys():
        # A short cache in one pass per (sequence, kv head): no merge launch, fewer programs.
        return DecodeConfig(block_n=64, num_splits=1, num_warps=4, num_stages=2,
                            v_with_k=_v_with_k())
    # Unsplit, a few tiles a program have little to pipeline, and a second stage's shared
    # memory would halve the programs an SM holds: Llama-7B batch 16 at 160 of 200 keys (512
    # programs of four tiles) ran in two waves, 4.44 -> 4.30 ms a step with one stage. Split
    # programs of one to four tiles measured 0.4-1.5 % slower a step with one stage (the b1
    # models, bench/NOTES.md runs 5 and 7): they keep two.
    tiles = triton.cdiv(t, block_n)
    stages = 1 if splits == 1 and tiles <= _SHORT_CHUNK_TILES else 2
    return DecodeConfig(block_n=block_n, num_splits=splits, num_warps=4, num_stages=stages,
                        merge_in_split=_merge_in_split(), v_with_k=_v_with_k())


def _config_override() -> DecodeConfig | None:
    """DSC_DECODE_CONFIG=BLOCK_N/SPLITS/WARPS/STAGES: one launch configuration for every call
    (tuning and A/B runs; unset: `pick_decode_config`)."""
    spec = os.environ.get("DSC_DECODE_CONFIG", "")
    if not spec:
        return None
    parts = spec.split("/")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"DSC_DECODE_CONFIG={spec!r}: expected BLOCK_N/SPLITS/WARPS/STAGES, "
                         f"e.g. 64/1/4/2")
    block_n, splits, warps, stages = map(int, parts)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"DSC_DECODE_CONFIG={spec!r}: BLOCK_N must be a power of two >= 16")
    return DecodeConfig(block_n=block_n, num_splits=splits, num_warps=warps, num_stages=stages,
                        merge_in_split=_merge_in_split(), v_with_k=_v_with_k())


def _min_programs() -> int:
    """Fewer programs than this with 128-key tiles take 64-key tiles
    (DSC_DECODE_MIN_PROGRAMS, default 128)."""
    value = os.environ.get("DSC_DECODE_MIN_PROGRAMS", "128")
    if not value.isdigit():
        raise ValueError(f"DSC_DECODE_MIN_PROGRAMS={value!r}: expected a number of programs")
    return int(value)


def _single_pass_keys() -> int:
    """Caches up to this many slots skip the key split (DSC_DECODE_SINGLE_PASS_KEYS, default 0:
    always split as above). For the A/B of a merge launch against fewer, longer programs."""
    return int(os.environ.get("DSC_DECODE_SINGLE_PASS_KEYS", "0"))


def _merge_in_split() -> bool:
    """DSC_DECODE_MERGE: `split` (the last split program merges) or `kernel` (a second launch)."""
    mode = os.environ.get("DSC_DECODE_MERGE", "kernel")
    if mode not in ("split", "kernel"):
        raise ValueError(f"DSC_DECODE_MERGE={mode!r}: expected split or kernel")
    return mode == "split"


def _v_with_k() -> bool:
    """DSC_DECODE_V_WITH_K=1: V rows loaded beside the K rows (`DecodeConfig.v_with_k`)."""
    value = os.environ.get("DSC_DECODE_V_WITH_K", "0")
    if value not in ("0", "1"):
        raise ValueError(f"DSC_DECODE_V_WITH_K={value!r}: expected 0 or 1")
    return value == "1"


def _prefetch_keys() -> int:
    """K/V rows prefetched before the PDL wait (DSC_DECODE_PREFETCH=0 turns it off)."""
    return _PREFETCH_KEYS if os.environ.get("DSC_DECODE_PREFETCH", "1") != "0" else 0


_arrivals: dict[tuple[int, int], Tensor] = {}


def _arrival_counters(device: torch.device, groups: int) -> Tensor:
    """Zeroed int32 counters, one per (sequence, kv head), for the merge in the split kernel.

    Every launch leaves them at zero again (the last program of a group resets its counter), so
    one set per device and stream serves every call in order; calls on two streams at once get
    their own sets. Grown, never shrunk.
    """
    key = (device.index or 0, torch.cuda.current_stream(device).stream_id)
    counters = _arrivals.get(key)
    if counters is None or counters.numel() < groups:
        counters = torch.zeros(max(groups, 1024), dtype=torch.int32, device=device)
        _arrivals[key] = counters
    return counters


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_valid: Tensor,
    start: Tensor,
    causal: bool,
    scale: float,
    *,
    out: Tensor | None = None,
    config: DecodeConfig | None = None,
    new_k: Tensor | None = None,
    new_v: Tensor | None = None,
    rotary: tuple[Tensor, Tensor] | None = None,
    prefetch: Tensor | None = None,
    window: int = 0,
    alibi: Tensor | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention of S (small) new query tokens over a KV cache; see the module docstring.

    q [B, Hq, S, D]; k_cache [B, Hkv, T, D], v_cache [B, Hkv, T, Dv] (Hq a multiple of Hkv; Dv
    is D but for latent attention); kv_valid [B, T] bool; start: int64 tensor [1] on the device;
    returns [B, Hq, S, Dv] in q.dtype. Any strides.
    Needs (Hq // Hkv) * S <= 128 query rows per kv head; longer prompts go to `flash_attention`.
    `out` ([B, Hq, S, Dv] in q's dtype, any strides) receives the result if given.
    `new_k` [B, Hkv, S, D], `new_v` [B, Hkv, S, Dv]: the step's keys and values, written into
    the caches at slots start..start+S-1 by the kernel before it attends (one launch instead of
    a cache write per tensor).
    `rotary` (cos, sin), broadcastable to [B, 1, S, D]: q and new_k arrive unrotated and are
    rotated as they are loaded (x * cos + rotate_half(x) * sin), sparing the rotary launch.
    `prefetch`: a weight (K contiguous) whose rows' first lines, within DSC_PREFETCH_MB, the
    programs request into L2 before they attend (`dsc.kernels.l2_prefetch`).
    `window`: a causal sliding window (0: none); the launch is sized for the window + S - 1
    slots the step can see, not for the whole cache. With a window, k_cache and v_cache may be a
    ring of R < T slots (T = kv_valid's positions): position p's row is p % R, and a step of S
    tokens needs R >= window + S - 1.
    `alibi`: float32 slopes [Hq] on q's device (ALiBi), or None.
    `sinks`: a logit per query head [Hq] on q's device (attention sinks), or None.
    """
    check_attention_inputs(q, k_cache, v_cache, kv_valid, start, scale)
    check_window(window, causal)
    check_slopes(alibi, q, causal)
    check_sinks(sinks, q.shape[1])
    if (new_k is None) != (new_v is None):
        raise ValueError("give both new_k and new_v, or neither")
    d_v = v_cache.shape[3]
    if new_k is not None:
        want = (q.shape[0], k_cache.shape[1], q.shape[2])
        for name, t, size in (("new_k", new_k, q.shape[3]), ("new_v", new_v, d_v)):
            if tuple(t.shape) != (*want, size) or t.device != q.device:
                raise ValueError(f"{name} must be [B, Hkv, S, {'D' if name == 'new_k' else 'Dv'}]"
                                 f" = {[*want, size]} on {q.device}; got {list(t.shape)} on "
                                 f"{t.device}")
        if d_v == q.shape[3] and new_k.stride() != new_v.stride():
            new_k, new_v = new_k.contiguous(), new_v.contiguous()
    heads = _heads_per_launch(q.shape[1], k_cache.shape[1], q.shape[2], d_v)
    if heads < q.shape[1]:
        # Wide values over one kv head (latent attention): the query heads a few at a time, so
        # a program's accumulator fits its registers; each launch reads the same latent rows.
        out = torch.empty((*q.shape[:3], d_v), device=q.device, dtype=q.dtype) if out is None \
            else out
        for h0 in range(0, q.shape[1], heads):
            h = slice(h0, h0 + heads)
            decode_attention(q[:, h], k_cache, v_cache, kv_valid, start, causal, scale,
                             out=out[:, h], config=config, new_k=new_k, new_v=new_v,
                             prefetch=prefetch if h0 == 0 else None, window=window,
                             alibi=None if alibi is None else alibi[h],
                             sinks=None if sinks is None else sinks[h])
        return out
    qk_chunk = QK_CHUNK if q.shape[3] > MAX_WHOLE_HEAD_DIM else 0
    cos = sin = q  # placeholder pointers when unused
    cos_strides = (0, 0, 0)
    if rotary is not None:
        if new_k is None:
            raise ValueError("rotary needs new_k and new_v: the kernel rotates the keys it writes")
        if qk_chunk:
            raise ValueError(f"rotary needs a head dimension of at most {MAX_WHOLE_HEAD_DIM}; got "
                             f"{q.shape[3]} (rotate q and the new keys first)")
        if q.shape[-1] % 2:
            raise ValueError(f"rotary needs an even head dimension, got {q.shape[-1]}")
        want = (q.shape[0], 1, q.shape[2], q.shape[3])
        try:
            cos, sin = (t.expand(want) for t in rotary)
        except RuntimeError as exc:
            raise ValueError(f"cos/sin {[tuple(t.shape) for t in rotary]} do not broadcast to "
                             f"[B, 1, S, D] = {list(want)}") from exc
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        cos_strides = (cos.stride(0), cos.stride(2), cos.stride(3))
    batch, hq, s, d = q.shape
    hkv, ring = k_cache.shape[1], k_cache.shape[2]
    t = kv_valid.shape[1]  # positions; a ring cache holds fewer slots, position p in p % ring
    if ring < t:
        check_ring(ring, window, causal)
        if s > ring - window + 1:
            raise ValueError(f"a step of S={s} tokens overwrites the ring of {ring} slots its "
                             f"window of {window} reads; at most {ring - window + 1} tokens")
    # The most slots one step's queries can see: the grid is sized for these (never for start,
    # so a captured CUDA graph stays valid as the sequence grows).
    seen = min(t, window + s - 1) if window else t
    group = hq // hkv
    if group * s > _MAX_ROWS:
        raise ValueError(
            f"decode_attention holds (Hq/Hkv)*S = {group * s} query rows per kv head, above "
            f"{_MAX_ROWS}; use flash_attention for S={s}"
        )
    cfg = config or _config_override() or pick_decode_config(batch, hkv, seen, sm_count(q.device))
    if config is None and (qk_chunk or d_v > MAX_WHOLE_HEAD_DIM):
        # Wide rows (latent attention: 576-wide keys by chunks, a [16, 512] accumulator): 16-key
        # tiles at 8 warps compile for sm_90 without spilling registers (ptxas -v; 32-key
        # tiles spill 232 bytes at 8 warps, 5.9 KB at 4).
        cfg = replace(cfg, block_n=16, num_warps=8)

    block_d = max(16, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(d_v))
    block_r = max(16, triton.next_power_of_2(group * s))
    blocks = triton.cdiv(seen, cfg.block_n)
    splits = max(1, min(cfg.num_splits, blocks))
    # Splits whose chunk would start beyond the slots seen at a full cache are dropped (the
    # kernels divide the live length, or the window's part of it, over the rest).
    splits = triton.cdiv(seen, triton.cdiv(blocks, splits) * cfg.block_n)

    out_shape = (batch, hq, s, d_v)
    if out is None:
        out = torch.empty(out_shape, device=q.device, dtype=q.dtype)
    else:
        check_out(out, out_shape, q)
    merge_in_split = splits > 1 and cfg.merge_in_split and splits <= _MAX_INLINE_SPLITS
    if splits > 1:
        rows = batch * hq * s
        part_acc = torch.empty((rows, splits, block_dv), device=q.device, dtype=torch.float32)
        part_ml = torch.empty((rows, splits, 2), device=q.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out
    if merge_in_split:
        arrivals = (_arrival_counters(q.device, batch * hkv) if q.is_cuda
                    else torch.zeros(batch * hkv, dtype=torch.int32))
    else:
        arrivals = start  # placeholder pointer when unused
    valid = kv_valid.view(torch.uint8)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    _decode_split_kernel[(splits, batch * hkv)](
        q,
        k_cache,
        v_cache,
        valid,
        start,
        out,
        part_acc,
        part_ml,
        new_k if new_k is not None else q,
        new_v if new_v is not None else q,
        cos,
        sin,
        arrivals,
        start if alibi is None else alibi,  # placeholder pointers when unused
        start if sinks is None else sinks,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *valid.stride(),
        *out.stride(),
        *(new_k.stride() if new_k is not None else (0, 0, 0, 0)),
        *(new_v.stride() if new_v is not None else (0, 0, 0, 0)),
        *cos_strides,
        s,
        t,
        hkv,
        splits,
        ring,
        float(scale) * LOG2E,
        GROUP=group,
        CAUSAL=bool(causal),
        IS_SPLIT=splits > 1,
        WRITE_NEW=new_k is not None,
        ROTARY=rotary is not None,
        BLOCK_S=triton.next_power_of_2(s),
        HEAD_D=d,
        BLOCK_R=block_r,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        V_D=d_v,
        BLOCK_DV=block_dv,
        QK_CHUNK=qk_chunk,
        DOT_PRECISION=precision,
        MERGE_IN_SPLIT=merge_in_split,
        V_WITH_K=cfg.v_with_k,
        SPLITS_P2=triton.next_power_of_2(splits),
        WINDOW=window,
        ALIBI=alibi is not None,
        SINKS=sinks is not None,
        RING=ring < t,
        PREFETCH_KEYS=_prefetch_keys(),
        LINE_ELEMS=min(128 // k_cache.element_size(), block_d, block_dv),
        **l2_prefetch.launch_args(
            None if prefetch is None else l2_prefetch.weight_lines(prefetch), q),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl.launch_options(q.device),
    )
    if splits > 1 and not merge_in_split:
        _decode_combine_kernel[(batch * hq * s,)](
            part_acc,
            part_ml,
            start,
            out,
            start if sinks is None else sinks,
            *out.stride(),
            s,
            t,
            hq,
            splits,
            HEAD_D=d_v,  # the output's head size: the values'
            BLOCK_N=cfg.block_n,
            BLOCK_D=block_dv,
            SPLITS_P2=triton.next_power_of_2(splits),
            WINDOW=window,
            SINKS=sinks is not None,
            num_warps=4,
            **pdl.launch_options(q.device),
        )
    return out
