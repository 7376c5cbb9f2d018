"""Argument checks and device facts every kernel launcher shares."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import triton
from torch import Tensor

__all__ = ["check_alibi", "check_device", "check_out", "check_ring", "check_sinks", "check_window",
           "sm_count"]


def check_device(*tensors: Tensor) -> None:
    """All tensors on one device, and that device a GPU unless the Triton interpreter is on."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device; got {t.device} and {device}")
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(
            f"tensors are on {device}, but this kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run it on the CPU interpreter)"
        )


def check_out(out: Tensor, shape: tuple[int, ...], like: Tensor, name: str = "out") -> None:
    """A caller-given output must have the result's shape, like's dtype and like's device."""
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be {tuple(shape)} {like.dtype} on {like.device}; "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


@functools.cache
def sm_count(device: torch.device) -> int:
    """SMs of the GPU; 4 under the interpreter, which keeps the tests' grids small."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use (an H100's 227 KB under the interpreter)."""
    if device.type != "cuda":
        return 232448
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def check_window(window: int, causal: bool) -> None:
    """Raise ValueError unless `window` is 0 (none) or a positive window of causal attention."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"window must be 0 (no window) or a positive number of slots; got "
                         f"{window!r}")
    if window and not causal:
        raise ValueError("a sliding window needs causal attention (a query sees the window - 1 "
                         "slots before it); pass causal=True or window=0")


def check_alibi(alibi: Sequence[float] | Tensor | None, heads: int, causal: bool) -> None:
    """Raise ValueError unless `alibi` is None or one finite slope (a sequence of floats or a
    1-D tensor) per query head of causal attention."""
    if alibi is None:
        return
    count = alibi.numel() if isinstance(alibi, Tensor) else len(alibi)
    if count != heads or (isinstance(alibi, Tensor) and alibi.dim() != 1):
        raise ValueError(f"alibi needs one slope per query head: {heads}, got {count}")
    if not causal:
        raise ValueError("alibi slopes need causal attention (the bias is the distance back to "
                         "the key); pass causal=True or alibi=None")
    # A tensor's values are not read here: that would synchronise with the device.
    if not isinstance(alibi, Tensor) and not all(math.isfinite(a) for a in alibi):
        raise ValueError("alibi slopes must be finite")


def check_sinks(sinks: Tensor | None, heads: int) -> None:
    """Raise ValueError unless `sinks` is None or a 1-D floating tensor of one logit per query
    head (attention sinks)."""
    if sinks is None:
        return
    if sinks.dim() != 1 or sinks.shape[0] != heads or not sinks.is_floating_point():
        raise ValueError(f"sinks needs one floating-point logit per query head: [{heads}], got "
                         f"{tuple(sinks.shape)} {sinks.dtype}")


def check_ring(ring: int, window: int, causal: bool) -> None:
    """Raise ValueError unless a ring cache of `ring` slots (fewer than the sequence's
    positions) can serve causal attention within `window`: it keeps only the last `ring`."""
    if not window or not causal or window > ring:
        raise ValueError(
            f"a cache of {ring} slots (fewer than the sequence's) needs causal attention within "
            f"a sliding window of at most {ring} slots; got window={window}, causal={causal}"
        )
