"""`PassContext`: what a pass may read and change besides the graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dsc.frontend import ModelInfo
from dsc.target import Target

__all__ = ["PassContext"]


@dataclass
class PassContext:
    target: Target
    weights: dict[str, torch.Tensor]  # by qualified name; passes may add, shard or drop entries
    info: ModelInfo
    inputs: list[str]  # user inputs of the traced graph, in placeholder order
    rank: int = 0
    notes: dict[str, Any] = field(default_factory=dict)  # facts passes leave for later passes
