"""Programmatic dependent launch (PDL): start the next kernel while this one finishes.

A decode step is a chain of ~9 short kernels per layer, each a few microseconds long, and on a
Hopper GPU every boundary costs 1–3 µs: the kernel drains, the next is launched, its programs
are placed on the SMs and wait for their first loads. PDL lets a kernel's programs be placed
while its predecessor still runs. The protocol, in every kernel of the chain:

1. work that reads nothing an earlier kernel wrote (prefetching a weight into L2) may run first;
2. `wait` (`griddepcontrol.wait`) blocks until the predecessor grid has completed and its
   writes are visible — it is the kernel boundary, moved inside the kernel;
3. `release` (`griddepcontrol.launch_dependents`) then lets the *next* kernel be placed.

Kernels of a few microseconds (norms, rotary, attention, generated regions) release first and
then wait: the next kernel — usually a GEMV, which prefetches its first weight tiles into L2
while placed — then overlaps their whole run, when device memory is mostly idle. The GEMV waits
before it releases, which bounds the kernels resident at once: the chain of early placements
ends at each GEMV. Every program calls `wait` unconditionally before anything that reads or
writes activations: a kernel then cannot complete before its predecessor has, so the usual
stream order holds transitively down the chain, for kernels launched the ordinary way too.
`DSC_PDL=1` makes every kernel wait first (the cautious order); `DSC_PDL=0` turns PDL off.

Launched without the PDL attribute (torch kernels, the interpreter, a GPU before Hopper) the
instructions are never emitted (`USE_PDL`, the mode, is a compile-time constant).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["enabled", "launch_options", "mode", "prefetch_l2", "release_and_wait", "wait_and_release"]


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def mode(device: torch.device) -> int:
    """0: no PDL (not a CUDA GPU of compute capability 9.0 or newer, the Triton interpreter, or
    DSC_PDL=0); 1: every kernel waits, then releases (DSC_PDL=1); 2, the default: short kernels
    release first, so the next kernel — a GEMV prefetching its weights — is placed while they
    run."""
    setting = os.environ.get("DSC_PDL", "2")
    if device.type != "cuda" or setting == "0":
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return 0
    if not _hopper_or_newer(device.index if device.index is not None else 0):
        return 0
    return 1 if setting == "1" else 2


def enabled(device: torch.device) -> bool:
    """Whether kernels on this device are launched with PDL."""
    return mode(device) != 0


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a Triton launch: `USE_PDL` (the mode) for the kernel, and the launch
    attribute when it is on."""
    use = mode(device)
    return {"USE_PDL": use, "launch_pdl": True} if use else {"USE_PDL": 0}


@triton.jit
def wait_and_release(USE_PDL: tl.constexpr):
    """Wait for the previous kernel of the stream, then let the next one be placed."""
    if USE_PDL != 0:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def release_and_wait(USE_PDL: tl.constexpr):
    """For kernels of a few microseconds: in mode 2 let the next kernel be placed at once, then
    wait for the previous one; in mode 1 the other way round."""
    if USE_PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif USE_PDL == 1:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the cache lines at ptrs to be brought into L2 (no registers, no wait)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
