"""The KV cache the runtime owns: one K and one V tensor per attention layer, plus slot state."""

from __future__ import annotations

import torch

from dsc.errors import LimitError

__all__ = ["KVCache", "cache_bytes", "check_fits"]


def cache_bytes(spec: list[dict]) -> int:
    """Bytes the cache tensors of `spec` take (a view of another cache takes none)."""
    total = 0
    for entry in spec:
        if "view_of" in entry:
            continue
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        count = 1
        for size in entry["shape"]:
            count *= size
        total += count * torch.empty((), dtype=dtype).element_size()
    return total


def check_fits(needed: int, free: int, max_batch: int, max_seq: int) -> None:
    """Refuse, before allocating, a cache larger than the device's free memory."""
    if needed > free:
        raise LimitError(
            f"the KV cache for max_batch={max_batch} x max_seq_len={max_seq} needs "
            f"{needed / 2**30:.2f} GiB but the GPU has {free / 2**30:.2f} GiB free; compile with a "
            "smaller dsc.Target(max_batch=..., max_seq_len=...) or free GPU memory"
        )


class KVCache:
    """Static per-slot layout [max_batch, kv_heads, max_seq, head_dim], allocated once.

    `valid[b, j]` says slot j of sequence b holds a real token (False for padding and for slots
    not yet written); `start` holds the slot of the first token of the running step, in device
    memory so a CUDA-graph replay reads the current value.
    """

    def __init__(self, spec: list[dict], device: torch.device, max_batch: int, max_seq: int):
        self.spec = spec
        self.tensors: dict[str, torch.Tensor] = {}
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            check_fits(cache_bytes(spec), free, max_batch, max_seq)
        for entry in spec:
            dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
            if "view_of" in entry:  # the first lanes of another cache (latent attention)
                self.tensors[entry["name"]] = self.tensors[entry["view_of"]][
                    ..., : entry["shape"][-1]]
            else:
                self.tensors[entry["name"]] = torch.zeros(entry["shape"], dtype=dtype,
                                                          device=device)
        self.valid = torch.zeros(max_batch, max_seq, dtype=torch.bool, device=device)
        self.start = torch.zeros(1, dtype=torch.int64, device=device)
        self.batch = 0

    @property
    def nbytes(self) -> int:
        return cache_bytes(self.spec)

    def reset(self, mask: torch.Tensor) -> None:
        """Begin a batch: its prompt occupies slots 0..S-1, real where mask is 1."""
        batch, seq = mask.shape
        self.batch = batch
        self.valid.zero_()
        self.valid[:batch, :seq] = mask.bool()

    def mark(self, slot: int) -> None:
        """The running decode step writes slot `slot` of every sequence."""
        self.valid[: self.batch, slot] = True

    def inputs(self, batch: int, start: int) -> dict[str, torch.Tensor]:
        self.start.fill_(start)
        return {"kv_valid": self.valid[:batch], "cache_start": self.start, **self.tensors}
