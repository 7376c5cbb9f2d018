"""Execute a Plan program: resolve each step's op once, then run the steps over a buffer table."""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch

import dsc.ops  # noqa: F401  (registers the dsc op set the steps call)
from dsc.errors import PlanError
from dsc.plan import Program

__all__ = ["Executor", "resolve_op"]

_PY = {
    "getitem": operator.getitem,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "floordiv": operator.floordiv,
    "truediv": operator.truediv,
    "mod": operator.mod,
    "neg": operator.neg,
    "sym_max": max,
    "sym_min": min,
    "ceil": math.ceil,
}
_KERNEL_RESOLVERS: dict[str, Callable[[str], Callable]] = {}


def register_kernel_namespace(prefix: str, resolver: Callable[[str], Callable]) -> None:
    """Let steps named '<prefix>::<name>' call resolver(name) (hand-written or generated kernels)."""
    _KERNEL_RESOLVERS[prefix] = resolver


def resolve_op(name: str) -> Callable:
    namespace, _, rest = name.partition("::")
    if namespace == "py":
        return _PY[rest]
    if namespace == "cuda":
        from dsc.runtime.cuda_impls import resolve

        return resolve(rest)
    if namespace in _KERNEL_RESOLVERS:
        return _KERNEL_RESOLVERS[namespace](rest)
    opname, _, overload = rest.partition(".")
    if namespace == "dsc" and overload in ("", "default"):
        return dsc.ops.direct(opname)
    try:
        return getattr(getattr(getattr(torch.ops, namespace), opname), overload or "default")
    except (AttributeError, RuntimeError) as exc:
        raise PlanError(f"plan step op {name!r} does not exist in this torch/dsc") from exc


class _Ref:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def _decode(value: Any, device: torch.device) -> Any:
    if isinstance(value, list):
        return [_decode(v, device) for v in value]
    if isinstance(value, dict):
        if "ref" in value:
            return _Ref(value["ref"])
        if "dtype" in value:
            return getattr(torch, value["dtype"])
        if "device" in value:
            return device
        if "layout" in value:
            return getattr(torch, value["layout"])
        if "memory_format" in value:
            return getattr(torch, value["memory_format"])
        if "float" in value:
            return float(value["float"])
    return value


def _has_ref(value: Any) -> bool:
    if isinstance(value, _Ref):
        return True
    if isinstance(value, list):
        return any(_has_ref(v) for v in value)
    return False


def _bind(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, list):
        return [_bind(v, env) for v in value]
    return value


class Executor:
    """Runs one Program. Buffers die after their last use, so peak memory follows liveness."""

    def __init__(self, program: Program, weights: dict[str, torch.Tensor], device: torch.device):
        self.program = program
        self.device = device
        self.weights = {"w:" + k: v for k, v in weights.items()}
        self.steps = []
        last_use: dict[str, int] = {}
        for index, step in enumerate(program.steps):
            args = _decode(step["args"], device)
            kwargs = {k: _decode(v, device) for k, v in step["kwargs"].items()}
            for ref in _refs(args) + _refs(list(kwargs.values())):
                last_use[ref] = index
            self.steps.append((resolve_op(step["op"]), _binder(args), _kwargs_binder(kwargs),
                               step["out"]))
        keep = set(program.outputs) | set(program.inputs) | set(self.weights)
        self.free_after: list[list[str]] = [[] for _ in program.steps]
        if all("free" in step for step in program.steps):  # the plan's memory_plan decided
            for index, step in enumerate(program.steps):
                self.free_after[index] = [n for n in step["free"] if n not in keep]
        else:
            for name, index in last_use.items():
                if name not in keep:
                    self.free_after[index].append(name)
        missing = [n for n in last_use if n.startswith("w:") and n not in self.weights]
        if missing:
            raise PlanError(f"program {program.name!r} uses weights the plan lacks: {missing[:5]}")

    def __call__(self, **inputs: Any) -> list[Any]:
        missing = [n for n in self.program.inputs if n not in inputs]
        if missing:
            raise ValueError(f"program {self.program.name!r} needs inputs {missing}")
        env: dict[str, Any] = dict(self.weights)
        env.update(inputs)
        for (fn, bind_args, bind_kwargs, out), dead in zip(self.steps, self.free_after):
            env[out] = fn(*bind_args(env), **bind_kwargs(env))
            for name in dead:
                del env[name]
        return [env[name] for name in self.program.outputs]


def _binder(args: list[Any]):
    """A function env -> argument list, resolved at load time into the cheapest form."""
    if not _has_ref(args):
        return lambda env: args
    if all(isinstance(a, _Ref) or not isinstance(a, list) for a in args):
        slots = [(i, a.name) for i, a in enumerate(args) if isinstance(a, _Ref)]

        def flat(env: dict[str, Any]) -> list[Any]:
            out = list(args)
            for i, name in slots:
                out[i] = env[name]
            return out

        return flat
    return lambda env: _bind(args, env)


def _kwargs_binder(kwargs: dict[str, Any]):
    if not _has_ref(list(kwargs.values())):
        return lambda env: kwargs
    return lambda env: {key: _bind(v, env) for key, v in kwargs.items()}


def _refs(value: Any) -> list[str]:
    if isinstance(value, _Ref):
        return [value.name]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []
