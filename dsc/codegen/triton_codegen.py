"""Triton code generation for fused regions: one kernel source (kernel + launcher) per structure.

A `dsc::fused_region` node carries its sub-program as JSON (dsc/ops/fused.py). This module turns
it into the text of a Python module holding a `@triton.jit` kernel and a launcher function; the
plan stores the text under kernels/, and a step `kernel::region_<hash>` calls the launcher.

Pointwise regions. Each group of the region iterates over an output shape [d0, ..., dk, N]: one
program per row (the leading dims flattened, row-major), BLOCK lanes over the last dim. Sizes are
kernel arguments, read from the tensors at launch, so a symbolic size of the graph (a batch or
sequence length) needs nothing at compile time. Every input is broadcast to the group's shape by
the launcher (torch's expand: a broadcast dim gets stride 0) and addressed through its strides:

    row offset  = sum_j  i_j * stride_j          (i_j: the row's index in dim j, unravelled)
    address     = ptr + row offset + col * stride_last,    col < N  (the mask)

so transposed, sliced or broadcast inputs are read in place. Values live in fp32 registers; where
the graph holds a value in bf16/fp16 it is rounded to that type and back, which reproduces torch's
op-by-op results while accumulating in fp32. A reduction (mean, sum, max, softmax, the norms)
reduces the row in registers, so regions with one hold whole rows (BLOCK = next_pow2(N)); purely
elementwise regions tile the row (a second grid axis). Rotary reads x at the partner column
(col ± N/2) by evaluating x's expression there. Outputs are allocated in the layout the replaced
nodes had. Several groups (independent chains merged into one launch) split the program ids.

GEMM regions ("gemm" kind: linear/addmm plus the epilogue of dsc.kernels.gemm) call the hand-written
kernels: few rows (decode) go to the small-batch GEMM followed by a generated epilogue kernel,
more rows to `linear_fused` / `gated_linear`, which apply the epilogue to the accumulator.

Kernels are named by a hash of the region's structure (ops, constants, dtypes, ranks, layouts;
not sizes): the same structure gives the same name and the same source, whatever the sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import Any

import torch

from dsc.ops.fused import POINTWISE_OPS, REDUCTION_OPS
from dsc.plan import Program

__all__ = ["generate", "kernel_name", "normalize", "region_sources", "supports"]

# GEMM regions: up to EPILOGUE_ROWS rows the product runs on its own and one generated kernel
# applies the epilogue (decode: the weight stream dominates), except where the small-batch
# kernel takes the product and its epilogue together (`small_batch_wins`, the rule the unfused
# linear follows too). Past EPILOGUE_ROWS (small_batch_gemm.MAX_ROWS) the tiled GEMM applies the
# epilogue to its accumulator.
EPILOGUE_ROWS = 64
_ROUNDED = {"bfloat16": "tl.bfloat16", "float16": "tl.float16"}
_GEMM_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
_ROW_REDUCTIONS = (
    "aten::mean.dim",
    "aten::sum.dim_IntList",
    "aten::amax.default",
    "aten::amin.default",
)


# ---- structure --------------------------------------------------------------------------------
def normalize(region_json: str) -> dict:
    """The part of a region a kernel depends on: sizes dropped, ranks and dtypes kept."""
    doc = json.loads(region_json)
    return {
        "version": doc["version"],
        "kind": doc.get("kind", "pointwise"),
        "num_inputs": doc["num_inputs"],
        "values": [{"rank": len(v["shape"]), "dtype": v["dtype"]} for v in doc["values"]],
        "ops": [
            {"op": o["op"], "args": o["args"], "kwargs": o.get("kwargs", {})} for o in doc["ops"]
        ],
        "groups": [{"rank": len(g["shape"])} for g in doc["groups"]],
        "outputs": [
            {"ref": o["ref"], "group": o["group"], "order": o["order"]} for o in doc["outputs"]
        ],
    }


def _key(region: dict) -> str:
    return hashlib.sha256(json.dumps(region, sort_keys=True).encode()).hexdigest()[:16]


def kernel_name(region_json: str) -> str:
    """`region_<hash of the structure>`: equal structures share one kernel."""
    return "region_" + _key(normalize(region_json))


def _refs(value: Any) -> list[int]:
    if isinstance(value, dict) and "ref" in value:
        return [value["ref"]]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []


def _pow_ok(exponent: Any) -> bool:
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        return False
    # Integer powers become products (exact for negative bases); others exp(e * log(x)).
    return not float(exponent).is_integer() or abs(exponent) <= 8


def _row_values(region: dict) -> set[int]:
    """Values that are one number per row: reductions, and pointwise ops of those alone."""
    rows: set[int] = set()
    for j, op in enumerate(region["ops"]):
        refs = _refs(op["args"])
        if op["op"] in _ROW_REDUCTIONS or (
            op["op"] in POINTWISE_OPS and refs and all(r in rows for r in refs)
        ):
            rows.add(region["num_inputs"] + j)
    return rows


def _pointwise_ok(region: dict) -> bool:
    if any(o["ref"] in _row_values(region) for o in region["outputs"]):
        return False  # stored per row, not per element: not a region output
    for op in region["ops"]:
        name = op["op"]
        if name not in _EMITTERS:
            return False
        if name == "aten::pow.Tensor_Scalar" and not _pow_ok(op["args"][1]):
            return False
    return all(g["rank"] >= 1 for g in region["groups"])


_NORM_OPS = {"dsc::rms_norm.default": "rms", "dsc::layer_norm.default": "layer"}


def _prologue(region: dict) -> tuple[dict, dict] | None:
    """A GEMM region that starts with the norm of its input: (the norm's operands, the region
    without it). Value numbering is unchanged — the norm's result, value num_inputs, becomes the
    last input of the shorter region."""
    norm, n_in = region["ops"][0], region["num_inputs"]
    kind = _NORM_OPS[norm["op"]]
    args = norm["args"] + [None] * (4 - len(norm["args"]))
    if kind == "rms":
        x, w, eps, out_dtype = args
        b = None
        if isinstance(out_dtype, dict) and out_dtype.get("dtype") != region["values"][n_in]["dtype"]:
            return None
    else:
        x, w, b, eps = args
    if norm["kwargs"] or not isinstance(eps, (int, float)):
        return None
    refs = [x] + [a for a in (w, b) if a is not None]
    if any(not isinstance(a, dict) or a.get("ref", n_in) >= n_in for a in refs):
        return None
    if region["values"][x["ref"]]["dtype"] != region["values"][n_in]["dtype"]:
        return None
    operands = {"kind": kind, "x": x["ref"], "w": w["ref"] if w else None,
                "b": b["ref"] if b else None, "eps": float(eps)}
    return operands, {**region, "num_inputs": n_in + 1, "ops": region["ops"][1:]}


def _gemm_parts(region: dict, bare: bool = False) -> dict | None:
    """The GEMM region's pieces: head operands, activation, gating, residual, and a norm
    prologue; None if unknown. `bare`: a product with no epilogue is accepted (it has a
    prologue)."""
    ops = region["ops"]
    if ops and ops[0]["op"] in _NORM_OPS:
        found = _prologue(region)
        if found is None:
            return None
        norm, rest = found
        parts = _gemm_parts(rest, bare=True)
        n_in = region["num_inputs"]
        # The product must read the norm, and nothing else in the region may.
        if parts is None or parts["x"] != n_in or parts["residual"] == n_in or parts["transposed"]:
            return None
        return {**parts, "norm": norm, "region": rest}
    if not ops or ops[0]["op"] not in ("aten::linear.default", "aten::addmm.default"):
        return None
    head = ops[0]
    if head["kwargs"]:
        return None
    if head["op"] == "aten::linear.default":
        args = head["args"] + [None] * (3 - len(head["args"]))
        x, w, b = args
        transposed = False
    else:
        b, x, w = head["args"]
        transposed = True
    parts = {
        "x": x["ref"],
        "w": w["ref"],
        "bias": b["ref"] if b else None,
        "transposed": transposed,
        "activation": None,
        "gated": False,
        "residual": None,
        "norm": None,
        "region": region,
    }
    n_in = region["num_inputs"]
    rest = ops[1:]
    if [o["op"] for o in rest] == [
        "aten::slice.Tensor",
        "aten::slice.Tensor",
        "dsc::gated_activation.default",
    ]:
        gated = rest[2]
        if _refs(gated["args"][:2]) != [n_in + 1, n_in + 2] or gated["args"][2] not in (
            _GEMM_ACTIVATIONS
        ):
            return None
        parts.update(gated=True, activation=gated["args"][2])
        return parts
    last = n_in
    for op in rest:
        activation_first = parts["activation"] is None and parts["residual"] is None
        if (
            op["op"] == "dsc::activation.default"
            and activation_first
            and _refs(op["args"][:1]) == [last]
            and op["args"][1] in _GEMM_ACTIVATIONS
        ):
            parts["activation"] = op["args"][1]
        elif op["op"] == "dsc::residual_add.default" and parts["residual"] is None:
            refs = _refs(op["args"])
            if len(refs) != 2 or last not in refs:
                return None
            stream = refs[1] if refs[0] == last else refs[0]
            if stream >= n_in:
                return None
            parts["residual"] = stream
        else:
            return None
        last += 1
    return parts if rest or bare else None


def supports(region_json: str) -> bool:
    """True when code generation handles the region (else it runs as the reference op)."""
    try:
        region = normalize(region_json)
    except (KeyError, TypeError, ValueError):
        return False
    if region["kind"] == "gemm":
        return _gemm_parts(region) is not None
    return region["kind"] == "pointwise" and _pointwise_ok(region)


# ---- emitting the body of one group ---------------------------------------------------------
def _lit(value: Any) -> str:
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if value in (float("inf"), float("-inf")):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(value)


class _Arg:
    """A value operand inside the kernel: its fp32 variable and the dtype the graph gives it."""

    def __init__(self, var: str, dtype: str, ref: int):
        self.var, self.dtype, self.ref = var, dtype, ref

    def __str__(self) -> str:
        return self.var


def _promote(*dtypes: str) -> str:
    out = getattr(torch, dtypes[0])
    for d in dtypes[1:]:
        out = torch.promote_types(out, getattr(torch, d))
    return str(out).removeprefix("torch.")


class _Group:
    """Emits the statements that compute one group's outputs for one row."""

    def __init__(self, region: dict, g: int, indent: str, lines: list[str]):
        self.region = region
        self.g = g
        self.indent = indent
        self.lines = lines
        self.memo: dict[tuple[int, str], str] = {}
        self.partners: dict[str, str] = {}
        self.row_values = _row_values(region)
        # Names carry the group when there are several: Triton merges variables assigned in both
        # branches of an `if`, which needs them to have one type.
        self.sfx = f"_g{g}" if len(region["groups"]) > 1 else ""
        self.mask = f"mask{self.sfx}"

    def emit(self, line: str) -> None:
        self.lines.append(self.indent + line)

    def var(self, ref: int, col: str) -> str:
        if ref in self.row_values:
            col = "cols"  # one value per row: whatever column asks, the row is reduced whole
        key = (ref, col)
        if key in self.memo:
            return self.memo[key]
        n_in = self.region["num_inputs"]
        dtype = self.region["values"][ref]["dtype"]
        name = f"v{ref}{self.sfx}" if col == "cols" else f"v{ref}_{col}"  # col names carry sfx
        if ref < n_in:
            stride = f"g{self.g}_i{ref}_s{self.region['groups'][self.g]['rank'] - 1}"
            self.emit(
                f"{name} = tl.load(in{ref}_ptr + base{ref}{self.sfx} + {col} * {stride}, "
                f"mask={self.mask}, other=0.0).to(tl.float32)"
            )
        else:
            op = self.region["ops"][ref - n_in]
            args = self._decode(op["args"], col)
            kwargs = {k: self._decode(v, col) for k, v in op["kwargs"].items()}
            expr = _EMITTERS[op["op"]](self, col, dtype, *args, **kwargs)
            self.emit(f"{name} = {expr}")
            self.round(name, dtype)
        self.memo[key] = name
        return name

    def _decode(self, value: Any, col: str) -> Any:
        if isinstance(value, dict) and "ref" in value:
            ref = value["ref"]
            return _Arg(self.var(ref, col), self.region["values"][ref]["dtype"], ref)
        if isinstance(value, dict) and "dtype" in value:
            return value["dtype"]
        if isinstance(value, dict) and "float" in value:
            return float(value["float"])
        if isinstance(value, list):
            return [self._decode(v, col) for v in value]
        return value

    def temp(self, expr: str, dtype: str | None = None) -> str:
        name = f"t{len(self.lines)}"
        self.emit(f"{name} = {expr}")
        if dtype is not None:
            self.round(name, dtype)
        return name

    def round(self, name: str, dtype: str) -> None:
        if dtype in _ROUNDED:
            self.emit(f"{name} = {name}.to({_ROUNDED[dtype]}).to(tl.float32)")

    def partner(self, col: str) -> str:
        """The column rotate_half reads for `col`: col + N/2 in the first half, col - N/2 after."""
        if col not in self.partners:
            name = f"p{len(self.partners)}{self.sfx}"
            half = f"g{self.g}_n // 2"
            self.emit(f"{name} = tl.where({col} < {half}, {col} + {half}, {col} - {half})")
            self.partners[col] = name
        return self.partners[col]

    def masked(self, expr: str, fill: str = "0.0") -> str:
        return f"tl.where({self.mask}, {expr}, {fill})"

    @property
    def n(self) -> str:
        return f"g{self.g}_n"


def _value(x: Any) -> str:
    return str(x) if isinstance(x, _Arg) else _lit(x)


def _binary(symbol: str):
    def emit(ctx: _Group, col: str, result: str, a, b, alpha=1) -> str:
        rhs = _value(b) if alpha == 1 else f"({_lit(alpha)} * {_value(b)})"
        return f"{_value(a)} {symbol} {rhs}"

    return emit


def _unary(template: str):
    return lambda ctx, col, result, x, *rest, **kw: template.format(x=x)


def _tanh(x: str) -> str:
    return f"_tanh({x})"


def _activation_expr(kind: str, x: str) -> str:
    if kind == "silu":
        return f"{x} * tl.sigmoid({x})"
    if kind == "gelu":
        return f"0.5 * {x} * (1.0 + tl.math.erf({x} * 0.7071067811865476))"
    if kind == "gelu_tanh":
        return f"0.5 * {x} * (1.0 + _tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))"
    if kind == "relu":
        return f"tl.maximum({x}, 0.0)"
    raise ValueError(f"unknown activation {kind!r}")


def _pow(ctx: _Group, col: str, result: str, x, exponent) -> str:
    e = float(exponent)
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == -0.5:
        return f"tl.rsqrt({x})"
    if e.is_integer():
        k = int(abs(e))
        product = " * ".join([str(x)] * k) if k else "1.0"
        return f"1.0 / ({product})" if e < 0 else f"({product})"
    return f"tl.exp({_lit(e)} * tl.log({x}))"


def _gelu(ctx: _Group, col: str, result: str, x, approximate: str = "none") -> str:
    return _activation_expr("gelu_tanh" if approximate == "tanh" else "gelu", str(x))


def _reduce(kind: str):
    def emit(ctx: _Group, col: str, result: str, x, dims, keepdim=False, **_) -> str:
        if kind == "sum":
            return f"tl.sum({ctx.masked(x)}, axis=0)"
        if kind == "mean":
            return f"tl.sum({ctx.masked(x)}, axis=0) / {ctx.n}"
        fill = 'float("-inf")' if kind == "max" else 'float("inf")'
        return f"tl.{kind}({ctx.masked(x, fill)}, axis=0)"

    return emit


def _softmax(log: bool):
    def emit(ctx: _Group, col: str, result: str, x, dim, *_, **__) -> str:
        top = ctx.temp(f"tl.max({ctx.masked(x, _lit(float('-inf')))}, axis=0)")
        e = ctx.temp(ctx.masked(f"tl.exp({x} - {top})"))
        total = ctx.temp(f"tl.sum({e}, axis=0)")
        return f"{x} - {top} - tl.log({total})" if log else f"{e} / {total}"

    return emit


def _rms_norm(ctx: _Group, col: str, result: str, x, weight, eps, out_dtype) -> str:
    # Mirrors dsc.ops.norms.rms_norm: fp32 statistics, normalised value rounded to x's dtype
    # before the weight multiplies it.
    mean_sq = ctx.temp(f"tl.sum({ctx.masked(f'{x} * {x}')}, axis=0) / {ctx.n}")
    y = ctx.temp(f"{x} * tl.rsqrt({mean_sq} + {_lit(eps)})", x.dtype)
    if weight is not None:
        y = ctx.temp(f"{weight} * {y}", _promote(weight.dtype, x.dtype))
    return y


def _layer_norm(ctx: _Group, col: str, result: str, x, weight, bias, eps) -> str:
    mean = ctx.temp(f"tl.sum({ctx.masked(x)}, axis=0) / {ctx.n}")
    centred = ctx.temp(ctx.masked(f"{x} - {mean}"))
    var = ctx.temp(f"tl.sum({centred} * {centred}, axis=0) / {ctx.n}")
    y = ctx.temp(f"{centred} * tl.rsqrt({var} + {_lit(eps)})", x.dtype)
    current = x.dtype
    if weight is not None:
        current = _promote(current, weight.dtype)
        y = ctx.temp(f"{y} * {weight}", current)
    if bias is not None:
        y = ctx.temp(f"{y} + {bias}", _promote(current, bias.dtype))
    return y


def _rotary(ctx: _Group, col: str, result: str, x, cos, sin) -> str:
    # x * cos + rotate_half(x) * sin; rotate_half(x)[c] = -x[c + N/2] (c < N/2), x[c - N/2] after.
    computed = _promote(x.dtype, cos.dtype)
    partner = ctx.var(x.ref, ctx.partner(col))
    half = f"{ctx.n} // 2"
    rotated = ctx.temp(f"tl.where({col} < {half}, -{partner}, {partner})")
    first = ctx.temp(f"{x} * {cos}", computed)
    second = ctx.temp(f"{rotated} * {sin}", _promote(x.dtype, sin.dtype))
    return f"{first} + {second}"


def _activation(ctx: _Group, col: str, result: str, x, kind) -> str:
    return _activation_expr(kind, str(x))


def _gated(ctx: _Group, col: str, result: str, gate, up, kind) -> str:
    activated = ctx.temp(_activation_expr(kind, str(gate)), gate.dtype)
    return f"{activated} * {up}"


# op name -> emitter(ctx, col, result dtype, *args, **kwargs) -> the fp32 expression of the result
_EMITTERS = {
    "aten::add.Tensor": _binary("+"),
    "aten::add.Scalar": _binary("+"),
    "aten::sub.Tensor": _binary("-"),
    "aten::sub.Scalar": _binary("-"),
    "aten::mul.Tensor": _binary("*"),
    "aten::mul.Scalar": _binary("*"),
    "aten::div.Tensor": _binary("/"),
    "aten::div.Scalar": _binary("/"),
    "aten::neg.default": _unary("-{x}"),
    "aten::reciprocal.default": _unary("1.0 / {x}"),
    "aten::exp.default": _unary("tl.exp({x})"),
    "aten::log.default": _unary("tl.log({x})"),
    "aten::sqrt.default": _unary("tl.sqrt({x})"),
    "aten::rsqrt.default": _unary("tl.rsqrt({x})"),
    "aten::tanh.default": _unary("_tanh({x})"),
    "aten::sigmoid.default": _unary("tl.sigmoid({x})"),
    "aten::erf.default": _unary("tl.math.erf({x})"),
    "aten::abs.default": _unary("tl.abs({x})"),
    "aten::relu.default": _unary("tl.maximum({x}, 0.0)"),
    "aten::silu.default": _unary("{x} * tl.sigmoid({x})"),
    "aten::gelu.default": _gelu,
    "aten::pow.Tensor_Scalar": _pow,
    "aten::maximum.default": lambda ctx, col, result, a, b: f"tl.maximum({a}, {b})",
    "aten::minimum.default": lambda ctx, col, result, a, b: f"tl.minimum({a}, {b})",
    "aten::_to_copy.default": _unary("{x}"),  # the cast is the rounding every value gets
    "aten::clone.default": _unary("{x}"),
    "aten::mean.dim": _reduce("mean"),
    "aten::sum.dim_IntList": _reduce("sum"),
    "aten::amax.default": _reduce("max"),
    "aten::amin.default": _reduce("min"),
    "aten::_softmax.default": _softmax(log=False),
    "aten::_log_softmax.default": _softmax(log=True),
    "aten::softmax.int": _softmax(log=False),
    "aten::log_softmax.int": _softmax(log=True),
    "dsc::rms_norm.default": _rms_norm,
    "dsc::layer_norm.default": _layer_norm,
    "dsc::rotary.default": _rotary,
    "dsc::activation.default": _activation,
    "dsc::gated_activation.default": _gated,
    "dsc::residual_add.default": _binary("+"),
}
assert set(_EMITTERS) == POINTWISE_OPS | REDUCTION_OPS, "every region op needs an emitter"


# ---- pointwise kernel + launcher --------------------------------------------------------------
_HELPERS = '''
@triton.jit
def _tanh(x):
    # tanh from exp(-2|x|) <= 1: no overflow, and only functions every backend provides.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0.0, t, -t)


def _expand(t, shape):
    """t broadcast to `shape` (right-aligned) as a view: broadcast dims get stride 0."""
    return t[(None,) * (len(shape) - t.dim())].expand(shape)


def _empty(shape, order, dtype, device):
    """An output of `shape` laid out with dims `order` (fastest first), like the graph's value."""
    outer = [shape[d] for d in reversed(order)]
    position = {d: len(order) - 1 - i for i, d in enumerate(order)}
    return torch.empty(outer, dtype=dtype, device=device).permute(
        [position[d] for d in range(len(shape))]
    )
'''


def _group_refs(region: dict, g: int) -> list[int]:
    """Input indices group g reads, in first-use order (what its launcher broadcasts)."""
    n_in = region["num_inputs"]
    seen: list[int] = []
    stack = [o["ref"] for o in region["outputs"] if o["group"] == g]
    visited: set[int] = set()
    while stack:
        ref = stack.pop(0)
        if ref in visited:
            continue
        visited.add(ref)
        if ref < n_in:
            seen.append(ref)
        else:
            stack.extend(_refs(region["ops"][ref - n_in]["args"]))
            stack.extend(_refs(region["ops"][ref - n_in]["kwargs"]))
    return sorted(seen)


def _pointwise(region: dict, fn: str, kernel: str) -> list[str]:
    """Source lines of a pointwise region's kernel and its launcher `fn(inputs)`."""
    n_in = region["num_inputs"]
    groups = range(len(region["groups"]))
    whole_rows = any(op["op"] in REDUCTION_OPS for op in region["ops"])
    reads = {g: _group_refs(region, g) for g in groups}
    outs = {g: [k for k, o in enumerate(region["outputs"]) if o["group"] == g] for g in groups}
    ranks = {g: region["groups"][g]["rank"] for g in groups}

    params = [f"in{i}_ptr" for i in range(n_in)] + [
        f"out{k}_ptr" for k in range(len(region["outputs"]))
    ]
    for g in groups:
        params += [f"g{g}_start", f"g{g}_rows", f"g{g}_n"]
        params += [f"g{g}_d{j}" for j in range(1, ranks[g] - 1)]
        params += [f"g{g}_i{i}_s{j}" for i in reads[g] for j in range(ranks[g])]
        params += [f"g{g}_o{k}_s{j}" for k in outs[g] for j in range(ranks[g])]

    lines = ["@triton.jit", f"def {kernel}("]
    lines += [f"    {p}," for p in params]
    lines += ["    BLOCK: tl.constexpr,", "    USE_PDL: tl.constexpr,", "):"]
    # The kernel boundary with the previous launch (dsc.kernels.pdl) comes before any load.
    lines.append("    pdl.wait_and_release(USE_PDL)")
    lines.append("    pid = tl.program_id(0)")
    if whole_rows:
        lines.append("    # One program owns a whole row: reductions happen in registers.")
        lines.append("    cols = tl.arange(0, BLOCK)")
    else:
        lines.append("    # Elementwise only: the row is tiled over the second grid axis.")
        lines.append("    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)")
    for g in groups:
        indent = "    "
        if len(region["groups"]) > 1:
            keyword = "if" if g == 0 else ("elif" if g < len(region["groups"]) - 1 else "else")
            condition = f" pid < g{g + 1}_start" if keyword != "else" else ""
            lines.append(f"    {keyword}{condition}:")
            indent = "        "
        body = _Group(region, g, indent, lines)
        row, sfx = f"row{body.sfx}", body.sfx
        body.emit(f"{row} = pid - g{g}_start")
        body.emit(f"{body.mask} = cols < g{g}_n")
        rank = ranks[g]
        # Unravel the row into its index along each leading dim (row-major).
        index = {}
        for j in reversed(range(rank - 1)):
            if j == 0:
                index[j] = row
            else:
                index[j] = f"i{j}{sfx}"
                body.emit(f"{index[j]} = ({row} % g{g}_d{j}).to(tl.int64)")
                body.emit(f"{row} = {row} // g{g}_d{j}")
        if rank > 1:
            body.emit(f"{row} = {row}.to(tl.int64)")
        for i in reads[g]:
            terms = [f"{index[j]} * g{g}_i{i}_s{j}" for j in range(rank - 1)]
            body.emit(f"base{i}{sfx} = {' + '.join(terms) if terms else '0'}")
        body.emit(
            "# Compute the outputs from the inputs (loads happen where values are first used)."
        )
        for k in outs[g]:
            ref = region["outputs"][k]["ref"]
            value = body.var(ref, "cols")
            terms = [f"{index[j]} * g{g}_o{k}_s{j}" for j in range(rank - 1)]
            offset = " + ".join(terms + [f"cols * g{g}_o{k}_s{rank - 1}"])
            body.emit(f"# Store output {k} in its dtype.")
            body.emit(
                f"tl.store(out{k}_ptr + {offset}, {value}.to(out{k}_ptr.dtype.element_ty), "
                f"mask={body.mask})"
            )

    lines += ["", "", f"def {fn}(inputs, region_json=None):"]
    lines.append(f'    """Launch {kernel}; returns the region\'s outputs."""')
    lines.append(f"    ({''.join(f'in{i}, ' for i in range(n_in))}) = inputs")
    lines.append("    device = in0.device")
    for g in groups:
        reads_g = ", ".join(f"in{i}.shape" for i in reads[g])
        lines.append(f"    # Group {g} iterates over the broadcast of the inputs it reads.")
        lines.append(f"    g{g}_shape = torch.broadcast_shapes({reads_g})")
        for k in outs[g]:
            out = region["outputs"][k]
            dtype = region["values"][out["ref"]]["dtype"]
            lines.append(f"    out{k} = _empty(g{g}_shape, {out['order']}, torch.{dtype}, device)")
        lines.append(f"    g{g}_rows = math.prod(g{g}_shape[:-1])")
    lines.append(f"    n = max([{', '.join(f'g{g}_shape[-1]' for g in groups)}])")
    lines.append(f"    rows = {' + '.join(f'g{g}_rows' for g in groups)}")
    outputs = ", ".join(f"out{k}" for k in range(len(region["outputs"])))
    lines.append("    if rows == 0 or n == 0:")
    lines.append(f"        return [{outputs}]")
    if whole_rows:
        lines.append("    BLOCK = triton.next_power_of_2(n)")
        lines.append("    grid = (rows,)")
        lines.append("    warps = max(1, min(16, BLOCK // 256))")
    else:
        lines.append("    BLOCK = min(triton.next_power_of_2(n), 1024)")
        lines.append("    grid = (rows, triton.cdiv(n, BLOCK))")
        lines.append("    warps = max(1, min(8, BLOCK // 128))")
    args = [f"in{i}" for i in range(n_in)] + [f"out{k}" for k in range(len(region["outputs"]))]
    start = "0"
    for g in groups:
        args += [start, f"g{g}_rows", f"g{g}_shape[-1]"]
        args += [f"g{g}_shape[{j}]" for j in range(1, ranks[g] - 1)]
        args += [f"*_expand(in{i}, g{g}_shape).stride()" for i in reads[g]]
        args += [f"*out{k}.stride()" for k in outs[g]]
        start = f"{start} + g{g}_rows" if start != "0" else f"g{g}_rows"
    lines.append(f"    {kernel}[grid](")
    lines += [f"        {a}," for a in args]
    lines += ["        BLOCK=BLOCK,", "        num_warps=warps,"]
    lines += ["        **pdl.launch_options(device),", "    )"]
    lines.append(f"    return [{outputs}]")
    return lines


# ---- GEMM regions ---------------------------------------------------------------------------
def _renumber(value: Any, remap: dict[int, int]) -> Any:
    if isinstance(value, dict) and "ref" in value:
        return {"ref": remap[value["ref"]]}
    if isinstance(value, list):
        return [_renumber(v, remap) for v in value]
    return value


def _epilogue_region(region: dict, parts: dict) -> tuple[dict, list[str]]:
    """The epilogue as a pointwise region over the GEMM result ([rows, N]), and the launcher's
    expressions for its inputs."""
    n_in = region["num_inputs"]
    dtype = region["values"][n_in]["dtype"]
    if parts["gated"]:
        gated = region["ops"][3]
        values = [{"rank": 2, "dtype": dtype}] * 2 + [
            {"rank": 2, "dtype": region["values"][n_in + 3]["dtype"]}
        ]
        ops = [
            {"op": gated["op"], "args": [{"ref": 0}, {"ref": 1}, gated["args"][2]], "kwargs": {}}
        ]
        sub = {
            "num_inputs": 2,
            "values": values,
            "ops": ops,
            "groups": [{"rank": 2}],
            "outputs": [{"ref": 2, "group": 0, "order": [1, 0]}],
        }
        return sub, ["y[:, :n]", "y[:, n:]"]
    inputs = [n_in]  # original value index of each epilogue input
    feeds = ["y"]
    if parts["residual"] is not None:
        inputs.append(parts["residual"])
        feeds.append("residual")
    remap = {orig: i for i, orig in enumerate(inputs)}
    values = [{"rank": 2, "dtype": region["values"][orig]["dtype"]} for orig in inputs]
    ops = []
    for j, op in enumerate(region["ops"][1:], start=1):
        ops.append({"op": op["op"], "args": _renumber(op["args"], remap), "kwargs": {}})
        remap[n_in + j] = len(values)
        values.append({"rank": 2, "dtype": region["values"][n_in + j]["dtype"]})
    sub = {
        "num_inputs": len(inputs),
        "values": values,
        "ops": ops,
        "groups": [{"rank": 2}],
        "outputs": [{"ref": len(values) - 1, "group": 0, "order": [1, 0]}],
    }
    return sub, feeds


def _gemm(region: dict, fn: str, kernel: str) -> tuple[list[str], list[str]]:
    """(imports, source lines) of a GEMM region's launcher and its epilogue kernel."""
    parts = _gemm_parts(region)
    sub, feeds = _epilogue_region(parts["region"], parts)
    lines = _pointwise(sub, f"_{fn}_epilogue", f"{kernel}_epilogue")
    act = repr(parts["activation"])
    bias = f"inputs[{parts['bias']}]" if parts["bias"] is not None else "None"
    norm = parts["norm"]
    lines += ["", "", f"def {fn}(inputs, region_json=None):"]
    lines.append('    """The GEMM and its epilogue; returns [result] shaped like x[..., N]."""')
    x_ref = norm["x"] if norm else parts["x"]
    lines.append(f"    x, weight, bias = inputs[{x_ref}], inputs[{parts['w']}], {bias}")
    if parts["transposed"]:
        lines.append("    weight = weight.t()  # addmm's weight is [K, N]; the kernels read [N, K]")
    lines.append("    lead = x.shape[:-1]")
    lines.append("    x2 = x.reshape(-1, x.shape[-1])")
    lines.append("    n = weight.shape[0] // 2" if parts["gated"] else "    n = weight.shape[0]")
    if parts["residual"] is not None:
        lines.append(f"    residual = inputs[{parts['residual']}].reshape(-1, n)")
    lines.append("    rows = x2.shape[0]")
    lines.append("    if rows == 0:")
    lines.append("        return [x.new_empty((*lead, n))]")
    small_batch_args = [f"activation={act}"]
    if parts["gated"]:
        small_batch_args.append("gated=True")
    if parts["residual"] is not None:
        small_batch_args.append("residual=residual")
    normalise = None  # the norm as its own kernel, where the GEMM cannot take it as a prologue
    if norm:
        nw = f"inputs[{norm['w']}]" if norm["w"] is not None else "None"
        nb = f"inputs[{norm['b']}]" if norm["b"] is not None else "None"
        small_batch_args.append(f"norm=({norm['kind']!r}, {nw}, {nb}, {norm['eps']!r})")
        normalise = (f"        x2 = rms_norm(x2.contiguous(), {nw}, {norm['eps']!r})"
                     if norm["kind"] == "rms" else
                     f"        x2 = layer_norm(x2.contiguous(), {nw}, {nb}, {norm['eps']!r})")
    lines.append(f"    if rows <= {EPILOGUE_ROWS} and small_batch_wins(rows, weight.shape[0]):")
    lines.append("        # Decode-sized: one kernel streams the weight and applies the epilogue to its sums.")
    lines.append(f"        out = linear_small_batch(x2, weight, bias, {', '.join(small_batch_args)})")
    lines.append(f"    elif rows <= {EPILOGUE_ROWS}:")
    lines.append("        # cuBLAS measured faster here; then one small epilogue kernel.")
    if normalise:
        lines.append(normalise)
    lines.append("        y = torch.nn.functional.linear(x2, weight, bias)")
    if parts["gated"] or parts["activation"] or parts["residual"] is not None:
        lines.append(f"        (out,) = _{fn}_epilogue([{', '.join(feeds)}])")
    else:  # a prologue and no epilogue
        lines.append("        out = y")
    lines.append("    else:")
    lines.append("        # Tiled GEMM with the epilogue applied to the fp32 accumulator.")
    if normalise:
        lines.append(normalise)
    if parts["gated"]:
        lines.append(f"        out = gated_linear(x2, weight, {act})")
    else:
        residual = "residual" if parts["residual"] is not None else "None"
        lines.append(f"        out = linear_fused(x2, weight, bias, {act}, {residual})")
    lines.append("    return [out.view(*lead, n)]")
    imports = [
        "from dsc.kernels.gemm import gated_linear, linear_fused",
        "from dsc.kernels.norms import layer_norm, rms_norm",
        "from dsc.kernels.small_batch_gemm import linear_small_batch, small_batch_wins",
    ]
    return imports, lines


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and "ref" in value:
        return f"v{value['ref']}"
    if isinstance(value, dict):
        return str(next(iter(value.values())))
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return repr(value).replace("\\", "/").replace('"', "'")


def _describe(region: dict) -> list[str]:
    n_in = region["num_inputs"]
    lines = []
    for j, op in enumerate(region["ops"]):
        args = ", ".join(_fmt(a) for a in op["args"])
        lines.append(f"    v{n_in + j} = {op['op']}({args})")
    outs = ", ".join(f"v{o['ref']}" for o in region["outputs"])
    return lines + [f"    -> {outs}"]


def generate(region_json: str) -> str:
    """The Python source of the region's kernel module; its launcher is named kernel_name()."""
    region = normalize(region_json)
    if not supports(region_json):
        raise ValueError("code generation does not support this region; check supports() first")
    fn = "region_" + _key(region)
    kernel = f"_{fn}_kernel"
    imports = []
    if region["kind"] == "gemm":
        imports, body = _gemm(region, fn, kernel)
    else:
        body = _pointwise(region, fn, kernel)
    header = [
        '"""Generated by dsc.codegen.triton_codegen for a fused region (do not edit).',
        "",
        f"Region ({region['kind']}), inputs v0..v{region['num_inputs'] - 1}:",
        *_describe(region),
        '"""',
        "",
        "import math",
        "",
        "import torch",
        "import triton",
        "import triton.language as tl",
        "",
        "from dsc.kernels import pdl",
        *imports,
    ]
    return "\n".join(header) + "\n\n" + _HELPERS + "\n\n" + "\n".join(body) + "\n"


def region_sources(programs: Iterable[Program]) -> dict[str, str]:
    """kernel name -> source for every `kernel::region_*` step of the programs."""
    sources: dict[str, str] = {}
    for program in programs:
        for step in program.steps:
            op = step["op"]
            if op.startswith("kernel::region_") and op[len("kernel::") :] not in sources:
                sources[op[len("kernel::") :]] = generate(step["args"][1])
    return sources
