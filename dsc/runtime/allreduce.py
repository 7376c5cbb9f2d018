"""The collectives plan steps call: `collective::all_reduce`, `collective::all_gather`,
`collective::all_reduce_residual`, `collective::all_reduce_residual_norm`.

A decode step of a tensor-parallel model reduces one small activation per block (8 KB for
Llama-7B at batch 1, bf16): NCCL spends 20-40 us on each, more than the GEMVs around it. So
`all_reduce` picks its transport per message:

    CUDA, at most MAX_ROWS rows of at most MAX_ROW_WORDS 32-bit words, 2/4/8 ranks, torch
    symmetric memory present, multicast off, DSC_PUSH_ALLREDUCE not 0
        -> dsc's push kernel (dsc/kernels/push_all_reduce.py): every rank writes its partial,
           flagged with the call's sequence number, into every peer's buffer over NVLink and
           sums what it received (one kernel, no barrier; safe in CUDA graphs)
    CUDA, sum of a float32/bfloat16 tensor of at most ONE_SHOT_MAX_BYTES, 16-byte sized and
    aligned, the same ranks and memory
        -> torch's symmetric memory one-shot all-reduce: every rank loads all peers' copies
           over NVLink after a barrier
    other CUDA messages                -> NCCL
    CPU                                -> gloo

The symmetric buffers are allocated (a collective: every rank at the same step) on the first
eligible call outside a CUDA-graph capture; the eager prefill comes before any capture.
A failure (a peer died, a timeout) is raised as `CollectiveError`. Nothing here touches CUDA
unless the tensor is on a GPU.

`linear_all_reduce` (a row-parallel product and its all_reduce) is the product, then
`all_reduce`; with DSC_GEMV_PUSH=1, at decode time, the small-batch GEMM sends its output tiles
straight into the push buffers and a second kernel receives and sums them (measured slower:
see `gemv_push_enabled`).
`all_gather` along the last dimension takes the push kernel under the same conditions, NCCL
otherwise. `all_reduce_residual` (h = residual + all_reduce(x)) is the push kernel adding the
residual as it writes the sum, under the same conditions; otherwise all_reduce then the add.
`all_reduce_residual_norm` (h = residual + all_reduce(x), then RMSNorm of h) is the
push kernel with the add and the norm fused in, for messages the push kernel takes; otherwise
all_reduce followed by the add and the norm.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dsc.kernels import push_all_reduce
from dsc.ops.norms import rms_norm
from dsc.runtime import distributed
from dsc.runtime.executor import register_kernel_namespace

__all__ = ["ONE_SHOT_MAX_BYTES", "all_gather", "all_reduce", "all_reduce_residual",
           "all_reduce_residual_norm", "linear_all_reduce", "transport"]

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
    except ImportError:
        _unavailable.add(device)  # every rank runs the same torch
        return None
    buffer = _allocate_everywhere(
        lambda: symm_mem.empty(ONE_SHOT_MAX_BYTES // dtype.itemsize, dtype=dtype, device=device),
        device)
    if buffer is None:
        return None
    try:
        symm_mem.rendezvous(buffer, dist.group.WORLD.group_name)
    except (AttributeError, RuntimeError):
        # Every rank takes the same branch: the same torch, the same kind of GPU.
        _unavailable.add(device)
        return None
    _buffers[key] = buffer
    return buffer


def push_enabled() -> bool:
    """DSC_PUSH_ALLREDUCE: `1` (default) sends decode-sized all-reduces through the push kernel,
    `0` through torch's one-shot kernel. Measured on 4 H100s in a CUDA graph, [1, 4096] bf16:
    push 3.0–3.3 µs at tp=2 and 4.0–4.5 at tp=4, one-shot 8.8–9.3 and 9.8–10.0 (bench/NOTES.md,
    tp runs 4–7)."""
    return os.environ.get("DSC_PUSH_ALLREDUCE", "1") != "0"


def _allocate_everywhere(allocate: Callable[[], Tensor], device: torch.device) -> Tensor | None:
    """allocate() on every rank, or None on every rank if it failed on any (out of memory on
    one GPU, say): the rendezvous after it is a collective, which a rank that gave up would
    never join."""
    try:
        buffer = allocate()
    except (AttributeError, RuntimeError):  # torch.OutOfMemoryError is a RuntimeError
        buffer = None
    if not distributed.all_agree(buffer is not None, device):
        _unavailable.add(device)
        return None
    return buffer


def transport(x: Tensor) -> str:
    """Which transport all_reduce uses for x: 'push', 'one_shot', 'nccl' or 'gloo'."""
    if not x.is_cuda:
        return "gloo"
    if push_enabled() and _pushable(x):
        return "push"
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
    kind = transport(x)
    if kind == "push":
        out = distributed.guarded("all_reduce (push)", lambda: _push_sum(x))
        if out is not None:
            return out
        kind = transport(x)  # no symmetric memory here after all
    if kind == "one_shot":
        out = distributed.guarded("all_reduce (symmetric memory)", lambda: _one_shot(x))
        if out is not None:
            return out
    out = x.clone()
    distributed.guarded("all_reduce", lambda: dist.all_reduce(out))
    return out


@dataclass(frozen=True)
class _PushBuffers:
    """Every rank's symmetric receive buffer as a device pointer table, and this rank's state."""

    buffer_ptrs: Tensor
    state: Tensor
    keep: tuple = ()  # the buffer and its handle: they must outlive every launch using the pointers


_push: dict[torch.device, _PushBuffers] = {}


def _push_buffers(device: torch.device) -> _PushBuffers | None:
    """The push kernel's buffers on this device, rendezvoused with the peers on first use (a
    collective: every rank makes the same calls); None where symmetric memory is missing."""
    if device in _push:
        return _push[device]
    if device in _unavailable or torch.cuda.is_current_stream_capturing():
        return None
    world = distributed.world_size()
    try:
        from torch.distributed import _symmetric_memory as symm_mem
    except ImportError:
        _unavailable.add(device)  # every rank runs the same torch
        return None
    data = _allocate_everywhere(
        lambda: symm_mem.empty(push_all_reduce.buffer_words(world), dtype=torch.int64,
                               device=device).zero_(),
        device)
    if data is None:
        return None
    try:
        handle = symm_mem.rendezvous(data, dist.group.WORLD.group_name)
    except (AttributeError, RuntimeError):
        _unavailable.add(device)  # every rank takes the same branch
        return None
    torch.cuda.synchronize(device)
    dist.barrier()  # every rank's buffer is zero before anyone pushes into it
    buffers = _PushBuffers(
        torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device),
        torch.zeros(push_all_reduce.state_elements(), dtype=torch.int32, device=device),
        keep=(data, handle),
    )
    _push[device] = buffers
    return buffers


def _pushable(x: Tensor) -> bool:
    return _pushable_as(x.shape, x.dtype, x.device)


def _pushable_as(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a message of this shape and dtype on this device can take the push kernel."""
    return (
        device.type == "cuda"
        and distributed.multicast_disabled()
        and distributed.world_size() in _ONE_SHOT_WORLDS
        and push_all_reduce.fits_shape(tuple(shape), dtype)
        and device not in _unavailable
    )


def _push_kwargs(buffers: _PushBuffers) -> dict:
    return dict(rank=distributed.rank(), world=distributed.world_size(),
                buffer_ptrs=buffers.buffer_ptrs, state=buffers.state)


def _push_sum(x: Tensor) -> Tensor | None:
    buffers = _push_buffers(x.device)
    if buffers is None:
        return None
    return push_all_reduce.push_all_reduce(x, **_push_kwargs(buffers))


def all_reduce_residual(x: Tensor, residual: Tensor) -> Tensor:
    """h = residual + the sum of x over all ranks."""
    if distributed.is_parallel() and _pushable(x) and residual.shape == x.shape:
        buffers = _push_buffers(x.device)
        if buffers is not None:
            return distributed.guarded(
                "all_reduce + residual (push)",
                lambda: push_all_reduce.push_all_reduce_residual(x, residual,
                                                                 **_push_kwargs(buffers)),
            )
    return residual + all_reduce(x)


def all_reduce_residual_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float,
                             out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(h, rms_norm(h)) with h = residual + the sum of x over all ranks."""
    if (distributed.is_parallel() and _pushable(x) and residual.shape == x.shape
            and (weight is None or tuple(weight.shape) == (x.shape[-1],))):
        buffers = _push_buffers(x.device)
        if buffers is not None:
            return distributed.guarded(
                "all_reduce + residual + RMSNorm (push)",
                lambda: push_all_reduce.push_all_reduce_residual_norm(
                    x, residual, weight, eps, out_dtype, **_push_kwargs(buffers)),
            )
    h = residual + all_reduce(x)
    return h, rms_norm(h, weight, eps, out_dtype)


def gemv_push_enabled() -> bool:
    """DSC_GEMV_PUSH=1 lets a row-parallel decode GEMM send its tiles to the peers itself
    (`linear_all_reduce`); by default (`0`) the GEMM runs, then the all_reduce. Opt-in: on
    2 H100s, in a CUDA graph, Llama-7B's tp=2 o-projection shard with its all-reduce took
    11.8 µs pushing against 7.4 µs as two kernels (down: 18.8 against 16.8), the decode step
    3.350 against 3.128 ms (bench/NOTES.md, tp run 8)."""
    return os.environ.get("DSC_GEMV_PUSH", "0") == "1"


def _local_product(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight^T as the unfused plan computes it: the decode GEMM's implementation for
    decode-sized rows on a GPU, torch otherwise (prefill, CPU)."""
    rows = x.numel() // x.shape[-1]
    if x.is_cuda and rows <= push_all_reduce.MAX_ROWS:
        from dsc.runtime.cuda_impls import linear_small_batch

        return linear_small_batch(x, weight)
    return torch.nn.functional.linear(x, weight)


def linear_all_reduce(x: Tensor, weight: Tensor) -> Tensor:
    """Sum over all ranks of x @ weight^T: the product, then `all_reduce`. With DSC_GEMV_PUSH=1,
    on GPUs, for a decode-sized product the small-batch GEMM takes (see
    `small_batch_gemm.push_config`), the GEMM sends its tiles into the push buffers and
    `receive_sum` adds them instead."""
    if not distributed.is_parallel():
        return _local_product(x, weight)
    out_shape = (*x.shape[:-1], weight.shape[0])
    if x.is_cuda and gemv_push_enabled() and push_enabled() and x.dtype == weight.dtype:
        from dsc.kernels import small_batch_gemm

        rows = x.reshape(-1, x.shape[-1])
        if (small_batch_gemm.small_batch_wins(rows.shape[0], weight.shape[0])
                and _pushable_as(out_shape, x.dtype, x.device)
                and small_batch_gemm.push_config(rows, weight) is not None):
            buffers = _push_buffers(x.device)
            if buffers is not None:
                def push_and_receive() -> Tensor:
                    small_batch_gemm.linear_push_partial(rows, weight, **_push_kwargs(buffers))
                    return push_all_reduce.receive_sum(out_shape, x.dtype,
                                                       **_push_kwargs(buffers))

                return distributed.guarded("row-parallel GEMM + all_reduce (push)",
                                           push_and_receive)
    return all_reduce(_local_product(x, weight))


def all_gather(x: Tensor, dim: int) -> Tensor:
    """Every rank's x concatenated along dim, in rank order. Along the last dimension, a message
    the push kernel takes goes through it (the decode step's vocab-parallel logits)."""
    world = distributed.world_size()
    if world == 1:
        return x.clone()
    x = x.contiguous()
    if dim in (-1, x.dim() - 1) and push_enabled() and _pushable(x):
        buffers = _push_buffers(x.device)
        if buffers is not None:
            return distributed.guarded(
                "all_gather (push)",
                lambda: push_all_reduce.push_all_gather(x, **_push_kwargs(buffers)))
    parts = [torch.empty_like(x) for _ in range(world)]
    distributed.guarded("all_gather", lambda: dist.all_gather(parts, x))
    return torch.cat(parts, dim=dim)


_IMPLEMENTATIONS: dict[str, Callable] = {
    "all_reduce": all_reduce,
    "all_gather": all_gather,
    "all_reduce_residual": all_reduce_residual,
    "all_reduce_residual_norm": all_reduce_residual_norm,
    "linear_all_reduce": linear_all_reduce,
}


def _resolve(name: str) -> Callable:
    from dsc.errors import PlanError

    if name not in _IMPLEMENTATIONS:
        raise PlanError(f"plan step op collective::{name} does not exist in this dsc")
    return _IMPLEMENTATIONS[name]


register_kernel_namespace("collective", _resolve)
