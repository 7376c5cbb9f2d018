"""`Plan`: the compiled program, independent of the model's code. Saved as a directory.

    plan_dir/
      plan.json              schema version, target, programs (steps over named buffers),
                             model facts, weight manifest, checksums of every other file
      weights-rank<r>.safetensors   one file per rank; a rank reads only its own
      kernels/<name>.py      generated kernel sources
      history.json           the pass history (graphs after each pass), for report/visualize

A plan for several ranks keeps one plan.json (every rank's part, written once by rank 0 after
gathering the parts) and per-rank history-rank<r>.json and kernels/rank<r>/, since each rank
writes its own concurrently.

No pickle: JSON and safetensors only. Loading checks the schema version and every checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dsc.errors import PlanError
from dsc.target import Target

__all__ = ["SCHEMA_VERSION", "Program", "Plan", "save_plan", "load_plan"]

SCHEMA_VERSION = 1


@dataclass
class Program:
    """One entry point: ordered steps over named buffers.

    A step is {"op": "aten::linear.default" | "dsc::rms_norm.default" | "py::getitem" |
    "kernel::<name>", "args": [...], "kwargs": {...}, "out": name}; an argument refers to a buffer
    as {"ref": name}. Inputs are bound by name; weights are buffers named "w:<qualified name>".
    """

    name: str
    inputs: list[str]
    steps: list[dict[str, Any]]
    outputs: list[str]
    kernels: dict[str, str] = field(default_factory=dict)  # node name -> implementation chosen

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def weight_refs(self) -> set[str]:
        """Qualified names of the weights the steps read."""
        found: set[str] = set()

        def walk(value: Any) -> None:
            if isinstance(value, dict) and "ref" in value:
                if value["ref"].startswith("w:"):
                    found.add(value["ref"][2:])
            elif isinstance(value, (list, tuple)):
                for v in value:
                    walk(v)
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)

        for step in self.steps:
            walk(step["args"])
            walk(step["kwargs"])
        return found


@dataclass
class Plan:
    target: Target
    programs: dict[str, Program]
    weights: dict[str, torch.Tensor]  # this rank's weights
    model: dict[str, Any]  # ModelInfo fields, cache spec, ...
    kernel_sources: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    schema_version: int = SCHEMA_VERSION

    def manifest(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in self.weights.items()
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_file(rank: int) -> str:
    return f"weights-rank{rank}.safetensors"


def save_plan(
    plan: Plan,
    path: str | os.PathLike,
    progress: bool = False,
    gather: Callable[[Any], list[Any] | None] | None = None,
) -> Path:
    """Write `plan` (this rank's part) to a directory; returns the directory.

    gather: for ranks saving at the same time, a collective that returns every rank's object on
    the rank that writes plan.json and None on the others (the runtime passes one). Without it,
    this rank's part is merged into the plan.json already there.
    """
    from safetensors.torch import save_file

    root = Path(path)
    several = plan.world_size > 1
    kernel_dir = f"kernels/rank{plan.rank}" if several else "kernels"
    history_name = f"history-rank{plan.rank}.json" if several else "history.json"
    (root / kernel_dir).mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    # Tied weights share storage; safetensors refuses shared tensors, so each is written whole.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in plan.weights.items()}
    weights_name = _weights_file(plan.rank)
    save_file(tensors, str(root / weights_name), metadata={"format": "pt"})
    files[weights_name] = _sha256(root / weights_name)
    for name, source in plan.kernel_sources.items():
        rel = f"{kernel_dir}/{name}.py"
        (root / rel).write_text(source)
        files[rel] = _sha256(root / rel)
    (root / history_name).write_text(json.dumps(plan.history))
    files[history_name] = _sha256(root / history_name)
    manifest_path = root / "plan.json"
    part = {
        "programs": {k: p.to_dict() for k, p in plan.programs.items()},
        "weights": plan.manifest(),
        "files": files,
    }
    if gather is not None:
        parts = gather((plan.rank, part))
        if parts is None:
            return root  # another rank writes plan.json
        ranks = {str(r): p for r, p in parts}
    else:
        existing = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        schema = existing.get("schema_version") == SCHEMA_VERSION
        ranks = existing.get("ranks", {}) if schema else {}
        ranks[str(plan.rank)] = part
    doc = {
        "schema_version": SCHEMA_VERSION,
        "format": "dsc-plan",
        "target": json.loads(plan.target.to_json()),
        "world_size": plan.world_size,
        "model": plan.model,
        "ranks": ranks,
    }
    tmp = root / "plan.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(manifest_path)
    return root


def load_plan(path: str | os.PathLike, rank: int = 0, device: str | None = None) -> Plan:
    """Read rank `rank`'s part of a saved plan, refusing anything corrupted or of another version."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    manifest_path = root / "plan.json"
    if not manifest_path.is_file():
        raise PlanError(f"{root} is not a dsc plan: {manifest_path.name} is missing.")
    try:
        doc = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{manifest_path} is corrupted (not valid JSON: {exc}); save it again.") from exc
    if doc.get("format") != "dsc-plan":
        raise PlanError(f"{manifest_path} is not a dsc plan manifest.")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise PlanError(
            f"{root} has plan schema version {doc.get('schema_version')}, this dsc reads version "
            f"{SCHEMA_VERSION}; compile the model again with this version of dsc."
        )
    part = doc["ranks"].get(str(rank))
    if part is None:
        raise PlanError(f"{root} holds no part for rank {rank} (ranks: {sorted(doc['ranks'])}).")
    for rel, digest in part["files"].items():
        file = root / rel
        if not file.is_file():
            raise PlanError(f"{root}: {rel} is missing; the plan is incomplete, save it again.")
        if _sha256(file) != digest:
            raise PlanError(
                f"{root}: {rel} does not match its checksum (truncated or modified); save it again."
            )
    target = Target.from_json(doc["target"])
    try:
        weights = load_file(str(root / _weights_file(rank)), device=device or "cpu")
    except SafetensorError as exc:
        raise PlanError(f"{root}: cannot read weights: {exc}") from exc
    expected = part["weights"]
    if set(weights) != set(expected):
        raise PlanError(f"{root}: weight file and manifest disagree on tensor names.")
    kernel_sources = {
        Path(rel).stem: (root / rel).read_text() for rel in part["files"] if rel.startswith("kernels/")
    }
    programs = {k: Program(**p) for k, p in part["programs"].items()}
    return Plan(
        target=target,
        programs=programs,
        weights=weights,
        model=doc["model"],
        kernel_sources=kernel_sources,
        history=json.loads((root / next(f for f in part["files"] if f.startswith("history")))
                           .read_text()),
        rank=rank,
        world_size=doc.get("world_size", 1),
    )
