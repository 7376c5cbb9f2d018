"""One-shot all-reduce fused with the residual add and RMSNorm, over symmetric memory.

A tensor-parallel decode step ends every row-parallel block with `h = residual + all_reduce(x)`
and starts the next with `rms_norm(h)`. At batch 1 the message is a few KB, so the time is
fixed costs: a collective kernel with barriers, then a norm kernel. Here one kernel does all of
it, one program per row:

1. store this rank's partial row into its symmetric buffer (peers read it over NVLink), in the
   half of the buffer this row's call count selects;
2. barrier: raise a flag in every peer's flag array (0 -> 1) and take down every peer's flag in
   ours (1 -> 0), all peers at once (one lane each). Compare-and-swap both ways, so a flag a peer
   has not consumed yet is never overwritten;
3. load every rank's row (volatile: the same addresses hold new data every other call), sum in
   fp32, round to x's dtype as the all_reduce would, add the residual, round h, normalise h in
   fp32, round, multiply by the weight — the same roundings as the three ops it replaces.

No second barrier: a row's next call writes the other half, and the call after that — the next
write to this half — comes after that row's barrier of the call in between, which no peer
reaches before it has finished reading this half (kernels of one stream run in order). The call
count lives in this rank's flag array, so it advances under CUDA-graph replay too; every rank
makes the same calls, so the halves agree.

Flag array (int32, symmetric): [MAX_ROWS rows x world ranks] arrival flags, then MAX_ROWS call
counts. The flags are atomics on one lane per peer; a CTA barrier orders the other threads'
stores before the release and their loads after the acquire. A peer that never arrives stops the
kernel with a trap after MAX_SPINS tries, so the host sees a CUDA error instead of hanging.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import pdl

__all__ = [
    "MAX_HIDDEN", "MAX_ROWS", "all_reduce_residual_rms_norm", "buffer_elements", "flag_elements",
]

MAX_ROWS = 64  # rows (tokens) per call: decode steps; prefill goes to the composite path
MAX_SPINS = 1 << 24
MAX_HIDDEN = 16384


def buffer_elements() -> int:
    """Length of each rank's symmetric data buffer: two halves of MAX_ROWS rows of MAX_HIDDEN."""
    return 2 * MAX_ROWS * MAX_HIDDEN


def flag_elements(world: int) -> int:
    """Length of each rank's int32 flag array: arrival flags, then per-row call counts."""
    return MAX_ROWS * world + MAX_ROWS


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _flip_all(ptrs, expect, new, WORLD: tl.constexpr, MAX_SPINS: tl.constexpr,
              CAN_TRAP: tl.constexpr):
    """Compare-and-swap every pointer of ptrs [WORLD] from expect to new, retrying the lanes
    that have not succeeded yet (a done lane compares against -1, which no flag holds)."""
    want = tl.full((WORLD,), expect, tl.int32)
    to = tl.full((WORLD,), new, tl.int32)
    done = tl.atomic_cas(ptrs, want, to, sem="acq_rel", scope="sys") == expect
    spins = 0
    while (tl.sum(done.to(tl.int32), axis=0) < WORLD) & (spins < MAX_SPINS):
        seen = tl.atomic_cas(ptrs, tl.where(done, -1, want), to, sem="acq_rel", scope="sys")
        done = done | (seen == expect)
        spins += 1
    if CAN_TRAP:
        if spins >= MAX_SPINS:
            # A one-element block: inline assembly takes blocks, not scalars.
            tl.inline_asm_elementwise("trap;", "=r,r", [tl.full((1,), spins, tl.int32)],
                                      dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _barrier(flag_ptrs, rank, row, WORLD: tl.constexpr, MAX_SPINS: tl.constexpr,
             CAN_TRAP: tl.constexpr):
    tl.debug_barrier()  # every thread's stores come before the signals
    peers = tl.arange(0, WORLD)
    slot = row * WORLD
    theirs = tl.load(flag_ptrs + peers).to(tl.pointer_type(tl.int32))
    _flip_all(theirs + slot + rank, 0, 1, WORLD, MAX_SPINS, CAN_TRAP)
    mine = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32))
    _flip_all(mine + slot + peers, 1, 0, WORLD, MAX_SPINS, CAN_TRAP)
    tl.debug_barrier()  # ... and every thread's loads come after them


@triton.jit
def _all_reduce_residual_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    h_ptr,
    n_ptr,
    buf_ptrs,
    flag_ptrs,
    rank,
    H,
    eps,
    stride_x,
    stride_r,
    stride_h,
    stride_n,
    WORLD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    PRODUCT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    MAX_ROWS_: tl.constexpr,
    MAX_SPINS: tl.constexpr,
    CAN_TRAP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait_and_release(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    # This row's call count (in our own flag array, after the arrival flags) picks the half.
    count_ptr = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32)) + MAX_ROWS_ * WORLD + row
    count = tl.load(count_ptr, volatile=True)
    half = count & 1
    slot = (half * MAX_ROWS_ + row) * H + cols
    mine = tl.load(buf_ptrs + rank).to(tl.pointer_type(x_ptr.dtype.element_ty))
    tl.store(mine + slot, x, mask=ok)
    _barrier(flag_ptrs, rank, row, WORLD, MAX_SPINS, CAN_TRAP)

    total = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        theirs = tl.load(buf_ptrs + peer).to(tl.pointer_type(x_ptr.dtype.element_ty))
        total += tl.load(theirs + slot, mask=ok, other=0.0, volatile=True).to(tl.float32)
    tl.store(count_ptr, count + 1)  # wraps after 2**31 calls; the low bit still alternates

    reduced = total.to(x_ptr.dtype.element_ty).to(tl.float32)
    res = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    h = (res + reduced).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * stride_h + cols, h, mask=ok)
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
    normed = (hf * rstd).to(h_ptr.dtype.element_ty)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        normed = (w.to(tl.float32) * normed.to(tl.float32)).to(PRODUCT)
    tl.store(n_ptr + row * stride_n + cols, normed.to(n_ptr.dtype.element_ty), mask=ok)


def all_reduce_residual_rms_norm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    *,
    rank: int,
    world: int,
    buffer_ptrs: Tensor,
    flag_ptrs: Tensor,
    buffer_elements: int,
) -> tuple[Tensor, Tensor]:
    """(h, rms_norm(h)) with h = residual + sum over ranks of x, one program per row.

    x, residual [..., H] of one shape; weight [H] or None. buffer_ptrs / flag_ptrs: int64 device
    tensors [world] with every rank's symmetric data buffer (x's dtype, buffer_elements long)
    and flag array (int32, flag_elements(world) long, zeroed before first use). Every rank must
    call it with the same shapes, in the same order, and with one H for the life of the buffers
    (a model's hidden size).
    """
    h_dim = x.shape[-1]
    rows = x.numel() // h_dim
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if weight is not None and tuple(weight.shape) != (h_dim,):
        raise ValueError(f"weight must be [{h_dim}], got {tuple(weight.shape)}")
    if rows > MAX_ROWS or 2 * MAX_ROWS * h_dim > buffer_elements:
        raise ValueError(f"{rows} rows of {h_dim} do not fit the fused all-reduce "
                         f"({MAX_ROWS} rows, {buffer_elements} elements)")
    x2 = x.reshape(rows, h_dim).contiguous()
    r2 = residual.reshape(rows, h_dim).contiguous()
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    h = torch.empty((rows, h_dim), device=x.device, dtype=h_dtype)
    normed = torch.empty((rows, h_dim), device=x.device, dtype=out_dtype)
    interpreted = not x.is_cuda
    block_h = triton.next_power_of_2(h_dim)
    _all_reduce_residual_norm_kernel[(rows,)](
        x2, r2, weight if weight is not None else x2, h, normed, buffer_ptrs, flag_ptrs,
        rank, h_dim, float(eps), x2.stride(0), r2.stride(0), h.stride(0), normed.stride(0),
        WORLD=world,
        HAS_WEIGHT=weight is not None,
        PRODUCT=_TL_DTYPES[torch.promote_types(weight.dtype, h_dtype) if weight is not None
                           else h_dtype],
        BLOCK_H=block_h,
        MAX_ROWS_=MAX_ROWS,
        MAX_SPINS=MAX_SPINS,
        CAN_TRAP=not interpreted,
        num_warps=4 if block_h <= 4096 else 8,
        **pdl.launch_options(x.device),
    )
    return h.view(x.shape), normed.view(x.shape)
