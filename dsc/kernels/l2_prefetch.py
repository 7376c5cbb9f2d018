"""Pull a weight toward L2 from a kernel that reads little itself.

A decode step at batch 1 alternates weight streams (the GEMVs, at copy bandwidth) with kernels
that read almost nothing from memory (decode attention over a short cache: a few hundred KB in
~5 µs). While those run, HBM idles. A kernel of the second kind can ask L2 for the weight the
next GEMV will stream (`prefetch.global.L2`, one request per 128-byte line, no registers, no
wait); the GEMV then finds those lines in L2. The requests never change a result: a line evicted
before it is read is simply read from memory again.

`weight_lines` picks which lines (the first `lines` of each row, within a byte budget: the
GEMV's programs each stream whole rows from their start, so every program gets the same head
start); `prefetch` is the device side: program p of P requests its contiguous 1/P of them, one
128-byte line a request, or (DSC_PREFETCH_BULK=1, a whole contiguous weight) 32 KB bulk requests
(`cp.async.bulk.prefetch.L2`, Hopper) that take one instruction each.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import pdl

__all__ = [
    "LINE_BYTES", "WeightLines", "budget_bytes", "bulk_bytes", "interpreting", "launch_args",
    "prefetch", "prefetch_share", "prefetch_span_bulk", "weight_lines",
]

LINE_BYTES = 128


class WeightLines(NamedTuple):
    """Lines 0..lines-1 (LINE_BYTES each) of rows 0..rows-1, row r starting stride_row
    elements after row 0."""

    weight: Tensor
    rows: int
    lines: int
    stride_row: int
    line_elems: int


def budget_bytes() -> int:
    """Bytes of a weight one kernel prefetches at most (DSC_PREFETCH_MB, default 16: a third of
    an H100's or H200's L2, so the lines survive until the GEMV after it reads them)."""
    value = os.environ.get("DSC_PREFETCH_MB", "16")
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"DSC_PREFETCH_MB={value!r}: expected a number of megabytes") from None
    return int(mb * 2**20)


def weight_lines(weight: Tensor, budget: int | None = None) -> WeightLines | None:
    """The lines of `weight` ([N, K] or more leading dims, K contiguous) to request within
    `budget` bytes (default `budget_bytes()`): every row's first ones. None when nothing fits
    or the rows are not contiguous."""
    budget = budget_bytes() if budget is None else budget
    if weight.dim() < 2 or weight.stride(-1) != 1:
        return None
    rows = weight.numel() // weight.shape[-1]
    if weight.dim() > 2 and not weight.is_contiguous():
        return None
    line_elems = LINE_BYTES // weight.element_size()
    per_row = triton.cdiv(weight.shape[-1], line_elems)
    lines = min(per_row, budget // (rows * LINE_BYTES))
    if lines < 1:
        return None
    return WeightLines(weight, rows, lines, weight.stride(-2), line_elems)


@triton.jit
def prefetch_share(w_ptr, rows, lines, stride_row, program, programs,
                   LINE_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    """Request this program's contiguous share of the rows x lines grid of lines."""
    total = rows * lines
    per = tl.cdiv(total, programs)
    lo = program * per
    hi = tl.minimum(lo + per, total)
    for base in range(lo, hi, BLOCK):
        idx = tl.minimum(base + tl.arange(0, BLOCK), hi - 1)
        row = idx // lines
        col = (idx - row * lines) * LINE_ELEMS
        pdl.prefetch_l2(w_ptr + row.to(tl.int64) * stride_row + col)


@triton.jit
def _bulk_prefetch(ptr, nbytes):
    """One bulk request for nbytes (a multiple of 16) from ptr (16-byte aligned), issued by the
    program's first thread only (every thread runs the instruction stream)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_span_bulk(w_ptr, total_bytes, program, programs, CHUNK: tl.constexpr):
    """Bulk-prefetch this program's contiguous share of bytes [0, total_bytes) of a contiguous
    weight (total_bytes a multiple of 16), CHUNK bytes a request."""
    per = tl.cdiv(tl.cdiv(total_bytes, programs), 16) * 16
    lo = program * per
    hi = tl.minimum(lo + per, total_bytes)
    base = w_ptr.to(tl.pointer_type(tl.int8))
    for off in range(lo, hi, CHUNK):
        _bulk_prefetch(base + off, tl.minimum(hi - off, CHUNK))


def interpreting() -> bool:
    """The Triton interpreter runs no inline PTX: kernels skip their prefetches under it."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def bulk_bytes(lines: WeightLines) -> int:
    """The weight's bytes when the lines cover all of it as one aligned span (whole rows of a
    contiguous weight), for bulk requests (DSC_PREFETCH_BULK=1); else 0: line by line."""
    w = lines.weight
    nbytes = w.numel() * w.element_size()
    whole = lines.lines * lines.line_elems >= w.shape[-1] and w.is_contiguous()
    if os.environ.get("DSC_PREFETCH_BULK", "0") != "1" or not whole:
        return 0
    return nbytes if nbytes % 16 == 0 and w.data_ptr() % 16 == 0 else 0


def launch_args(lines: WeightLines | None, like: Tensor) -> dict:
    """The decode kernels' prefetch arguments: a placeholder pointer and PREFETCH_W=False when
    there is nothing to request (or no GPU to request it on)."""
    if lines is None or interpreting() or not like.is_cuda:
        return {"pf_ptr": like, "pf_rows": 0, "pf_lines": 0, "pf_stride": 0, "pf_bytes": 0,
                "PREFETCH_W": False, "PF_LINE_ELEMS": 1}
    return {"pf_ptr": lines.weight, "pf_rows": lines.rows, "pf_lines": lines.lines,
            "pf_stride": lines.stride_row, "pf_bytes": bulk_bytes(lines), "PREFETCH_W": True,
            "PF_LINE_ELEMS": lines.line_elems}


@triton.jit
def prefetch(pf_ptr, pf_rows, pf_lines, pf_stride, pf_bytes, program, programs,
             PF_LINE_ELEMS: tl.constexpr):
    """This program's share of a weight (the `launch_args` it was given): in bulk requests when
    pf_bytes > 0, else line by line."""
    if pf_bytes > 0:
        prefetch_span_bulk(pf_ptr, pf_bytes, program, programs, 32768)
    else:
        prefetch_share(pf_ptr, pf_rows, pf_lines, pf_stride, program, programs, PF_LINE_ELEMS,
                       256)
