"""The process group a tensor-parallel plan runs in, and the runtime's own small collectives.

Every rank runs the same program on its own shard; they meet in collectives on the default
torch.distributed process group. Under `torchrun --nproc-per-node N` the group is created from
the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo on
CPU, NCCL on CUDA with this process's GPU (`device_id` = LOCAL_RANK).

This is the one module that reads the environment for parallel runs:
    DSC_COLLECTIVE_TIMEOUT   seconds a collective may wait for its peers (default 60). A rank
                             that died or never reaches the collective makes the others fail with
                             `CollectiveError` (gloo) or NCCL's watchdog abort, instead of hanging.
    TORCH_SYMM_MEM_DISABLE_MULTICAST, NCCL_NVLS_ENABLE   set to keep NVLink multicast off unless
                             the caller chose otherwise (see dsc/runtime/allreduce.py).
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dsc.errors import DscError, TargetError

__all__ = [
    "TIMEOUT_ENV",
    "CollectiveError",
    "barrier",
    "broadcast_",
    "collective_timeout",
    "env_rank",
    "gather_to_first",
    "guarded",
    "init",
    "is_parallel",
    "multicast_disabled",
    "rank",
    "world_size",
]

TIMEOUT_ENV = "DSC_COLLECTIVE_TIMEOUT"
_DEFAULT_TIMEOUT_S = 60.0
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# NVLink multicast stays off on the machines dsc targets (see ENV.md); set before NCCL or symmetric
# memory first read them.
_NO_MULTICAST = {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0"}

T = TypeVar("T")


class CollectiveError(DscError, RuntimeError):
    """A collective failed: a peer rank exited, crashed, or did not arrive within the timeout."""


def collective_timeout() -> timedelta:
    """How long a collective waits for its peers: DSC_COLLECTIVE_TIMEOUT seconds (default 60)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return timedelta(seconds=_DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        raise TargetError(f"{TIMEOUT_ENV}={text!r}: give a number of seconds") from None
    if seconds <= 0:
        raise TargetError(f"{TIMEOUT_ENV}={text!r}: must be > 0 seconds")
    return timedelta(seconds=seconds)


def multicast_disabled() -> bool:
    """True unless the caller turned NVLink multicast for symmetric memory back on."""
    return os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1"


def is_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def env_rank() -> int:
    """The rank torchrun gave this process (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def init(device: str, world: int) -> int:
    """Join the default process group for a `world`-rank plan on `device`; return this rank.

    Uses a group the caller already created (it must have `world` ranks), else creates one from
    the torchrun environment.
    """
    if world == 1:
        return 0
    if not dist.is_available():
        raise TargetError("tp > 1 needs torch.distributed, which this torch build lacks.")
    if not dist.is_initialized():
        missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
        if missing:
            raise TargetError(
                f"a plan for {world} ranks runs one process per rank: start it with "
                f"`torchrun --nproc-per-node {world} script.py` (missing {', '.join(missing)})."
            )
        if int(os.environ["WORLD_SIZE"]) != world:
            raise TargetError(
                f"the plan needs {world} ranks but torchrun started {os.environ['WORLD_SIZE']}; "
                f"use --nproc-per-node {world}."
            )
        options: dict[str, Any] = {"timeout": collective_timeout()}
        if device == "cuda":
            for name, value in _NO_MULTICAST.items():
                os.environ.setdefault(name, value)
            local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
            torch.cuda.set_device(local)
            options["device_id"] = torch.device("cuda", local)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", **options)
        if device != "cuda":
            # The gloo group is ours: close it before the interpreter tears down, or its threads
            # can meet their destructors mid-exit (std::terminate, exit code -6) after correct
            # work. (NCCL groups are left to torch: closing one whose peer died can block.)
            atexit.register(_close_group)
    if dist.get_world_size() != world:
        raise TargetError(
            f"the plan needs {world} ranks but the process group has {dist.get_world_size()}."
        )
    return dist.get_rank()


def _close_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):  # a peer already gone: nothing left to close
            pass


def guarded(what: str, fn: Callable[[], T]) -> T:
    """Run a collective; a failure (dead peer, timeout) becomes a CollectiveError naming it."""
    try:
        return fn()
    except CollectiveError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        raise CollectiveError(
            f"rank {rank()} of {world_size()}: {what} failed — another rank exited, crashed or did "
            f"not reach it within {collective_timeout().total_seconds():g} s ({TIMEOUT_ENV}). "
            f"Cause: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from exc


def all_agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `ok` is true on every rank, else False on every rank: for a step
    that may fail on one rank only (an allocation) before a collective that all must join or
    all skip. `device`: where the group's backend exchanges tensors (a GPU for NCCL)."""
    if not is_parallel():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    guarded("agreement", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MIN))
    return bool(flag.item())


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s (in place); a no-op when alone."""
    if is_parallel():
        guarded("broadcast", lambda: dist.broadcast(tensor, src))
    return tensor


def gather_to_first(obj: Any) -> list[Any] | None:
    """Every rank's JSON-able `obj` on rank 0 (in rank order), None on the others."""
    if not is_parallel():
        return [obj]
    # Sent as JSON text: what crosses between ranks is data, never pickled objects.
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    guarded("gather", lambda: dist.gather_object(json.dumps(obj), out, dst=0))
    return None if out is None else [json.loads(text) for text in out]


def barrier() -> None:
    if is_parallel():
        guarded("barrier", dist.barrier)
