"""The collectives plan steps call: `collective::all_reduce`, `collective::all_gather`,
`collective::all_reduce_residual_norm`.

A decode step of a tensor-parallel model reduces one small activation per block (8 KB for
Llama-7B at batch 1, bf16): NCCL spends 20-40 us on each, more than the GEMVs around it. So
`all_reduce` picks its transport per message:

    CUDA, sum of a float32/bfloat16 tensor of at most ONE_SHOT_MAX_BYTES, 16-byte sized and
    aligned, 2/4/8 ranks, torch symmetric memory present, multicast off
        -> symmetric memory one-shot all-reduce: every rank loads all peers' copies over NVLink
           and sums them (one kernel, with a barrier before and after; safe in CUDA graphs)
    other CUDA messages                -> NCCL
    CPU                                -> gloo

The symmetric buffer is allocated (a collective: every rank at the same step) on the first
eligible call outside a CUDA-graph capture; the eager prefill comes before any capture.
A failure (a peer died, a timeout) is raised as `CollectiveError`. Nothing here touches CUDA
unless the tensor is on a GPU.

`all_reduce_residual_norm` (h = residual + all_reduce(x), then RMSNorm of h) is one dsc kernel
(dsc/kernels/all_reduce_norm.py) under the same conditions as the one-shot path, for decode-sized
messages; otherwise it is all_reduce followed by the add and the norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dsc.kernels import all_reduce_norm
from dsc.ops.norms import rms_norm
from dsc.runtime import distributed
from dsc.runtime.executor import register_kernel_namespace

__all__ = ["ONE_SHOT_MAX_BYTES", "all_gather", "all_reduce", "all_reduce_residual_norm",
           "transport"]

ONE_SHOT_MAX_BYTES = 512 * 1024  # one-shot wins below this on NVLink; larger goes to NCCL's rings
_ONE_SHOT_DTYPES = (torch.float32, torch.bfloat16)  # what torch's one-shot kernel is built for
_ONE_SHOT_WORLDS = (2, 4, 8)

_buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}
_unavailable: set[torch.device] = set()


def _symmetric_buffer(dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """This rank's symmetric buffer for `dtype`, rendezvoused with the peers; None if impossible."""
    key = (dtype, device)
    if key in _buffers:
        return _buffers[key]
    if device in _unavailable or torch.cuda.is_current_stream_capturing():
        return None
    try:
        from torch.distributed import _symmetric_memory as symm_mem

        group = dist.group.WORLD.group_name
        buffer = symm_mem.empty(ONE_SHOT_MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group)
    except (ImportError, AttributeError, RuntimeError):
        # Every rank takes the same branch: the same torch, the same kind of GPU.
        _unavailable.add(device)
        return None
    _buffers[key] = buffer
    return buffer


def transport(x: Tensor) -> str:
    """Which transport all_reduce uses for x: 'one_shot', 'nccl' or 'gloo'."""
    if not x.is_cuda:
        return "gloo"
    nbytes = x.numel() * x.element_size()
    if (
        distributed.multicast_disabled()
        and hasattr(torch.ops, "symm_mem")
        and hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out")
        and x.dtype in _ONE_SHOT_DTYPES
        and distributed.world_size() in _ONE_SHOT_WORLDS
        and 0 < nbytes <= ONE_SHOT_MAX_BYTES
        and nbytes % 16 == 0
        and x.data_ptr() % 16 == 0
        and x.device not in _unavailable
    ):
        return "one_shot"
    return "nccl"


def _one_shot(x: Tensor) -> Tensor | None:
    buffer = _symmetric_buffer(x.dtype, x.device)
    if buffer is None:
        return None
    n = x.numel()
    group = dist.group.WORLD.group_name
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    ops = torch.ops.symm_mem
    if hasattr(ops, "one_shot_all_reduce_copy_out"):
        # The kernel copies x into this rank's buffer itself, then barriers: one launch.
        ops.one_shot_all_reduce_copy_out(buffer[:n], flat, "sum", group, out)
    else:
        buffer[:n].copy_(flat)
        ops.one_shot_all_reduce_out(buffer[:n], "sum", group, out)
    return out.view(x.shape)


def all_reduce(x: Tensor) -> Tensor:
    """Sum of x over all ranks (a new tensor)."""
    if not distributed.is_parallel():
        return x.clone()
    x = x.contiguous()
    if transport(x) == "one_shot":
        out = distributed.guarded("all_reduce (symmetric memory)", lambda: _one_shot(x))
        if out is not None:
            return out
    out = x.clone()
    distributed.guarded("all_reduce", lambda: dist.all_reduce(out))
    return out


@dataclass(frozen=True)
class _FusedBuffers:
    """Every rank's symmetric data buffer and flag array, as device pointer tables."""

    buffer_ptrs: Tensor
    flag_ptrs: Tensor
    elements: int
    keep: tuple = ()  # the arrays and handles: they must outlive every launch using the pointers


_fused: dict[tuple[torch.dtype, torch.device], _FusedBuffers] = {}


def _fused_buffers(dtype: torch.dtype, device: torch.device) -> _FusedBuffers | None:
    key = (dtype, device)
    if key in _fused:
        return _fused[key]
    if device in _unavailable or torch.cuda.is_current_stream_capturing():
        return None
    try:
        from torch.distributed import _symmetric_memory as symm_mem

        group = dist.group.WORLD.group_name
        elements = all_reduce_norm.buffer_elements()
        data = symm_mem.empty(elements, dtype=dtype, device=device)
        data_handle = symm_mem.rendezvous(data, group)
        world = distributed.world_size()
        flags = symm_mem.empty(all_reduce_norm.flag_elements(world), dtype=torch.int32,
                               device=device)
        flags.zero_()
        flag_handle = symm_mem.rendezvous(flags, group)
    except (ImportError, AttributeError, RuntimeError):
        _unavailable.add(device)  # every rank takes the same branch
        return None
    torch.cuda.synchronize(device)
    dist.barrier()  # every rank's flags are zero before anyone signals
    table = {"dtype": torch.int64, "device": device}
    buffers = _FusedBuffers(torch.tensor(data_handle.buffer_ptrs, **table),
                            torch.tensor(flag_handle.buffer_ptrs, **table), elements,
                            keep=(data, flags, data_handle, flag_handle))
    _fused[key] = buffers
    return buffers


def _fusable(x: Tensor, residual: Tensor, weight: Tensor | None) -> bool:
    h_dim = x.shape[-1] if x.dim() else 0
    return (
        x.is_cuda
        and distributed.multicast_disabled()
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and distributed.world_size() in _ONE_SHOT_WORLDS
        and residual.shape == x.shape
        and 0 < h_dim <= all_reduce_norm.MAX_HIDDEN
        and x.numel() // h_dim <= all_reduce_norm.MAX_ROWS
        and (weight is None or tuple(weight.shape) == (h_dim,))
        and x.device not in _unavailable
    )


def all_reduce_residual_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float,
                             out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(h, rms_norm(h)) with h = residual + the sum of x over all ranks."""
    if distributed.is_parallel() and _fusable(x, residual, weight):
        buffers = _fused_buffers(x.dtype, x.device)
        if buffers is not None:
            return distributed.guarded(
                "all_reduce + residual + RMSNorm (symmetric memory)",
                lambda: all_reduce_norm.all_reduce_residual_rms_norm(
                    x, residual, weight, eps, out_dtype, rank=distributed.rank(),
                    world=distributed.world_size(), buffer_ptrs=buffers.buffer_ptrs,
                    flag_ptrs=buffers.flag_ptrs, buffer_elements=buffers.elements,
                ),
            )
    h = residual + all_reduce(x)
    return h, rms_norm(h, weight, eps, out_dtype)


def all_gather(x: Tensor, dim: int) -> Tensor:
    """Every rank's x concatenated along dim, in rank order."""
    world = distributed.world_size()
    if world == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(world)]
    distributed.guarded("all_gather", lambda: dist.all_gather(parts, x.contiguous()))
    return torch.cat(parts, dim=dim)


_IMPLEMENTATIONS: dict[str, Callable] = {
    "all_reduce": all_reduce,
    "all_gather": all_gather,
    "all_reduce_residual_norm": all_reduce_residual_norm,
}


def _resolve(name: str) -> Callable:
    from dsc.errors import PlanError

    if name not in _IMPLEMENTATIONS:
        raise PlanError(f"plan step op collective::{name} does not exist in this dsc")
    return _IMPLEMENTATIONS[name]


register_kernel_namespace("collective", _resolve)
