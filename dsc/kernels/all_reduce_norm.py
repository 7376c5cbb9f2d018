"""One-shot all-reduce fused with the residual add and RMSNorm, over symmetric memory.

A tensor-parallel decode step ends every row-parallel block with `h = residual + all_reduce(x)`
and starts the next with `rms_norm(h)`. At batch 1 the message is a few KB, so the time is
fixed costs: a collective kernel with barriers, then a norm kernel. Here one kernel does all of
it, one program per row:

1. store this rank's partial row into its symmetric buffer (peers can read it over NVLink);
2. barrier: set a flag in every peer's flag array (0 -> 1), wait for every peer's flag in ours
   (1 -> 0). Compare-and-swap both ways, so a flag a peer has not consumed yet is never
   overwritten: consecutive calls need no epoch counter, which a CUDA graph could not advance;
3. load every rank's row (volatile: the same addresses hold new data every call), sum in fp32,
   round to x's dtype as the all_reduce would, add the residual, round h, normalise h in fp32,
   round, multiply by the weight — the same roundings as the three ops it replaces;
4. a second barrier, so no rank overwrites its buffer (the next call's step 1) while a peer may
   still be reading it.

Flags live in a separate symmetric int32 array [2 phases, rows, ranks]; a rank writes only the
slot [phase, row, its rank] of each peer's array. The flags are scalar compare-and-swaps, done
by one thread of the program; a CTA barrier orders the other threads' stores before the release
and their loads after the acquire. A peer that never arrives stops the kernel with a trap after
about MAX_SPINS tries, so the host sees a CUDA error instead of hanging.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import pdl

__all__ = ["MAX_ROWS", "all_reduce_residual_rms_norm"]

MAX_ROWS = 64  # rows (tokens) per call: decode steps; prefill goes to the composite path
MAX_SPINS = 1 << 24
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _flip(addr, expect, new, MAX_SPINS: tl.constexpr, CAN_TRAP: tl.constexpr):
    """Compare-and-swap addr from expect to new, retrying until it succeeds."""
    seen = tl.atomic_cas(addr, expect, new, sem="acq_rel", scope="sys")
    spins = 0
    while (seen != expect) & (spins < MAX_SPINS):
        seen = tl.atomic_cas(addr, expect, new, sem="acq_rel", scope="sys")
        spins += 1
    if CAN_TRAP:
        if spins >= MAX_SPINS:
            tl.inline_asm_elementwise("trap;", "=r,r", [spins], dtype=tl.int32, is_pure=False,
                                      pack=1)


@triton.jit
def _barrier(flag_ptrs, rank, row, phase, WORLD: tl.constexpr, MAX_ROWS_: tl.constexpr,
             MAX_SPINS: tl.constexpr, CAN_TRAP: tl.constexpr):
    tl.debug_barrier()  # every thread's earlier stores/loads come before the signals
    base = (phase * MAX_ROWS_ + row) * WORLD
    for peer in tl.static_range(WORLD):
        theirs = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
        _flip(theirs + base + rank, 0, 1, MAX_SPINS, CAN_TRAP)
    mine = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        _flip(mine + base + peer, 1, 0, MAX_SPINS, CAN_TRAP)
    tl.debug_barrier()  # ... and every thread's later loads come after them


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
    slot = row * H + cols
    mine = tl.load(buf_ptrs + rank).to(tl.pointer_type(x_ptr.dtype.element_ty))
    tl.store(mine + slot, x, mask=ok)
    _barrier(flag_ptrs, rank, row, 0, WORLD, MAX_ROWS_, MAX_SPINS, CAN_TRAP)

    total = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        theirs = tl.load(buf_ptrs + peer).to(tl.pointer_type(x_ptr.dtype.element_ty))
        total += tl.load(theirs + slot, mask=ok, other=0.0, volatile=True).to(tl.float32)
    _barrier(flag_ptrs, rank, row, 1, WORLD, MAX_ROWS_, MAX_SPINS, CAN_TRAP)

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
    and flag array (int32, 2 * MAX_ROWS * world long, zeroed before first use). Every rank must
    call it with the same shapes, in the same order.
    """
    h_dim = x.shape[-1]
    rows = x.numel() // h_dim
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if weight is not None and tuple(weight.shape) != (h_dim,):
        raise ValueError(f"weight must be [{h_dim}], got {tuple(weight.shape)}")
    if rows > MAX_ROWS or rows * h_dim > buffer_elements:
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
