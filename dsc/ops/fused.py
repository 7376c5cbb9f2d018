"""Fused regions: `dsc::fused_region(Tensor[] inputs, str region_json) -> Tensor[]`.

The `fuse` pass cuts chains of pointwise ops, last-dimension reductions and GEMM epilogues out of
the graph; each becomes one node of this op, carrying its sub-program as JSON. Code generation
compiles the JSON into one Triton kernel (dsc/codegen/triton_codegen.py); the reference
implementation here interprets it with torch, op by op, so a region computes exactly what the
nodes it replaced computed. The JSON (version 1):

    {"version": 1,
     "kind": "pointwise" | "gemm",
     "num_inputs": 3,
     "values": [{"shape": ["s0", 1, 64], "dtype": "float32"}, ...],
     "ops": [{"op": "dsc::residual_add.default", "args": [{"ref": 0}, {"ref": 1}], "kwargs": {}},
             {"op": "dsc::rms_norm.default",
              "args": [{"ref": 3}, {"ref": 2}, 1e-06, {"dtype": "float32"}], "kwargs": {}}],
     "groups": [{"shape": ["s0", 1, 64]}],
     "outputs": [{"ref": 3, "group": 0, "order": [2, 1, 0]},
                 {"ref": 4, "group": 0, "order": [2, 1, 0]}]}

- `values` describes the inputs first, then one entry per op: value `num_inputs + j` is op j's
  result. A size is an int, or the printed sympy expression of a symbolic size ("s0").
- An argument is a constant (number, bool, string, null, list) or a tagged value: {"ref": i} (a
  value), {"dtype": "bfloat16"}, {"float": "inf"} (non-finite floats), {"memory_format": ...}.
- `groups` are the iteration spaces code generation launches (one program per row of each; the
  last dimension is the row); an output belongs to one group, whose shape it has. A region has
  several groups when independent chains were merged into one launch.
- `order` is the output's layout: dims from the fastest-varying (stride 1) to the slowest, the
  layout the replaced node had (views after the region rely on it).
- kind "gemm": ops[0] is aten.linear / aten.addmm and the rest is its epilogue.

Only the ops named in `REGION_OPS` may appear (resolved by name from that table: no eval, no
pickle); an output is always the result of an op, never an input or a view.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
from torch import Tensor

# The dsc ops a region may call, registered before any region runs.
import dsc.ops.mlp
import dsc.ops.norms
import dsc.ops.residual
import dsc.ops.rotary  # noqa: F401

__all__ = [
    "GEMM_OPS",
    "POINTWISE_OPS",
    "REDUCTION_OPS",
    "REGION_OPS",
    "REGION_VERSION",
    "fused_region",
    "parse_region",
    "run_region",
]

REGION_VERSION = 1

# Elementwise ops (broadcasting allowed), including the dsc ops that work row by row.
POINTWISE_OPS = frozenset(
    {
        "aten::add.Tensor",
        "aten::add.Scalar",
        "aten::sub.Tensor",
        "aten::sub.Scalar",
        "aten::mul.Tensor",
        "aten::mul.Scalar",
        "aten::div.Tensor",
        "aten::div.Scalar",
        "aten::neg.default",
        "aten::reciprocal.default",
        "aten::exp.default",
        "aten::log.default",
        "aten::sqrt.default",
        "aten::rsqrt.default",
        "aten::tanh.default",
        "aten::sigmoid.default",
        "aten::erf.default",
        "aten::abs.default",
        "aten::relu.default",
        "aten::silu.default",
        "aten::gelu.default",
        "aten::pow.Tensor_Scalar",
        "aten::maximum.default",
        "aten::minimum.default",
        "aten::_to_copy.default",
        "aten::clone.default",
        "dsc::rotary.default",
        "dsc::activation.default",
        "dsc::gated_activation.default",
        "dsc::residual_add.default",
    }
)
# Ops that reduce over (or normalise along) the last dimension; they need whole rows.
REDUCTION_OPS = frozenset(
    {
        "aten::mean.dim",
        "aten::sum.dim_IntList",
        "aten::amax.default",
        "aten::amin.default",
        "aten::_softmax.default",
        "aten::_log_softmax.default",
        "aten::softmax.int",
        "aten::log_softmax.int",
        "dsc::rms_norm.default",
        "dsc::layer_norm.default",
    }
)
# The head of a "gemm" region and the slices that split a stacked gate/up output.
GEMM_OPS = frozenset({"aten::linear.default", "aten::addmm.default", "aten::slice.Tensor"})
REGION_OPS = POINTWISE_OPS | REDUCTION_OPS | GEMM_OPS

_MEMORY_FORMATS = ("contiguous_format", "preserve_format", "channels_last")
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def _resolve(name: str):
    if name not in REGION_OPS:
        raise ValueError(f"fused region calls {name!r}, which is not a region op (REGION_OPS)")
    namespace, _, rest = name.partition("::")
    opname, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), opname), overload)


class _Ref:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _decode(value: Any, limit: int) -> Any:
    if isinstance(value, list):
        return [_decode(v, limit) for v in value]
    if isinstance(value, dict):
        if "ref" in value:
            index = value["ref"]
            if not isinstance(index, int) or not 0 <= index < limit:
                raise ValueError(f"fused region: reference {index!r} to a value not yet computed")
            return _Ref(index)
        if "dtype" in value:
            return _DTYPES[value["dtype"]]
        if "float" in value:
            return float(value["float"])
        if value.get("memory_format") in _MEMORY_FORMATS:
            return getattr(torch, value["memory_format"])
        raise ValueError(f"fused region: unknown tagged argument {value!r}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"fused region: argument {value!r} is not JSON data")


@functools.lru_cache(maxsize=4096)
def parse_region(region_json: str) -> tuple[int, tuple, tuple[int, ...]]:
    """(number of inputs, ((op, args, kwargs), ...), output value indices), validated."""
    doc = json.loads(region_json)
    if doc.get("version") != REGION_VERSION:
        raise ValueError(
            f"fused region version {doc.get('version')!r}; this dsc reads {REGION_VERSION}"
        )
    num_inputs = doc["num_inputs"]
    ops = []
    for j, op in enumerate(doc["ops"]):
        limit = num_inputs + j
        ops.append(
            (
                _resolve(op["op"]),
                _decode(op["args"], limit),
                {k: _decode(v, limit) for k, v in op.get("kwargs", {}).items()},
            )
        )
    outputs = tuple(o["ref"] for o in doc["outputs"])
    if len(set(outputs)) != len(outputs) or not all(
        num_inputs <= o < num_inputs + len(ops) for o in outputs
    ):
        raise ValueError("fused region outputs must be distinct op results")
    return num_inputs, tuple(ops), outputs


def _bind(value: Any, values: list) -> Any:
    if isinstance(value, _Ref):
        return values[value.index]
    if isinstance(value, list):
        return [_bind(v, values) for v in value]
    return value


def run_region(inputs: list[Tensor], region_json: str) -> list[Tensor]:
    """Interpret the region op by op (real or fake tensors alike)."""
    num_inputs, ops, outputs = parse_region(region_json)
    if len(inputs) != num_inputs:
        raise ValueError(f"fused region takes {num_inputs} inputs, got {len(inputs)}")
    values: list = list(inputs)
    for fn, args, kwargs in ops:
        values.append(fn(*_bind(args, values), **{k: _bind(v, values) for k, v in kwargs.items()}))
    return [values[o] for o in outputs]


@torch.library.custom_op("dsc::fused_region", mutates_args=())
def fused_region(inputs: list[Tensor], region_json: str) -> list[Tensor]:
    """Run a fused region's sub-program (the reference every generated kernel is tested against)."""
    # A custom op's outputs may not alias its inputs; the ops a region holds never return views
    # of an input except slice, which is never an output, so this copies nothing in practice.
    return [
        out.clone() if any(out is t or out.data_ptr() == t.data_ptr() for t in inputs) else out
        for out in run_region(inputs, region_json)
    ]


@fused_region.register_fake
def _(inputs, region_json):
    return run_region(inputs, region_json)
