"""One decode step's QKV projection and attention in one launch (one sequence, one new token).

At batch 1 a small model's attention reads almost nothing (Llama-1.1B: 0.15 MB of K/V a layer
at 160 cached tokens) yet costs two launches after the QKV GEMV — the split kernel and its
merge — each with the fixed cost of a kernel boundary (bench/NOTES.md, ninth session: 14–15 % of
the 1.1B's and GPT-2 XL's step). Here the GEMV's own programs finish the job:

* each program streams BLOCK_N rows of the [q; k; v] weight against the (normalised) input row,
  as the one-row path of `small_batch_gemm` does — an RMSNorm applied to the finished sums, a
  LayerNorm's statistics from one load of the row first — adds the bias and stores its columns
  of q, k or v (rounded to the model's dtype, as the unfused GEMV would) to a scratch row;
* BLOCK_N divides the head dimension, so every program's columns belong to one kv group (the
  kv head and the query heads that share it). The program takes a ticket from its group's
  arrival counter; the group's last program to arrive, which then sees every column of the
  group, rotates q and the new key (rotary embeddings, if any), writes the new key and value
  into the cache at slot `start`, and attends the group's query heads over slots 0..start — the
  cached keys tile by tile, the new key from registers — with the online softmax of the other
  attention kernels, then resets the counter for the next launch.

So the attention of a kv group runs on one program, in the tail of the projection: right for
short caches (a few key tiles), not for thousands of keys, where the split decode kernel
spreads the cache over the GPU. The caller chooses (see `fits`).

Semantics as `decode_attention` with S = 1, causal: the query at slot start attends slot j iff
j <= start and kv_valid[0, j]. The compiler gives it the decode steps of one sequence with
DSC_QKV_ATTENTION=1 (pass `fuse_qkv_attention`); `bench/kernels.py --only qkvattn` times it
against the unfused pair.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import pdl
from dsc.kernels.checks import check_device
from dsc.kernels.decode_attention import _arrival_counters, _last_to_arrive, _rotate
from dsc.kernels.online_softmax import LOG2E, online_softmax_step

__all__ = ["BLOCK_N", "MAX_KEYS", "fits", "qkv_attention"]

MAX_KEYS = 1024  # cache slots one program per kv group may walk (not yet measured; see fits)
BLOCK_N = 16  # projection columns per program by default (a divisor of the head dimension)
_MAX_STATS_K = 8192  # LayerNorm rows up to this length take their statistics in one load


@triton.jit
def _qkv_attention_kernel(
    x_ptr, w_ptr, bias_ptr, nw_ptr, nb_ptr, norm_eps,
    qkv_ptr, arrivals_ptr,
    k_ptr, v_ptr, valid_ptr, start_ptr, cos_ptr, sin_ptr, out_ptr,
    K, T, scale_log2e,
    stride_wn, stride_wk,
    stride_kh, stride_kt, stride_kd,
    stride_vh, stride_vt, stride_vd,
    stride_mt, stride_cd,
    HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, PER_GROUP: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
    NORM: tl.constexpr, HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, STATS_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROTARY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    first = pid * BLOCK_N
    # The kv group of this program's columns: q rows first, then k, then v.
    if first < HQ * HEAD_D:
        group = first // (GROUP * HEAD_D)
    elif first < (HQ + HKV) * HEAD_D:
        group = (first - HQ * HEAD_D) // HEAD_D
    else:
        group = (first - (HQ + HKV) * HEAD_D) // HEAD_D

    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    if USE_PDL and BLOCK_K >= 64:
        # Placed while the previous kernel runs: the first weight tile toward L2 (weights never
        # depend on it), then wait for x. The next kernel is let in after the stream, as the
        # small-batch GEMM does.
        lines = (cols.to(tl.int64)[:, None] * stride_wn
                 + (tl.arange(0, BLOCK_K // 64) * 64)[None, :] * stride_wk)
        pdl.prefetch_l2(w_ptr + lines)
    pdl.wait(USE_PDL)

    # LayerNorm: the row's statistics first, from one load (RMSNorm is applied after the loop).
    mean = 0.0
    rstd = 1.0
    if NORM == 2:
        kk = tl.arange(0, STATS_K)
        xs = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        mean = tl.sum(xs, axis=0) / K
        var = tl.sum(tl.where(kk < K, (xs - mean) * (xs - mean), 0.0), axis=0) / K
        rstd = tl.math.rsqrt(var + norm_eps)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # Whole K steps unmasked (16-byte loads), a ragged end in one masked step, as in the
    # small-batch GEMM.
    k_full = (K // BLOCK_K) * BLOCK_K
    for k0 in tl.range(0, k_full, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + offs_k
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        acc, s2 = _project_step(acc, s2, w, tl.load(x_ptr + k), k, K, k < K, mean, rstd, nw_ptr,
                                nb_ptr, NORM, HAS_NW, HAS_NB)
        w_ptrs += BLOCK_K * stride_wk
    if k_full < K:
        k = k_full + offs_k
        k_ok = k < K
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc, s2 = _project_step(acc, s2, w, tl.load(x_ptr + k, mask=k_ok, other=0.0), k, K,
                                k_ok, mean, rstd, nw_ptr, nb_ptr, NORM, HAS_NW, HAS_NB)
    pdl.release(USE_PDL)
    y = tl.sum(acc, axis=1)
    if NORM == 1:
        y = y * tl.math.rsqrt(tl.sum(s2, axis=0) / K + norm_eps)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols).to(tl.float32)
    tl.store(qkv_ptr + cols, y.to(qkv_ptr.dtype.element_ty))

    if _last_to_arrive(arrivals_ptr + group, PER_GROUP):
        _attend_group(group, qkv_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, cos_ptr, sin_ptr,
                      out_ptr, T, scale_log2e, stride_kh, stride_kt, stride_kd, stride_vh,
                      stride_vt, stride_vd, stride_mt, stride_cd, HQ, HKV, GROUP, HEAD_D,
                      BLOCK_D, BLOCK_R, BLOCK_KEYS, ROTARY, DOT_PRECISION)


@triton.jit
def _project_step(acc, s2, w, x, k, K, k_ok, mean, rstd, nw_ptr, nb_ptr, NORM: tl.constexpr,
                  HAS_NW: tl.constexpr, HAS_NB: tl.constexpr):
    """One K step of the projection: x normalised as the unfused ops would (an RMSNorm's sum of
    squares gathered for after the loop, x * gamma taken now; a LayerNorm's normalised,
    scaled and shifted values each rounded to x's dtype), times the weight tile."""
    if NORM == 1:
        xf = x.to(tl.float32)
        s2 += xf * xf
        if HAS_NW:
            xf = xf * tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    elif NORM == 2:
        y = ((x.to(tl.float32) - mean) * rstd).to(x.dtype)
        if HAS_NW:
            y = (y.to(tl.float32) * tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                 ).to(x.dtype)
        if HAS_NB:
            y = (y.to(tl.float32) + tl.load(nb_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                 ).to(x.dtype)
        xf = y.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    return acc + w.to(tl.float32) * xf[None, :], s2


@triton.jit
def _attend_group(group, qkv_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, cos_ptr, sin_ptr, out_ptr,
                  T, scale_log2e, stride_kh, stride_kt, stride_kd, stride_vh, stride_vt,
                  stride_vd, stride_mt, stride_cd, HQ: tl.constexpr, HKV: tl.constexpr,
                  GROUP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_KEYS: tl.constexpr, ROTARY: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """The group's query heads over cache slots 0..start, the new key and value written first.
    q, k and v come from the scratch row other programs wrote: volatile loads, past any stale L1
    line."""
    start = tl.load(start_ptr).to(tl.int32)
    r = tl.arange(0, BLOCK_R)
    row_ok = r < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    zero = r * 0  # token index 0 of every row (cos/sin hold the one new position)
    q_at = (group * GROUP + r)[:, None] * HEAD_D + d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(qkv_ptr + q_at, mask=q_mask, other=0.0, volatile=True)
    k_at = (HQ + group) * HEAD_D + d
    v_at = (HQ + HKV + group) * HEAD_D + d
    k_new = tl.load(qkv_ptr + k_at[None, :] + zero[:, None], mask=q_mask, other=0.0,
                    volatile=True)
    v_new = tl.load(qkv_ptr + v_at, mask=d_ok, other=0.0, volatile=True)
    if ROTARY:
        partner = tl.where(d < HEAD_D // 2, d + HEAD_D // 2, d - HEAD_D // 2)
        q_pair = tl.load(qkv_ptr + q_at + (partner - d)[None, :], mask=q_mask, other=0.0,
                         volatile=True)
        q = _rotate(q, q_pair, cos_ptr, sin_ptr, 0, zero, d, row_ok, d_ok, 0, stride_cd, HEAD_D)
        k_pair = tl.load(qkv_ptr + (k_at + partner - d)[None, :] + zero[:, None], mask=q_mask,
                         other=0.0, volatile=True)
        k_new = _rotate(k_new, k_pair, cos_ptr, sin_ptr, 0, zero, d, row_ok, d_ok, 0, stride_cd,
                        HEAD_D)
    # Every row of k_new holds the same (rotated) key; row 0 goes into the cache.
    k_base = k_ptr + group.to(tl.int64) * stride_kh
    v_base = v_ptr + group.to(tl.int64) * stride_vh
    row0 = (r == 0)[:, None] & d_ok[None, :]
    tl.store(k_base + start * stride_kt + (d[None, :] + zero[:, None]) * stride_kd,
             k_new.to(k_ptr.dtype.element_ty), mask=row0)
    tl.store(v_base + start * stride_vt + d * stride_vd, v_new.to(v_ptr.dtype.element_ty),
             mask=d_ok)

    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, start, BLOCK_KEYS):
        n = n0 + tl.arange(0, BLOCK_KEYS)
        in_range = n < start
        ok = (tl.load(valid_ptr + n * stride_mt, mask=in_range, other=0) != 0) & in_range
        k = tl.load(k_base + n[:, None] * stride_kt + d[None, :] * stride_kd,
                    mask=in_range[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        qk = tl.where(ok[None, :], qk, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(qk, m_i, l_i)
        v = tl.load(v_base + n[:, None] * stride_vt + d[None, :] * stride_vd,
                    mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    # The new key, from registers: one more online-softmax step of width one.
    new_ok = tl.load(valid_ptr + start * stride_mt) != 0
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale_log2e
    s_new = tl.where(new_ok, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p_new = tl.exp2(s_new - m_safe)
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
    l_i = l_i * alpha + p_new
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_at, o.to(out_ptr.dtype.element_ty), mask=q_mask)


def fits(batch: int, new_tokens: int, cache_slots: int, head_dim: int, block_n: int) -> bool:
    """Whether `qkv_attention` takes this step: one sequence, one new token, at most MAX_KEYS
    cache slots (one program per kv group walks them all), and column blocks that divide the
    head dimension."""
    return (batch == 1 and new_tokens == 1 and cache_slots <= MAX_KEYS
            and head_dim % block_n == 0)


def qkv_attention(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_valid: Tensor,
    start: Tensor,
    scale: float,
    *,
    heads: int,
    kv_heads: int,
    norm: tuple[str, Tensor | None, Tensor | None, float] | None = None,
    rotary: tuple[Tensor, Tensor] | None = None,
    block_n: int = BLOCK_N,
    block_k: int = 256,
    num_stages: int = 4,
) -> Tensor:
    """Attention output [1, heads * D] of one new token: q, k, v = split(norm(x) @ weight^T +
    bias), rotated if `rotary`, k and v written into the caches at slot `start`, q attending
    slots 0..start where kv_valid holds. Returns the heads side by side, as the o projection
    reads them.

    x [1, K]; weight [(heads + 2 * kv_heads) * D, K], q rows then k then v; bias matching or
    None; k_cache, v_cache [1, kv_heads, T, D] (any strides); kv_valid [1, T] bool; start:
    int64 [1] on the device; norm as for `linear_small_batch` (the input norm: "rms" or
    "layer"); rotary (cos, sin) for the new position, D values each.
    """
    check_device(x, weight, k_cache, v_cache, kv_valid, start)
    n, k = weight.shape
    d = k_cache.shape[-1]
    if x.shape != (1, k):
        raise ValueError(f"x must be one row [1, K={k}]; got {tuple(x.shape)} (batches above one "
                         f"go through linear_small_batch and decode_attention)")
    if n != (heads + 2 * kv_heads) * d or heads % kv_heads:
        raise ValueError(f"weight {tuple(weight.shape)} is not [(heads + 2 * kv_heads) * D, K] "
                         f"for heads={heads}, kv_heads={kv_heads}, D={d}")
    if tuple(k_cache.shape[:2]) != (1, kv_heads) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [1, {kv_heads}, T, {d}]; got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    if not fits(1, 1, k_cache.shape[2], d, block_n):
        raise ValueError(f"qkv_attention needs at most {MAX_KEYS} cache slots and block_n "
                         f"dividing D={d}; got T={k_cache.shape[2]}, block_n={block_n}")
    kind, nw, nb, eps = norm if norm is not None else (None, None, None, 0.0)
    if kind not in (None, "rms", "layer") or (kind == "rms" and nb is not None):
        raise ValueError(f"norm must be ('rms', w, None, eps) or ('layer', w, b, eps); got {kind!r}")
    if kind == "layer" and k > _MAX_STATS_K:
        raise ValueError(f"a LayerNorm input of {k} features is above {_MAX_STATS_K}")
    group = heads // kv_heads
    cos = sin = x
    stride_cd = 0
    if rotary is not None:
        if d % 2:
            raise ValueError(f"rotary needs an even head dimension, got {d}")
        if any(t.numel() != d for t in rotary):
            raise ValueError(f"cos and sin must hold the new position's D={d} values; got "
                             f"{[tuple(t.shape) for t in rotary]}")
        cos, sin = (t.reshape(d).contiguous() for t in rotary)
        stride_cd = 1
    qkv = torch.empty(n, device=x.device, dtype=x.dtype)
    out = torch.empty(1, heads * d, device=x.device, dtype=x.dtype)
    valid = kv_valid.view(torch.uint8)
    x = x.contiguous()
    # One zeroed counter per kv group; each launch leaves them at zero (shared, in stream order,
    # with the decode attention's merge tickets).
    arrivals = (_arrival_counters(x.device, kv_heads) if x.is_cuda
                else torch.zeros(kv_heads, dtype=torch.int32))
    _qkv_attention_kernel[(n // block_n,)](
        x, weight, bias if bias is not None else x, nw if nw is not None else x,
        nb if nb is not None else x, float(eps),
        qkv, arrivals,
        k_cache, v_cache, valid, start, cos, sin, out,
        k, k_cache.shape[2], float(scale) * LOG2E,
        weight.stride(0), weight.stride(1),
        k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        valid.stride(1), stride_cd,
        HQ=heads, HKV=kv_heads, GROUP=group, PER_GROUP=(group + 2) * d // block_n, HEAD_D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_R=max(16, triton.next_power_of_2(group)), BLOCK_KEYS=64,
        NORM={None: 0, "rms": 1, "layer": 2}[kind], HAS_NW=nw is not None,
        HAS_NB=nb is not None,
        STATS_K=triton.next_power_of_2(k) if kind == "layer" else 1,
        HAS_BIAS=bias is not None, ROTARY=rotary is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4, **pdl.launch_options(x.device),
    )
    return out
