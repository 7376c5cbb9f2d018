"""The collectives plan steps call: `collective::all_reduce`, `collective::all_gather`.

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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from dsc.runtime import distributed
from dsc.runtime.executor import register_kernel_namespace

__all__ = ["ONE_SHOT_MAX_BYTES", "all_gather", "all_reduce", "transport"]

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


def all_gather(x: Tensor, dim: int) -> Tensor:
    """Every rank's x concatenated along dim, in rank order."""
    world = distributed.world_size()
    if world == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(world)]
    distributed.guarded("all_gather", lambda: dist.all_gather(parts, x.contiguous()))
    return torch.cat(parts, dim=dim)


_IMPLEMENTATIONS: dict[str, Callable] = {"all_reduce": all_reduce, "all_gather": all_gather}


def _resolve(name: str) -> Callable:
    from dsc.errors import PlanError

    if name not in _IMPLEMENTATIONS:
        raise PlanError(f"plan step op collective::{name} does not exist in this dsc")
    return _IMPLEMENTATIONS[name]


register_kernel_namespace("collective", _resolve)
