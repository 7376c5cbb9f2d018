"""Programmatic dependent launch (PDL): start the next kernel while this one finishes.

A decode step is a chain of ~9 short kernels per layer, each a few microseconds long, and every
boundary costs time: the kernel drains, the next is launched, its programs are placed on the SMs
and wait for their first loads. PDL lets a kernel's programs be placed while its predecessor
still runs. Measured on an H100 inside a CUDA graph (bench/pdl_chain.py): an empty boundary
0.9–1.2 µs, with PDL 0.6–0.9 µs; a Llama-1.1B decode step 1.24 → 1.08 ms (bench/NOTES.md, run 15).
The protocol, in every kernel of the chain:

1. work that reads nothing an earlier kernel wrote (prefetching a weight into L2) may run first;
2. `wait` (`griddepcontrol.wait`) blocks until the predecessor grid has completed and its
   writes are visible — it is the kernel boundary, moved inside the kernel;
3. `release` (`griddepcontrol.launch_dependents`) then lets the *next* kernel be placed.

Releasing only after waiting keeps at most two kernels of the chain resident at a time (one
working, one waiting). Releasing first in the short kernels, so that a GEMV would be placed two
kernels early and prefetch more of its weight, measured slower (run 17). Every program calls
`wait` unconditionally before anything else that reads or writes activations: a kernel then
cannot complete before its predecessor has, so the usual stream order holds transitively down
the chain, for kernels that were launched the ordinary way too.

Launched without the PDL attribute (torch kernels, the interpreter, a GPU before Hopper) the
instructions are never emitted (`USE_PDL` is a compile-time constant). `DSC_PDL=0` turns the
whole mechanism off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = [
    "enabled", "gemv_options", "gemv_release_late", "launch_options", "prefetch_l2", "prefetch_weights", "release",
    "wait", "wait_and_release",
]


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Use PDL on this device: a CUDA GPU of compute capability 9.0 or newer, not the Triton
    interpreter, and DSC_PDL not set to 0."""
    if device.type != "cuda" or os.environ.get("DSC_PDL", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _hopper_or_newer(device.index if device.index is not None else 0)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a Triton launch: `USE_PDL` for the kernel, and the launch attribute
    when it is on."""
    if enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


def gemv_options(device: torch.device) -> dict:
    """`launch_options` for the small-batch GEMM and its split-K reduce. DSC_PDL_GEMV picks the
    GEMV's variant: `late` (default; see `gemv_release_late`), `early` (waits and releases
    first, like every other kernel), `0` (launched without PDL; the kernels around it keep
    theirs)."""
    if _gemv_mode() == "0":
        return {"USE_PDL": False}
    return launch_options(device)


def gemv_release_late() -> bool:
    """The GEMV waits first but lets the next kernel be placed only once its weight stream is
    done, so nothing placed early competes with the stream. Measured on H100s against
    releasing first (bench/NOTES.md, tp runs 9-11, e2e run 22; CUDA-graph stream times):
    Llama-7B 5.154 -> 5.010 ms at batch 1 (5.960 -> 5.979 at 16), tp=2 3.125 -> 3.022,
    tp=4 1.978 -> 1.936, GPT-2 XL 1.902 -> 1.874; Llama-1.1B 1.055 -> 1.068."""
    return _gemv_mode() == "late"


def _gemv_mode() -> str:
    mode = os.environ.get("DSC_PDL_GEMV", "late")
    if mode not in ("late", "early", "0", "1"):
        raise ValueError(f"DSC_PDL_GEMV={mode!r}: expected late (default), early or 0")
    return "early" if mode == "1" else mode


def prefetch_weights() -> bool:
    """Whether a GEMV placed early prefetches its first weight tiles (DSC_PDL_PREFETCH=0: no)."""
    return os.environ.get("DSC_PDL_PREFETCH", "1") != "0"


@triton.jit
def wait_and_release(USE_PDL: tl.constexpr):
    """Wait for the previous kernel of the stream, then let the next one be placed."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def wait(USE_PDL: tl.constexpr):
    """Wait for the previous kernel of the stream (its writes are then visible)."""
    if USE_PDL:
        gdc_wait()


@triton.jit
def release(USE_PDL: tl.constexpr):
    """Let the next kernel of the stream be placed (it still waits for this one's writes)."""
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the cache lines at ptrs to be brought into L2 (no registers, no wait)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
