"""Which passes a Target runs, as short named lists (the pipeline is data, not control flow)."""

from __future__ import annotations

from dsc.target import Target

__all__ = ["trunk", "cached"]

# Recognition: aten subgraphs into dsc ops. Order matters only where a docstring says so.
RECOGNISE = [
    "canonicalize",
    "recognize_rms_norm",
    "recognize_rotary",
    "recognize_attention",
]


def trunk(target: Target) -> list[str]:
    """Passes every program shares."""
    return list(RECOGNISE)


def cached(target: Target) -> list[str]:
    """Passes that turn the shared graph into the prefill/decode graph."""
    return ["kv_cache"]
