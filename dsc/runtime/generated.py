"""Generated kernels: plan steps named `kernel::<name>` call the launcher in the plan's source.

A plan carries the source of every generated kernel (Plan.kernel_sources, saved as kernels/*.py).
`register_sources` hands them to this module; the first step that needs one writes it to a file
in a cache folder (named by its content hash, so different sources never collide) and imports it
with importlib, and the step calls the module's function of the kernel's name. Triton reads a
kernel's source from its file, so the module must come from a real file; nothing but a plan's own
kernel sources is ever imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import dsc.ops.fused  # noqa: F401  (steps of regions without a kernel call the reference op)
from dsc.errors import PlanError
from dsc.runtime.executor import register_kernel_namespace

__all__ = ["cache_dir", "register_sources", "resolve"]

_SOURCES: dict[str, str] = {}
_MODULES: dict[str, ModuleType] = {}  # by content hash


def cache_dir() -> Path:
    """Where kernel files are written: one folder per user under the system's temp folder."""
    return (
        Path(tempfile.gettempdir()) / f"dsc-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
    )


def register_sources(sources: Mapping[str, str]) -> None:
    """Make a plan's generated kernels callable by name (a later plan's source replaces one of the
    same name: names hash the region's structure, sources the code generator's output too)."""
    _SOURCES.update(sources)


def _load(name: str, source: str) -> ModuleType:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    module = _MODULES.get(digest)
    if module is not None:
        return module
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{digest}.py"
    if not path.is_file() or path.read_text() != source:
        # Written whole and renamed, so a concurrent rank never imports half a file.
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        tmp.replace(path)
    spec = importlib.util.spec_from_file_location(f"dsc_generated.{name}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _MODULES[digest] = module
    return module


def resolve(name: str) -> Callable:
    """The launcher of generated kernel `name` (registered with `register_sources`)."""
    source = _SOURCES.get(name)
    if source is None:
        raise PlanError(
            f"plan step kernel::{name} names a generated kernel whose source was not registered; "
            "the runtime registers Plan.kernel_sources (dsc.runtime.generated.register_sources) "
            "before it builds the program executors"
        )
    launcher = getattr(_load(name, source), name, None)
    if launcher is None:
        raise PlanError(f"generated kernel source for {name} defines no function {name}")
    return launcher


register_kernel_namespace("kernel", resolve)
