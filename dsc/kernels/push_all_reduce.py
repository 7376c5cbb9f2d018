"""Small all-reduce by pushing flagged words to the peers, optionally fused with the residual add
and RMSNorm that follow it in a tensor-parallel block; and all-gather by the same transport.

At batch 1 a decode step all-reduces one [1, hidden] activation per block: a few KB, so the time
is latency. A barrier-then-read all-reduce pays two NVLink round trips (signal and wait, then
load the peers' copies) on top of the launch; torch's one-shot kernel measured 8.9 µs at tp=2 and
10.2 µs at tp=4 in a CUDA graph (bench/NOTES.md). Here every rank *writes* its partial into
every peer's receive buffer and then only reads local memory — one one-way trip:

1. each 32-bit word of this rank's partial (two bf16/fp16 elements, or one fp32) is stored with
   the call's sequence number in the high half of a 64-bit word. An aligned 64-bit store lands
   whole, so a receiver that sees the sequence number sees the data: no flag, no barrier;
2. the word goes to slot [half][row][source rank] of every rank's buffer (this one too);
3. each program (one chunk of a row's words) spins on its own buffer until its words from every
   rank carry this call's sequence number, sums the ranks in rank order in fp32 (every rank
   gets identical bits), and rounds to x's dtype as the all-reduce would;
4. fused, it adds the residual and rounds h; the norm needs the whole row's sum of squares, so
   each program stores its chunk's share, the row's programs meet at a barrier (below), and
   each adds the shares in chunk order and normalises its chunk — the roundings of the three
   ops it replaces, the squares summed in another order;
5. gathering, it stores each rank's words side by side instead of summing them (the decode
   step's vocab-parallel logits);
6. receiving only (`receive_sum`), steps 1-2 were done by the kernel that computed the partial:
   the small-batch GEMM's push epilogue packs its output tile with `pack_words` and sends it
   with `send_words`, so each tile's words are on their way while the GEMM's other programs
   still stream weights, and no kernel re-reads the partial to send it. Measured slower than
   the GEMM then this kernel (opt-in, DSC_GEMV_PUSH=1; bench/NOTES.md, tp run 8).

Halves: a row's k-th call writes half k % 2. A peer can write this half again only in its
call k+2, which comes after its call k+1 received our call k+1 words, which we sent after our
call k had finished reading (a kernel starts after the previous one on its stream has ended;
under PDL, after `wait`). So two halves suffice, and nothing is ever reset.

Measured on 4 H100s in a CUDA graph, [1, 4096] bf16: 3.0–3.3 µs at tp=2, 4.0–4.5 at tp=4
(bench/NOTES.md, tp runs 4–7).

State (int32, local to each rank): per-row call counts, per-row tickets, per-row partial sums
of squares. Each program of a row reads the count, pushes, and takes a ticket; the last program
of the row advances the count (fused, the others wait for that: the barrier). The count lives
on the GPU, so it advances under CUDA-graph replay too; every rank makes the same calls, so
counts, halves and sequence numbers agree. A kernel that sends for `receive_sum` reads the
count after its `wait`, so the previous call's receive has advanced it. A peer that never
writes stops the kernel with a trap after MAX_SPINS tries, so the host sees a CUDA error
instead of hanging.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import pdl

__all__ = [
    "MAX_ROWS", "MAX_ROW_WORDS", "buffer_words", "fits", "fits_shape", "pack_words",
    "push_all_gather", "push_all_reduce", "push_all_reduce_residual",
    "push_all_reduce_residual_norm", "receive_sum", "send_words", "sequence_and_half",
    "state_elements",
]

MAX_ROWS = 32  # rows (tokens) per call: decode steps; larger messages take another transport
MAX_ROW_WORDS = 8192  # 32-bit words per row: hidden 16384 in bf16/fp16, 8192 in fp32
MAX_SPINS = 1 << 24
CHUNK_WORDS = 256  # words one program pushes: spreads a row's NVLink stores over several SMs
MAX_CHUNKS = 64  # programs a row: the fused norm adds one partial sum of squares from each


def buffer_words(world: int) -> int:
    """Length of each rank's symmetric int64 receive buffer: two halves of MAX_ROWS rows of one
    MAX_ROW_WORDS slot per source rank."""
    return 2 * MAX_ROWS * world * MAX_ROW_WORDS


def state_elements() -> int:
    """Length of each rank's int32 state: per-row call counts, per-row tickets, then per-row
    partial sums of squares (fp32 bits) for the fused norm."""
    return 2 * MAX_ROWS + MAX_ROWS * MAX_CHUNKS


def fits(x: Tensor) -> bool:
    """Whether x's rows fit the buffers (see `fits_shape`)."""
    return fits_shape(tuple(x.shape), x.dtype)


def fits_shape(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether rows of this shape and dtype fit the buffers: at most MAX_ROWS rows of a last
    dimension that packs into whole 32-bit words, at most MAX_ROW_WORDS of them."""
    if len(shape) == 0 or dtype not in _TL_DTYPES or shape[-1] == 0:
        return False
    row_bytes = shape[-1] * dtype.itemsize
    return (row_bytes % 4 == 0 and row_bytes // 4 <= MAX_ROW_WORDS
            and math.prod(shape) // shape[-1] <= MAX_ROWS)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _half_to_float(bits, DTYPE: tl.constexpr):
    """The low 16 bits of int32 `bits` as a 16-bit float of DTYPE, widened to fp32."""
    return bits.to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)


@triton.jit
def sequence_and_half(count):
    """The sequence number and buffer half of a row's call number `count`. Bit 30 set: never the
    zero of a fresh buffer; consecutive calls differ in the low bits."""
    return (count & 0x3FFFFFFF) | 0x40000000, count & 1


@triton.jit
def send_words(buf_ptrs, rank, rows, half, seq, words, at, mask, WORLD: tl.constexpr,
               MAX_ROWS_: tl.constexpr, ROW_WORDS: tl.constexpr):
    """Store int32 `words` (of rows `rows`, word indices `at`; all broadcastable) with `seq` in
    the high half into this rank's slot of every rank's buffer, this rank's own included."""
    flagged = (seq.to(tl.int64) << 32) | (words.to(tl.int64) & 0xFFFFFFFF)
    slot = ((half * MAX_ROWS_ + rows) * WORLD + rank).to(tl.int64) * ROW_WORDS + at
    for dst in tl.static_range(WORLD):
        theirs = tl.load(buf_ptrs + dst).to(tl.pointer_type(tl.int64))
        tl.store(theirs + slot, flagged, mask=mask)


@triton.jit
def pack_words(values, PACK: tl.constexpr):
    """[R, C] float values as [R, C // PACK] int32 words: fp32 bits (PACK 1), or two 16-bit
    floats a word, element 2i in the low half (PACK 2) — the layout of the row in memory."""
    if PACK == 1:
        return values.to(tl.int32, bitcast=True)
    else:
        bits = values.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        lo, hi = tl.split(tl.reshape(bits, (values.shape[0], values.shape[1] // 2, 2)))
        return lo | (hi << 16)


@triton.jit
def _trap_if(stuck):
    if stuck:
        # A one-element block: inline assembly takes blocks, not scalars.
        tl.inline_asm_elementwise("trap;", "=r,r", [tl.full((1,), 0, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _receive(at, in_row, seq, max_spins, CAN_TRAP: tl.constexpr):
    """The data halves of the words at `at`, once every one of them carries `seq`."""
    got = tl.load(at, mask=in_row, other=0, volatile=True)
    spins = 0
    while (tl.sum((in_row & ((got >> 32).to(tl.int32) != seq)).to(tl.int32), axis=0) > 0) \
            & (spins < max_spins):
        got = tl.load(at, mask=in_row, other=0, volatile=True)
        spins += 1
    if CAN_TRAP:
        _trap_if(spins >= max_spins)
    return got.to(tl.int32)


@triton.jit
def _push_all_reduce_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    n_ptr,
    buf_ptrs,
    state_ptr,
    rank,
    H,
    W,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_n,
    max_spins,
    WORLD: tl.constexpr,
    PACK: tl.constexpr,
    GATHER: tl.constexpr,
    FUSE_NORM: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    PRODUCT: tl.constexpr,
    CHUNK_W: tl.constexpr,
    MAX_ROWS_: tl.constexpr,
    MAX_CHUNKS_: tl.constexpr,
    ROW_WORDS: tl.constexpr,
    CAN_TRAP: tl.constexpr,
    RECEIVE_ONLY: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait_and_release(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty

    # This row's call count picks the half and the sequence number.
    count = tl.load(state_ptr + row, volatile=True)
    seq, half = sequence_and_half(count)

    words = chunk * CHUNK_W + tl.arange(0, CHUNK_W)
    in_row = words < W
    cols = chunk * CHUNK_W * PACK + tl.arange(0, CHUNK_W * PACK)
    ok = cols < H
    if FUSE_NORM or ADD_RESIDUAL:
        # Issued now, needed after the peers' words: its latency hides behind the wait for them.
        res = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    if not RECEIVE_ONLY:
        x_words = x_ptr.to(tl.pointer_type(tl.int32)) + row * (stride_x // PACK)
        mine = tl.load(x_words + words, mask=in_row, other=0)
        send_words(buf_ptrs, rank, row, half, seq, mine, words, in_row, WORLD, MAX_ROWS_,
                   ROW_WORDS)
    row_slot = (half * MAX_ROWS_ + row) * WORLD

    chunks = tl.num_programs(1)
    if not FUSE_NORM:
        # Early, so the ticket's round trip overlaps the wait for the peers' words.
        _advance_count(state_ptr, row, count, chunks, max_spins, False, MAX_ROWS_, CAN_TRAP)

    # This chunk's words from every rank: placed side by side (gather), or summed in rank order.
    received = tl.load(buf_ptrs + rank).to(tl.pointer_type(tl.int64))
    lo = tl.zeros((CHUNK_W,), dtype=tl.float32)
    hi = tl.zeros((CHUNK_W,), dtype=tl.float32)
    for src in tl.static_range(WORLD):
        bits = _receive(received + (row_slot + src) * ROW_WORDS + words, in_row, seq, max_spins,
                        CAN_TRAP)
        if GATHER:
            out_words = out_ptr.to(tl.pointer_type(tl.int32)) + row * (stride_o // PACK)
            tl.store(out_words + src * W + words, bits, mask=in_row)
        elif PACK == 2:
            lo += _half_to_float(bits, dtype)
            hi += _half_to_float(bits >> 16, dtype)
        else:
            lo += bits.to(tl.float32, bitcast=True)
    if GATHER:
        return
    if PACK == 2:
        total = tl.reshape(tl.join(lo, hi), (2 * CHUNK_W,))  # elements 2i, 2i+1
    else:
        total = lo
    reduced = total.to(dtype)

    if not FUSE_NORM and not ADD_RESIDUAL:
        tl.store(out_ptr + row * stride_o + cols, reduced, mask=ok)
    elif not FUSE_NORM:
        # The residual add alone (the next norm is applied by the GEMM that reads h).
        tl.store(out_ptr + row * stride_o + cols,
                 (res + reduced.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)
    else:
        h = (res + reduced.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_o + cols, h, mask=ok)
        hf = tl.where(ok, h.to(tl.float32), 0.0)
        # The row's sum of squares: each program's share, added in chunk order once all are in
        # (the same order on every rank, so every rank normalises alike).
        partials = state_ptr.to(tl.pointer_type(tl.float32)) + 2 * MAX_ROWS_ + row * MAX_CHUNKS_
        tl.store(partials + chunk, tl.sum(hf * hf, axis=0))
        _advance_count(state_ptr, row, count, chunks, max_spins, True, MAX_ROWS_, CAN_TRAP)
        k = tl.arange(0, MAX_CHUNKS_)
        squares = tl.sum(tl.load(partials + k, mask=k < chunks, other=0.0, volatile=True), axis=0)
        rstd = tl.rsqrt(squares / H + eps)
        normed = (hf * rstd).to(out_ptr.dtype.element_ty)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=ok, other=0.0)
            normed = (w.to(tl.float32) * normed.to(tl.float32)).to(PRODUCT)
        tl.store(n_ptr + row * stride_n + cols, normed.to(n_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _advance_count(state_ptr, row, count, chunks, max_spins, WAIT: tl.constexpr,
                   MAX_ROWS_: tl.constexpr, CAN_TRAP: tl.constexpr):
    """Advance the row's call count once every program of the row has read it (and written
    whatever it wrote before: the ticket orders it). WAIT: also hold every program until then
    — a barrier across the row's programs."""
    if chunks == 1:
        tl.store(state_ptr + row, count + 1)
    else:
        tl.debug_barrier()  # every thread's stores come before the ticket
        ticket = tl.atomic_add(state_ptr + MAX_ROWS_ + row, 1, sem="acq_rel", scope="gpu")
        if ticket == chunks - 1:
            tl.store(state_ptr + MAX_ROWS_ + row, 0)
            tl.atomic_xchg(state_ptr + row, count + 1, sem="release", scope="gpu")
        if WAIT:
            spins = 0
            while (tl.atomic_add(state_ptr + row, 0, sem="acquire", scope="gpu") == count) \
                    & (spins < max_spins):
                spins += 1
            if CAN_TRAP:
                _trap_if(spins >= max_spins)
            tl.debug_barrier()  # ... and every thread's loads after the wait


def _launch(x2: Tensor, res2: Tensor | None, weight: Tensor | None, out: Tensor,
            normed: Tensor | None, eps: float, product: torch.dtype, *, rank: int, world: int,
            buffer_ptrs: Tensor, state: Tensor, chunk_words: int | None,
            gather: bool = False, receive_only: bool = False) -> None:
    rows, h_dim = x2.shape
    pack = 4 // x2.element_size()
    n_words = h_dim // pack
    # Small enough to spread the row over several SMs, large enough for at most MAX_CHUNKS.
    chunk = max(triton.next_power_of_2(chunk_words or CHUNK_WORDS),
                triton.next_power_of_2(triton.cdiv(n_words, MAX_CHUNKS)))
    chunk = min(chunk, triton.next_power_of_2(n_words))
    interpreted = not x2.is_cuda
    fused = normed is not None  # residual + RMSNorm; a residual without `normed`: the add alone
    has_res = res2 is not None
    _push_all_reduce_kernel[(rows, triton.cdiv(n_words, chunk))](
        x2, res2 if has_res else x2, weight if weight is not None else x2, out,
        normed if fused else out, buffer_ptrs, state, rank, h_dim, n_words, float(eps),
        x2.stride(0), res2.stride(0) if has_res else 0, out.stride(0),
        normed.stride(0) if fused else 0,
        # The interpreter runs one program at a time: a missing word there is a test's bug,
        # so give up soon and let the comparison fail.
        64 if interpreted else MAX_SPINS,
        WORLD=world,
        PACK=pack,
        GATHER=gather,
        FUSE_NORM=fused,
        ADD_RESIDUAL=has_res and not fused,
        HAS_WEIGHT=weight is not None,
        PRODUCT=_TL_DTYPES[product],
        CHUNK_W=chunk,
        MAX_ROWS_=MAX_ROWS,
        MAX_CHUNKS_=MAX_CHUNKS,
        ROW_WORDS=MAX_ROW_WORDS,
        CAN_TRAP=not interpreted,
        RECEIVE_ONLY=receive_only,
        num_warps=4 if chunk * pack <= 4096 else 8,
        **pdl.launch_options(x2.device),
    )


def _rows(x: Tensor) -> Tensor:
    if not fits(x):
        raise ValueError(f"{tuple(x.shape)} {x.dtype} does not fit the push all-reduce: at most "
                         f"{MAX_ROWS} rows of at most {MAX_ROW_WORDS} 32-bit words "
                         f"(float32/bfloat16/float16); use another transport")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.data_ptr() % 4:
        x2 = x2.clone()  # rows are read as 32-bit words
    return x2


def push_all_reduce(x: Tensor, *, rank: int, world: int, buffer_ptrs: Tensor, state: Tensor,
                    chunk_words: int | None = None) -> Tensor:
    """The sum of x over all ranks (a new tensor of x's shape and dtype).

    buffer_ptrs: int64 device tensor [world] with every rank's symmetric int64 receive buffer
    (buffer_words(world) long, zeroed before first use); state: this rank's int32 tensor of
    state_elements(), zeroed before first use. Every rank makes the same calls with the same
    shapes, in the same order.
    """
    x2 = _rows(x)
    out = torch.empty_like(x2)
    _launch(x2, None, None, out, None, 0.0, x2.dtype, rank=rank, world=world,
            buffer_ptrs=buffer_ptrs, state=state, chunk_words=chunk_words)
    return out.view(x.shape)


def receive_sum(shape: tuple[int, ...], dtype: torch.dtype, *, rank: int, world: int,
                buffer_ptrs: Tensor, state: Tensor, chunk_words: int | None = None) -> Tensor:
    """The sum over all ranks of partials they have already sent with `send_words` (the
    small-batch GEMM's push epilogue, `small_batch_gemm.linear_push_partial`) for this call:
    push_all_reduce without its own sending. A new tensor of `shape` and `dtype`; buffers and
    state as for push_all_reduce (the two share them)."""
    out = torch.empty(shape, device=buffer_ptrs.device, dtype=dtype)
    out2 = _rows(out)
    _launch(out2, None, None, out2, None, 0.0, dtype, rank=rank, world=world,
            buffer_ptrs=buffer_ptrs, state=state, chunk_words=chunk_words, receive_only=True)
    return out


def push_all_gather(x: Tensor, *, rank: int, world: int, buffer_ptrs: Tensor, state: Tensor,
                    chunk_words: int | None = None) -> Tensor:
    """Every rank's x concatenated along the last dimension, in rank order; buffers and state
    as for push_all_reduce (the two share them)."""
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], world * x2.shape[1]), device=x.device, dtype=x.dtype)
    _launch(x2, None, None, out, None, 0.0, x2.dtype, rank=rank, world=world,
            buffer_ptrs=buffer_ptrs, state=state, chunk_words=chunk_words, gather=True)
    return out.view(*x.shape[:-1], world * x.shape[-1])


def push_all_reduce_residual(
    x: Tensor, residual: Tensor, *, rank: int, world: int, buffer_ptrs: Tensor, state: Tensor,
    chunk_words: int | None = None,
) -> Tensor:
    """h = residual + the sum of x over all ranks (rounded to x's dtype before the add, as the
    two ops round), in the promoted dtype; buffers and state as for push_all_reduce."""
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    x2 = _rows(x)
    r2 = residual.reshape(x2.shape).contiguous()
    h = torch.empty(x2.shape, device=x.device, dtype=torch.promote_types(x.dtype, residual.dtype))
    _launch(x2, r2, None, h, None, 0.0, h.dtype, rank=rank, world=world,
            buffer_ptrs=buffer_ptrs, state=state, chunk_words=chunk_words)
    return h.view(x.shape)


def push_all_reduce_residual_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype, *,
    rank: int, world: int, buffer_ptrs: Tensor, state: Tensor, chunk_words: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(h, rms_norm(h)) with h = residual + the sum of x over all ranks; buffers and state as
    for push_all_reduce (the two share them)."""
    h_dim = x.shape[-1]
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if weight is not None and tuple(weight.shape) != (h_dim,):
        raise ValueError(f"weight must be [{h_dim}], got {tuple(weight.shape)}")
    x2 = _rows(x)
    r2 = residual.reshape(x2.shape).contiguous()
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    h = torch.empty(x2.shape, device=x.device, dtype=h_dtype)
    normed = torch.empty(x2.shape, device=x.device, dtype=out_dtype)
    product = torch.promote_types(weight.dtype, h_dtype) if weight is not None else h_dtype
    _launch(x2, r2, weight, h, normed, eps, product, rank=rank, world=world,
            buffer_ptrs=buffer_ptrs, state=state, chunk_words=chunk_words)
    return h.view(x.shape), normed.view(x.shape)
