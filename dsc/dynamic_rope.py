"""Rotary embeddings whose frequencies depend on the sequence length, made traceable.

HF's "dynamic" (NTK) and "longrope" rotary embeddings (Phi-3 and its successors) choose their
inverse frequencies in Python from `max(position_ids) + 1`: a branch on a tensor value, which
torch.export cannot trace. While dsc traces, `traceable_dynamic_rope` gives each such module a
forward that computes the same frequencies with tensor ops instead, from the positions of the
call:

    dynamic:   inv_freq = HF's dynamic-NTK frequencies at max(seq_len, max_position_embeddings)
    longrope:  inv_freq = where(seq_len > original_max_position_embeddings, long, short)

then runs the module's own (undecorated) forward with them. Each call sees the frequencies of
its own length, which is what HF computes as a sequence grows (a decode step at position p uses
the frequencies of length p + 1; cached keys keep the rotation they were written with). HF also
keeps a grown dynamic-NTK table for later, shorter calls; a compiled plan does not.

A longrope model's keys cached before its sequence grew past `original_max_position_embeddings`
were rotated with the short factors; HF's Phi-3 generate drops its cache at that step to
recompute every position with the long ones (transformers 5.17 then feeds it only the newest
token). `rope_switch_length` names that length, and dsc's generate runs prefill over the whole
sequence there (`dsc.runtime.generate`): its tokens equal HF's greedy decoding without a cache.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Iterator

import torch

__all__ = ["rope_switch_length", "traceable_dynamic_rope"]


def _kind(module: torch.nn.Module) -> str | None:
    """'dynamic' or 'longrope' for an HF rotary module of one rope type whose forward is wrapped
    by HF's frequency update, else None."""
    rope_type = getattr(module, "rope_type", None)
    wrapped = getattr(type(module).forward, "__wrapped__", None)
    if not isinstance(rope_type, str) or wrapped is None or not hasattr(module, "config"):
        return None
    if "dynamic" in rope_type:
        return "dynamic"
    return "longrope" if rope_type == "longrope" else None


def _frequencies(module: torch.nn.Module, kind: str, position_ids: torch.Tensor,
                 device: torch.device) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    seq_len = position_ids.max() + 1
    init = ROPE_INIT_FUNCTIONS[module.rope_type]
    if kind == "dynamic":
        inv_freq, _ = init(module.config, device, seq_len=seq_len)
        return inv_freq
    original = module.config.rope_parameters["original_max_position_embeddings"]
    long_inv_freq, _ = init(module.config, device, seq_len=original + 1)
    short_inv_freq = module.original_inv_freq.to(device)
    return torch.where(seq_len > original, long_inv_freq.to(device), short_inv_freq)


def _forward(kind: str):
    def forward(self, x, position_ids, layer_type=None):
        if layer_type is not None:  # per-layer rope parameters: HF's own path
            return type(self).forward(self, x, position_ids, layer_type)
        # HF stacks torch.no_grad() over its frequency update: unwrap both.
        undecorated = inspect.unwrap(type(self).forward)
        inv_freq = _frequencies(self, kind, position_ids, x.device)
        # An instance attribute shadows the buffer for this call only.
        self.__dict__["inv_freq"] = inv_freq
        try:
            return undecorated(self, x, position_ids)
        finally:
            del self.__dict__["inv_freq"]

    return forward


@contextlib.contextmanager
def traceable_dynamic_rope(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, the model's dynamic / longrope rotary modules compute their frequencies
    with tensor ops; yields how many modules were changed. Nothing is left changed after."""
    changed = []
    for module in model.modules():
        kind = _kind(module)
        if kind is not None and "forward" not in module.__dict__:
            module.forward = types.MethodType(_forward(kind), module)
            changed.append(module)
    try:
        yield len(changed)
    finally:
        for module in changed:
            del module.forward


def rope_switch_length(model: torch.nn.Module) -> int | None:
    """The sequence length past which the model's longrope embedding switches to its long
    factors (its `original_max_position_embeddings`), or None without one."""
    for module in model.modules():
        if _kind(module) == "longrope":
            return int(module.config.rope_parameters["original_max_position_embeddings"])
    return None
