"""`Target`: where and how a model is compiled to run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch

from dsc.errors import TargetError

__all__ = ["MAX_PROBED_WINDOW", "Target", "as_target"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OFFLOAD_TIERS = (None, "cpu", "nvme")
# The longest sliding attention window dsc recognises: recognize_attention runs the model's mask
# on a probe of window + 4 tokens (a float mask of 8196² is 270 MB).
MAX_PROBED_WINDOW = 8192


@dataclass(frozen=True)
class Target:
    """What the compiled program runs on.

    Checks that need only the target run at construction; checks that need the model too (heads
    divisible by tp, memory) run in `check_against`, when the target meets the model.
    """

    device: str = "cpu"
    dtype: str = "float32"
    tp: int = 1
    pp: int = 1
    ep: int = 1
    max_batch: int = 8
    max_seq_len: int = 2048
    offload: str | None = None
    gpu_memory_budget: int | None = None  # bytes of weights kept resident when offloading
    offload_path: str | None = None  # folder for NVMe offload
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise TargetError(f"Target.device={self.device!r}: use 'cpu' or 'cuda'.")
        if self.dtype not in _DTYPES:
            raise TargetError(f"Target.dtype={self.dtype!r}: use one of {sorted(_DTYPES)}.")
        for name in ("tp", "pp", "ep", "max_batch", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TargetError(f"Target.{name}={value!r}: must be a positive integer.")
        if self.offload not in _OFFLOAD_TIERS:
            raise TargetError(f"Target.offload={self.offload!r}: use None, 'cpu' or 'nvme'.")
        if self.offload == "nvme" and not self.offload_path:
            raise TargetError("Target.offload='nvme' needs offload_path=<folder on the NVMe drive>.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.ep

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> Target:
        data = json.loads(text) if isinstance(text, str) else dict(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TargetError(f"unknown Target fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def check_machine(self) -> None:
        """Refuse a target this process cannot run."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TargetError(
                "Target.device='cuda' but no CUDA GPU is visible to torch; "
                "use target='cpu' or run on a machine with a GPU."
            )
        if self.device == "cpu" and self.dtype == "float16":
            raise TargetError(
                "float16 matmuls are not supported by the CPU reference runtime; "
                "use dtype='float32' or 'bfloat16' on CPU."
            )

    def check_against(self, info) -> None:
        """Refuse a target the model (its `dsc.frontend.ModelInfo`) cannot be compiled for: heads
        tp does not divide, or sequences longer than a sliding attention window too long to
        recognise (`MAX_PROBED_WINDOW`)."""
        num_heads = info.num_heads
        if self.tp > 1 and num_heads is not None and num_heads % self.tp:
            raise TargetError(
                f"tp={self.tp} does not divide the model's {num_heads} attention heads; "
                f"choose tp among the divisors of {num_heads}."
            )
        window = info.sliding_window
        if window is not None and MAX_PROBED_WINDOW < window < self.max_seq_len:
            # dsc finds a window by running the model's mask on a probe longer than the window;
            # past this length the probe's mask alone would take gigabytes.
            raise TargetError(
                f"{info.name or 'the model'} attends within a sliding window of {window} tokens, "
                f"longer than the {MAX_PROBED_WINDOW} dsc can recognise, and "
                f"max_seq_len={self.max_seq_len} would let sequences outgrow it; compile with "
                f"dsc.Target(max_seq_len={window}) or less (the window then never applies)."
            )


def as_target(target: Target | str | dict[str, Any]) -> Target:
    """Accept a Target, a shorthand ('cpu', 'cuda') or a dict of Target fields."""
    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        return Target.from_json(target)
    if target == "cpu":
        return Target(device="cpu", dtype="float32")
    if target == "cuda":
        return Target(device="cuda", dtype="bfloat16")
    raise TargetError(f"target={target!r}: use 'cpu', 'cuda' or dsc.Target(...).")
