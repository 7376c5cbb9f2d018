"""Lower an fx graph into a Plan `Program`: ordered steps over named buffers, JSON only.

Every call_function node becomes one step. Its op is written as a string the runtime resolves
without the graph (`aten::linear.default`, `dsc::rms_norm.default`, `py::getitem`); tensors,
symbolic sizes and tuples produced by earlier nodes are referred to by name; dtypes, devices and
non-finite floats get small tagged encodings. Devices are always "the runtime's device", so a plan
traced on one device runs on another.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from dsc.errors import UnsupportedOpError
from dsc.plan import Program

__all__ = ["lower", "op_name", "PY_OPS"]

# Python-level ops that appear in exported graphs (size arithmetic, tuple access).
PY_OPS = {
    operator.getitem: "getitem",
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.floordiv: "floordiv",
    operator.truediv: "truediv",
    operator.mod: "mod",
    operator.neg: "neg",
    torch.sym_max: "sym_max",
    torch.sym_min: "sym_min",
    math.ceil: "ceil",
}
_RUNNABLE_NAMESPACES = ("aten", "dsc", "prims")


def op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        if namespace not in _RUNNABLE_NAMESPACES:
            raise UnsupportedOpError(_unsupported(node, f"{namespace}::{target._opname}"))
        return f"{namespace}::{target._opname}.{target._overloadname}"
    if target in PY_OPS:
        return f"py::{PY_OPS[target]}"
    raise UnsupportedOpError(_unsupported(node, getattr(target, "__name__", str(target))))


def _unsupported(node: fx.Node, op: str) -> str:
    trace = node.meta.get("stack_trace", "").strip().splitlines()
    where = next((line.strip() for line in reversed(trace) if "File" in line), "unknown line")
    why = ""
    if "grouped_mm" in op:
        why = ("It is the expert product of a mixture-of-experts block that recognize_moe did "
               "not turn into dsc.moe: the block's routing or experts are of a kind dsc.moe does "
               "not express (grouped top-k, a routing scale or bias, shared experts inside the "
               "block). ")
    return (
        f"dsc cannot run op {op} (graph node {node.name}); it comes from {where}. {why}"
        "No dsc pass rewrites it and it has no implementation outside its library; "
        "file an issue with this message, or replace the module that uses it."
    )


def encode(value: Any, names: dict[fx.Node, str]) -> Any:
    if isinstance(value, fx.Node):
        return {"ref": names[value]}
    if isinstance(value, (list, tuple)):
        return [encode(v, names) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": "runtime"}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UnsupportedOpError(f"cannot encode argument {value!r} of type {type(value).__name__}")


def lower(gm: fx.GraphModule, name: str, kernels: dict[str, str] | None = None) -> Program:
    """The Program that executes `gm`; `kernels` maps node names to a chosen implementation op."""
    kernels = kernels or {}
    names: dict[fx.Node, str] = {}
    inputs: list[str] = []
    steps: list[dict[str, Any]] = []
    outputs: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if "dsc_weight" in node.meta:
                names[node] = "w:" + node.meta["dsc_weight"]
            else:
                names[node] = node.meta["dsc_input"]
                inputs.append(names[node])
        elif node.op == "call_function":
            names[node] = node.name
            op = kernels.get(node.name) or op_name(node)
            step = {
                "op": op,
                "args": encode(list(node.args), names),
                "kwargs": {k: encode(v, names) for k, v in node.kwargs.items()},
                "out": node.name,
            }
            if "dsc_free" in node.meta:  # memory_plan: buffers whose last reader this is
                step["free"] = list(node.meta["dsc_free"])
            steps.append(step)
        elif node.op == "output":
            result = node.args[0]
            flat = result if isinstance(result, (list, tuple)) else [result]
            outputs = [names[n] for n in flat]
    return Program(name=name, inputs=inputs, steps=steps, outputs=outputs,
                   kernels=dict(kernels))
