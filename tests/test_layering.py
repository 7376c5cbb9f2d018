"""Layering rules, checked on the source: the runtime never imports the compiler half (passes,
codegen), and nothing in dsc/ serialises with pickle (plans are JSON + safetensors)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DSC = ROOT / "dsc"
FORBIDDEN_IN_RUNTIME = ("dsc.passes", "dsc.codegen")
PICKLERS = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module a source file imports, relative imports resolved, `from a import b` as a.b."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value))
    return found


def pickle_uses(source: str) -> list[str]:
    """pickle-family imports and torch.load / torch.save calls in a source file."""
    uses = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            uses += [a.name for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLERS:
                uses.append(node.module)
            if node.module == "torch":
                uses += [f"torch.{a.name}" for a in node.names if a.name in ("load", "save")]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in ("load", "save")
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            uses.append(f"torch.{node.attr}")
    return uses


def _violations(module_imports: set[str]) -> list[str]:
    return sorted(
        m
        for m in module_imports
        if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_RUNTIME)
    )


RUNTIME_FILES = sorted((DSC / "runtime").rglob("*.py"))
ALL_FILES = sorted(DSC.rglob("*.py"))


@pytest.mark.parametrize("path", RUNTIME_FILES, ids=lambda p: p.name)
def test_runtime_does_not_import_passes_or_codegen(path):
    found = imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py")
    assert not _violations(found), f"{path.relative_to(ROOT)} imports {_violations(found)}"


def test_runtime_import_pulls_in_no_compiler_module():
    modules = [_module_name(p) for p in RUNTIME_FILES]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('dsc.passes', 'dsc.codegen')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(DSC)))
def test_no_pickle_anywhere(path):
    uses = pickle_uses(path.read_text())
    assert not uses, f"{path.relative_to(ROOT)} uses {uses}; plans are JSON + safetensors only"


# The checkers themselves: each rule must catch what it is meant to and nothing else.
@pytest.mark.parametrize(
    "source",
    [
        "import dsc.passes.manager",
        "from dsc.codegen.lower import lower",
        "from dsc import passes",
        "from ..passes import PASSES",
        "from .. import codegen",
        "import importlib\nimportlib.import_module('dsc.passes.canonicalize')",
        "def f():\n    from dsc.passes import PASSES",
    ],
)
def test_import_checker_catches(source):
    assert _violations(imported_modules(source, "dsc.runtime.model"))


@pytest.mark.parametrize(
    "source",
    [
        "import dsc.plan",
        "from dsc.ops import attention",
        "from .executor import Executor",
        "from dsc import plan, errors",
        "import dsc.passes_extra_not_a_real_thing as x",
    ],
)
def test_import_checker_does_not_match(source):
    assert not _violations(imported_modules(source, "dsc.runtime.model"))


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import dumps",
        "torch.save(x, 'f')",
        "import torch\nstate = torch.load('w.pt')",
        "from torch import load",
    ],
)
def test_pickle_checker_catches(source):
    assert pickle_uses(source)


@pytest.mark.parametrize(
    "source",
    [
        "from safetensors.torch import load_file, save_file",
        "import json\njson.load(f)",
        "torch.ops.load_library('x')",
        "model.load_state_dict(sd)",
    ],
)
def test_pickle_checker_does_not_match(source):
    assert not pickle_uses(source)
