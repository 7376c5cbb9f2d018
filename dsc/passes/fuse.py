"""fuse: Deep-Fusion. Chains of pointwise ops and row reductions become `dsc::fused_region` nodes.

Matches, pointwise regions (any connected chain of ops that work element by element or row by
row: the aten ops of `dsc.ops.fused.POINTWISE_OPS` and `REDUCTION_OPS` — arithmetic, casts,
clones, activations, reductions and softmax over the last dim — and dsc.rms_norm / layer_norm /
rotary / activation / gated_activation / residual_add):

    h = dsc.residual_add(x, proj)
    y = dsc.rms_norm(h, w, eps, dtype)

Rewrite to (one node; one kernel after code generation):

    r = dsc.fused_region([x, proj, w], '{"ops": [residual_add, rms_norm], ...}')
    h = r[0];  y = r[1]

Matches, GEMM epilogues (what `dsc.kernels.gemm` applies to its accumulator):

    a = dsc.gated_activation(slice(up, -1, 0, N), slice(up, -1, N, 2N), kind)  up = linear(x, W)
    a = dsc.activation(linear(x, W, b), kind)       (or addmm; last-dim-keeping views between)
    a = dsc.residual_add(s, linear(x, W, b))         (optionally after the activation)

and GEMM prologues (an input norm read by nothing but the linear):

    a = linear(dsc.rms_norm(h, g, eps, dtype), W)      (or dsc.layer_norm; then any epilogue)

Rewrite to:

    a = dsc.fused_region([x, W, (b), (s)], '{"kind": "gemm", "ops": [linear, ...], ...}')[0]
    a = dsc.fused_region([h, g, W], '{"kind": "gemm", "ops": [rms_norm, linear, ...], ...}')[0]

Cost rule (what joins a region, and what stays out):
  1. One iteration space per region: its full-size values share one shape, whose last dim is the
     row a program owns; a reduction leaves one value per row. An op joins the region of an
     operand when its result has that shape (or is one value per row of it) and joining makes no
     cycle (no path that leaves the region and comes back into it).
  2. Never duplicate expensive work: a value a region computes that something outside it also
     reads becomes an extra output of the region (computed once, written once). The exception is
     a cheap pointwise op of one region input (a cast, clone, negation, scaling by a constant): a
     consumer in another region recomputes it from that input, which reads as many bytes as
     reading the value would and saves writing it.
  3. Stop at GEMMs, attention, collectives, embeddings, views and anything else: their results
     are region inputs; views stay graph nodes (they move no data).
  4. Fold into a GEMM only what a registered GEMM kernel applies to its accumulator:
     `linear_fused` (bias, activation, residual) and `gated_linear` (act(gate) * up), and as a
     prologue the input norm the small-batch kernel applies to its rows (at larger row counts
     the region's launcher runs the norm kernel first; DSC_NORM_PROLOGUE=0 keeps the norm a
     kernel of its own). A residual add whose sum feeds a norm
     that stays a kernel of its own joins that norm's region; when the norm becomes the next
     GEMM's prologue, the add goes into the producing GEMM's epilogue instead — a Llama layer is
     then [norm + QKV], rotary, attention, [O + add], [norm + gate/up + SiLU], [down + add].
  5. Independent regions with the same row length whose outputs meet at one consumer (the query
     and key rotary of an attention) launch as one kernel, one group of programs each.
  6. A region with a reduction holds whole rows in registers: rows longer than 65536 stay
     unfused. Only float32 / bfloat16 / float16 values are fused.

Labels: node.meta["dsc_region"] names the paper's region a node belongs to, where the structure
matches: "norm_qkv" (the norm feeding the QKV projection, and that projection), "attention" (the
rotary region and the attention), "up_act" (the norm feeding the up projection, and the up
projection with its activation), "down_residual" (the out/down projections; a region holding a
residual add no other label claimed). By rule 4 the residual add of a block runs in the kernel of
the norm that reads its sum, so that region carries the norm's label.

Does not match: integer or float64 values, ops with symbolic scalar operands, reductions over
another dimension or without keepdim, softmax over another dimension, tensors a GEMM kernel cannot
take (a 3-D weight, mixed dtypes).
Ordering: after recognition (it fuses dsc ops), kv_cache, tensor_parallel (collectives bound
regions) and merge_projections (the gated epilogue reads the merged gate/up GEMM); last pass
before kernel selection. Only CUDA pipelines run it (pipelines.backend).
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from dsc.ops.fused import POINTWISE_OPS, REDUCTION_OPS, REGION_VERSION
from dsc.ops.mlp import ACTIVATIONS
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import fake_mode_of, is_op, only_user, set_meta, tensor_meta

__all__ = ["LABELS", "fuse", "region_nodes"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc

LABELS = ("norm_qkv", "attention", "up_act", "down_residual")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_MAX_ROW = 65536  # elements of a row one program holds for a reduction (dsc.kernels.norms too)
_GEMM_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")  # what dsc.kernels.gemm applies
_ROW_REDUCTIONS = (
    "aten::mean.dim",
    "aten::sum.dim_IntList",
    "aten::amax.default",
    "aten::amin.default",
)
_SCALED = (
    "aten::add.Tensor",
    "aten::sub.Tensor",
    "aten::mul.Tensor",
    "aten::div.Tensor",
    "aten::add.Scalar",
    "aten::sub.Scalar",
    "aten::mul.Scalar",
    "aten::div.Scalar",
)
# Cheap pointwise ops of one tensor operand that a second region may recompute (rule 2).
_CHEAP = ("aten::_to_copy.default", "aten::clone.default", "aten::neg.default", *_SCALED)
_VIEWS = (
    aten.view,
    aten._unsafe_view,
    aten.reshape,
    aten.unsqueeze,
    aten.squeeze,
    aten.transpose,
    aten.permute,
    aten.expand,
    aten.slice,
    aten.select,
    aten.alias,
    aten.t,
    aten.split,
    aten.split_with_sizes,
    operator.getitem,
)
_NORMS = (dsc_ops.rms_norm, dsc_ops.layer_norm, aten.layer_norm)
_ATTENTION = (dsc_ops.attention, dsc_ops.cached_attention, dsc_ops.rotary_cached_attention,
              dsc_ops.qkv_cached_attention)


# ---- what a node is ------------------------------------------------------------------------
def _name(node: Any) -> str | None:
    target = getattr(node, "target", None)
    if isinstance(node, fx.Node) and isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._opname}.{target._overloadname}"
    return None


def _expr(size: Any) -> sympy.Expr:
    return sympy.Integer(size) if isinstance(size, int) else sympy.sympify(size.node.expr)


def _shape(node: fx.Node) -> tuple[sympy.Expr, ...]:
    return tuple(_expr(s) for s in tensor_meta(node).shape)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(sympy.expand(x - y) == 0 for x, y in zip(a, b))


def _row(space: tuple) -> tuple:
    return (*space[:-1], sympy.Integer(1)) if space else space


def _float_tensor(node: Any) -> bool:
    val = tensor_meta(node)
    return val is not None and val.dtype in _FLOATS


def _constant(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_constant(v) for v in value)
    return value is None or isinstance(
        value, (bool, int, float, str, torch.dtype, torch.memory_format)
    )


def _last_dim(node: fx.Node, dims: Any) -> bool:
    rank = tensor_meta(node).dim()
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and dims[0] in (-1, rank - 1)


def _short_rows(node: fx.Node) -> bool:
    size = tensor_meta(node).shape[-1] if tensor_meta(node).dim() else 1
    return not isinstance(size, int) or size <= _MAX_ROW


def _even_rows(node: fx.Node) -> bool:
    size = tensor_meta(node).shape[-1]
    return not isinstance(size, int) or size % 2 == 0


def _reduction_ok(node: fx.Node) -> bool:
    x = node.args[0]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return (
        keepdim is True
        and dims is not None
        and _last_dim(x, dims)
        and _short_rows(x)
        and "dtype" not in node.kwargs
    )


def _softmax_ok(node: fx.Node) -> bool:
    # _softmax(x, dim, half_to_float) or softmax.int(x, dim, dtype=None)
    x, dim, *rest = node.args
    flag = rest[0] if rest else node.kwargs.get("dtype", node.kwargs.get("half_to_float"))
    return _last_dim(x, dim) and flag in (False, None) and _short_rows(x)


# op name -> extra condition on the node (beyond float tensors and constant scalars)
_CHECKS = {
    **{name: _reduction_ok for name in _ROW_REDUCTIONS},
    "aten::_softmax.default": _softmax_ok,
    "aten::_log_softmax.default": _softmax_ok,
    "aten::softmax.int": _softmax_ok,
    "aten::log_softmax.int": _softmax_ok,
    "aten::_to_copy.default": lambda n: set(n.kwargs) <= {"dtype", "memory_format"},
    "aten::clone.default": lambda n: set(n.kwargs) <= {"memory_format"},
    "aten::pow.Tensor_Scalar": lambda n: isinstance(n.args[1], (int, float)),
    "aten::gelu.default": lambda n: n.kwargs.get("approximate", "none") in ("none", "tanh"),
    "dsc::activation.default": lambda n: n.args[1] in ACTIVATIONS,
    "dsc::gated_activation.default": lambda n: n.args[2] in ACTIVATIONS,
    "dsc::rotary.default": lambda n: _even_rows(n.args[0]),  # rotate_half splits rows in two
    "dsc::rms_norm.default": lambda n: _short_rows(n.args[0]),
    "dsc::layer_norm.default": lambda n: _short_rows(n.args[0]),
}


def _fusible(node: fx.Node) -> bool:
    name = _name(node)
    if name not in POINTWISE_OPS and name not in REDUCTION_OPS:
        return False
    if not _float_tensor(node):
        return False
    for arg in (*node.args, *node.kwargs.values()):
        flat = arg if isinstance(arg, (list, tuple)) else [arg]
        for a in flat:
            if isinstance(a, fx.Node):
                if not _float_tensor(a):
                    return False  # a symbolic scalar, an integer mask, ...
            elif not _constant(a):
                return False
    check = _CHECKS.get(name)
    return check is None or bool(check(node))


def _space(node: fx.Node) -> tuple:
    """The iteration space of a region that starts at `node`."""
    if _name(node) in _ROW_REDUCTIONS:
        return _shape(node.args[0])
    return _shape(node)


def _fits(node: fx.Node, space: tuple) -> bool:
    """True when `node` can run in a region iterating over `space` (rule 1)."""
    name = _name(node)
    if name in _ROW_REDUCTIONS:
        return _same(_shape(node.args[0]), space)
    out = _shape(node)
    if name in REDUCTION_OPS:  # softmax and norms produce full rows
        return _same(out, space)
    return _same(out, space) or (len(space) > 0 and _same(out, _row(space)))


# ---- regions -------------------------------------------------------------------------------
@dataclass(eq=False)
class _Region:
    nodes: set[fx.Node]
    spaces: list[tuple]  # one per group
    group_of: dict[fx.Node, int] = field(default_factory=dict)
    kind: str = "pointwise"
    views_after: list[fx.Node] = field(default_factory=list)  # gemm: views re-applied after

    @property
    def space(self) -> tuple:
        return self.spaces[0]


class _Graph:
    """Order and reachability queries over the graph being fused."""

    def __init__(self, graph: fx.Graph):
        self.order = {n: i for i, n in enumerate(graph.nodes)}

    def reaches(self, sources: set[fx.Node], start: fx.Node) -> bool:
        """True when a node of `sources` is `start` or one of its ancestors."""
        low = min(self.order[s] for s in sources)
        seen, stack = set(), [start]
        while stack:
            n = stack.pop()
            if n in sources:
                return True
            if n in seen or self.order.get(n, -1) < low:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return False

    def closed(self, members: set[fx.Node]) -> bool:
        """True when no path leaves `members` and comes back (the set can be one node)."""
        for m in members:
            for a in m.all_input_nodes:
                if a not in members and self.reaches(members, a):
                    return False
        return True

    def independent(self, a: set[fx.Node], b: set[fx.Node]) -> bool:
        return not any(
            self.reaches(a, x) for m in b for x in m.all_input_nodes if x not in b
        ) and not any(self.reaches(b, x) for m in a for x in m.all_input_nodes if x not in a)


def _gemm_head(node: Any) -> bool:
    """linear(x, W, b) / addmm(b, x, W) that the GEMM kernels can take."""
    if is_op(node, aten.linear) and not node.kwargs and len(node.args) in (2, 3):
        x, w, b = (*node.args, None)[:3]
    elif is_op(node, aten.addmm) and not node.kwargs and len(node.args) == 3:
        b, x, w = node.args
        if tensor_meta(x) is None or tensor_meta(x).dim() != 2:
            return False
    else:
        return False
    vals = [tensor_meta(t) for t in (x, w) if isinstance(t, fx.Node)]
    if len(vals) != 2 or vals[1].dim() != 2 or not _float_tensor(node):
        return False
    dtypes = {v.dtype for v in vals} | {tensor_meta(node).dtype}
    if b is not None:
        bias = tensor_meta(b)
        if bias is None or bias.dim() != 1:
            return False
        dtypes.add(bias.dtype)
    return len(dtypes) == 1


def _slice_of(node: Any, source: fx.Node) -> tuple[int, int] | None:
    """(start, end) when node = source[..., start:end] with constant bounds."""
    if not is_op(node, aten.slice) or node.args[0] is not source or node.kwargs:
        return None
    dim, start, end, step = [*node.args[1:], *(0, None, None, 1)[len(node.args) - 1 :]]
    width = tensor_meta(source).shape[-1]
    if not _last_dim(source, dim) or step != 1 or not isinstance(width, int):
        return None
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    return start, min(end, width)  # `x[..., n:]` exports with end = 2**63 - 1


def prologues_enabled() -> bool:
    """Norm prologues (rule 4), on unless DSC_NORM_PROLOGUE=0: they trade the norm's launch for
    the row's sums in every GEMM program, taken from the x tiles its stream loads anyway
    (bench/NOTES.md, run 27)."""
    mode = os.environ.get("DSC_NORM_PROLOGUE", "1")
    if mode not in ("0", "1"):
        raise ValueError(f"DSC_NORM_PROLOGUE={mode!r}: expected 1 (default) or 0")
    return mode == "1"


def _prologue_norm(head: Any) -> fx.Node | None:
    """The dsc norm a linear reads as its only reader: the GEMM applies it as its prologue."""
    if not prologues_enabled() or not is_op(head, aten.linear) or not _gemm_head(head):
        return None
    norm = head.args[0]
    if not is_op(norm, dsc_ops.rms_norm, dsc_ops.layer_norm) or len(norm.users) != 1:
        return None
    if norm.kwargs or not isinstance(norm.args[0], fx.Node) or not _short_rows(norm.args[0]):
        return None
    dtype = tensor_meta(head).dtype
    operands = [a for a in norm.args[1:3] if isinstance(a, fx.Node)]
    if is_op(norm, dsc_ops.rms_norm):
        operands = operands[:1]
    if any(tensor_meta(a) is None or tensor_meta(a).dim() != 1 or tensor_meta(a).dtype != dtype
           for a in operands):
        return None
    eps = norm.args[2] if is_op(norm, dsc_ops.rms_norm) else norm.args[3]
    if not isinstance(eps, (int, float)):
        return None
    same = tensor_meta(norm.args[0]).dtype == tensor_meta(norm).dtype == dtype
    return norm if same and _float_tensor(norm) else None


def _feeds_norm(node: fx.Node, hops: int = 3) -> bool:
    """True when node's value reaches a norm (through views/casts) that stays a kernel of its
    own; a norm some GEMM takes as its prologue does not count."""
    frontier = [node]
    for _ in range(hops):
        nxt = []
        for v in frontier:
            for user in v.users:
                if is_op(user, *_NORMS) and user.args[0] is v:
                    reader = only_user(user)
                    if reader is not None and _prologue_norm(reader) is user:
                        continue
                    return True
                if is_op(user, *_VIEWS, aten.clone, aten._to_copy):
                    nxt.append(user)
        frontier = nxt
    return False


def _keeps_last_dim(view: fx.Node, source: fx.Node) -> bool:
    if not is_op(view, aten.view, aten._unsafe_view, aten.reshape):
        return False
    a, b = tensor_meta(source), tensor_meta(view)
    return b.dim() >= 1 and _same((_expr(a.shape[-1]),), (_expr(b.shape[-1]),))


def _sink_views(graph: fx.Graph, mode) -> None:
    """op(view(p)) -> view(op(p)) for lead-dim reshapes, so p and op can share a region.

    Row ops commute with reshapes of the leading dims when their other operands are per-column
    (weights, biases) or scalars; OPT flattens the stream to [rows, hidden] between its residual
    add and the norm that reads it. A norm its GEMM takes as a prologue stays where it is.
    """
    for node in list(graph.nodes):
        if not _fusible(node) or _name(node) in _ROW_REDUCTIONS or not node.args:
            continue
        if (reader := only_user(node)) is not None and _prologue_norm(reader) is node:
            continue  # the norm stays next to its GEMM, which applies it as a prologue
        view = node.args[0]
        if not isinstance(view, fx.Node) or not view.args or not _fusible(view.args[0]):
            continue
        source = view.args[0]
        others = [a for a in node.all_input_nodes if a is not view]
        if (
            not _keeps_last_dim(view, source)
            or any(tensor_meta(a).dim() > 1 for a in others)
            or not _same(_shape(node), _shape(view))
        ):
            continue
        with graph.inserting_before(node):
            moved = graph.call_function(node.target, (source, *node.args[1:]), dict(node.kwargs))
            set_meta(moved, mode)
            after = graph.call_function(view.target, (moved, *view.args[1:]), dict(view.kwargs))
            set_meta(after, mode)
        for key in ("stack_trace", "nn_module_stack"):
            if key in node.meta:
                moved.meta[key] = node.meta[key]
        node.replace_all_uses_with(after)
        graph.erase_node(node)


def _gemm_region(head: fx.Node) -> _Region | None:
    """The epilogue a GEMM kernel can apply to `head`'s accumulator (rule 4), as a region."""
    if not _gemm_head(head):
        return None
    users = list(head.users)
    if len(users) == 2 and is_op(head, aten.linear):
        bounds = [_slice_of(u, head) for u in users]
        width = tensor_meta(head).shape[-1]
        if None not in bounds and isinstance(width, int):
            lo, hi = sorted(zip(bounds, users), key=lambda p: p[0][0])
            gated = only_user(lo[1])
            if (
                lo[0] == (0, width // 2)
                and hi[0] == (width // 2, width)
                and width % 2 == 0
                and is_op(gated, dsc_ops.gated_activation)
                and only_user(hi[1]) is gated
                and gated.args[0] is lo[1]
                and gated.args[1] is hi[1]
                and gated.args[2] in _GEMM_ACTIVATIONS
                and _float_tensor(gated)
            ):
                members = {head, lo[1], hi[1], gated}
                if (norm := _prologue_norm(head)) is not None:
                    members.add(norm)
                return _Region(members, [_shape(gated)], kind="gemm")
    members, views, last = {head}, [], head
    while (user := only_user(last)) is not None and _keeps_last_dim(user, last):
        views.append(user)
        last = user
    act = only_user(last)
    if (
        is_op(act, dsc_ops.activation)
        and act.args[1] in _GEMM_ACTIVATIONS
        and (tensor_meta(act).dtype == tensor_meta(head).dtype)
    ):
        members.add(act)
        last = act
    elif views:
        return None
    add = only_user(last)
    if not views and is_op(add, dsc_ops.residual_add) and last in add.args and not _feeds_norm(add):
        stream = add.args[1] if add.args[0] is last else add.args[0]
        if (
            isinstance(stream, fx.Node)
            and stream is not last
            and _float_tensor(stream)
            and _same(_shape(stream), _shape(last))
            and tensor_meta(stream).dtype == tensor_meta(add).dtype == tensor_meta(head).dtype
        ):
            members.add(add)
    if (norm := _prologue_norm(head)) is not None:
        members.add(norm)
    if len(members) == 1:
        return None
    return _Region(members, [_shape(head)], kind="gemm", views_after=views)


def _cheap_of_input(node: fx.Node, region: _Region) -> fx.Node | None:
    """The one region input a cheap pointwise node reads (rule 2), else None."""
    if _name(node) not in _CHEAP:
        return None
    tensors = [a for a in node.all_input_nodes]
    if len(tensors) != 1 or tensors[0] in region.nodes:
        return None
    others = [a for a in (*node.args, *node.kwargs.values()) if not isinstance(a, fx.Node)]
    return tensors[0] if all(_constant(a) for a in others) else None


def _grow(graph: fx.Graph, info: _Graph, claimed: set[fx.Node]) -> dict[fx.Node, _Region]:
    """Rule 1: add each fusible node to the region of an operand, or start a region."""
    region_of: dict[fx.Node, _Region] = {}
    for node in graph.nodes:
        if node in claimed or not _fusible(node):
            continue
        chosen: list[_Region] = []
        for a in node.all_input_nodes:
            region = region_of.get(a)
            if region is None or region in chosen or not _fits(node, region.space):
                continue
            if chosen and not _same(region.space, chosen[0].space):
                continue  # a per-row value can fit regions of different row lengths
            members = {node}.union(region.nodes, *(r.nodes for r in chosen))
            if info.closed(members):
                chosen.append(region)
        if chosen:
            region = chosen[0]
            for other in chosen[1:]:
                region.nodes |= other.nodes
                for n in other.nodes:
                    region_of[n] = region
            region.nodes.add(node)
        else:
            region = _Region({node}, [_space(node)])
        region_of[node] = region
    return region_of


def _duplicate_cheap(graph: fx.Graph, info: _Graph, region_of: dict) -> None:
    """Rule 2's exception: a consumer region recomputes a cheap op of one input."""
    for node in list(graph.nodes):
        region = region_of.get(node)
        if region is None or _cheap_of_input(node, region) is None:
            continue
        for user in list(node.users):
            other = region_of.get(user)
            if other is None or other is region or other.kind != "pointwise":
                continue
            with graph.inserting_before(user):
                copy = graph.call_function(node.target, node.args, dict(node.kwargs))
            copy.meta["val"] = node.meta["val"]
            info.order[copy] = info.order[user] - 0.5
            if not info.closed(other.nodes | {copy}):
                graph.erase_node(copy)
                continue
            user.replace_input_with(node, copy)
            other.nodes.add(copy)
            region_of[copy] = other
        if not node.users:  # every reader recomputes it now
            region.nodes.discard(node)
            region_of.pop(node)
            graph.erase_node(node)


def _outputs(region: _Region) -> list[fx.Node]:
    inside = region.nodes | set(region.views_after)
    return [n for n in region.nodes if any(u not in inside for u in n.users)]


def _source_regions(node: fx.Node, region_of: dict) -> list[_Region]:
    """Regions whose values reach `node`'s operands, through views."""
    found = []
    for a in node.all_input_nodes:
        while a not in region_of and is_op(a, *_VIEWS) and isinstance(a.args[0], fx.Node):
            a = a.args[0]
        region = region_of.get(a)
        if region is not None and region not in found:
            found.append(region)
    return found


def _merge_siblings(graph: fx.Graph, info: _Graph, region_of: dict) -> None:
    """Rule 5: independent regions meeting at one consumer launch together."""
    for consumer in graph.nodes:
        own = region_of.get(consumer)
        sources = [
            r
            for r in _source_regions(consumer, region_of)
            if r is not own and r.kind == "pointwise"
        ]
        while len(sources) > 1:
            first = sources.pop(0)
            for other in list(sources):
                same_row = _same(first.space[-1:], other.space[-1:])
                if not same_row or not info.independent(first.nodes, other.nodes):
                    continue
                sources.remove(other)
                offset = {}
                for g, space in enumerate(other.spaces):
                    match = next((i for i, s in enumerate(first.spaces) if _same(s, space)), None)
                    if match is None:
                        first.spaces.append(space)
                        match = len(first.spaces) - 1
                    offset[g] = match
                for n in other.nodes:
                    first.group_of[n] = offset[other.group_of.get(n, 0)]
                    region_of[n] = first
                first.nodes |= other.nodes


# ---- the region's JSON -----------------------------------------------------------------------
def _hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(size.node, "hint", None)
    if hint is not None:
        return int(hint)
    return int(size.node.expr.xreplace(size.node.shape_env.var_to_val))


def _order(val: torch.Tensor) -> list[int]:
    """Dims from the fastest-varying to the slowest (size-1 dims count as inner)."""
    strides = [_hint(s) for s in val.stride()]
    return sorted(range(val.dim()), key=lambda d: (strides[d], -d))


def _print(expr: sympy.Expr) -> int | str:
    return int(expr) if expr.is_Integer else str(expr)


def _encode(value: Any, index: dict[fx.Node, int]) -> Any:
    if isinstance(value, fx.Node):
        return {"ref": index[value]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, index) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": str(value)}
    return value


def _region_json(
    members: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node], region: _Region
) -> str:
    index = {n: i for i, n in enumerate(inputs + members)}
    head = members[0]
    for view in region.views_after:  # the epilogue reads the GEMM result itself
        index[view] = index[head]

    def describe(node: fx.Node) -> dict:
        # With views hoisted out, the epilogue runs in the GEMM's [rows, N] shape.
        shaped = head if region.views_after and node in region.nodes else node
        val = tensor_meta(node)
        return {
            "shape": [_print(s) for s in _shape(shaped)],
            "dtype": str(val.dtype).removeprefix("torch."),
        }

    def order(node: fx.Node) -> list[int]:
        return _order(tensor_meta(head if region.views_after else node))

    doc = {
        "version": REGION_VERSION,
        "kind": region.kind,
        "num_inputs": len(inputs),
        "values": [describe(n) for n in inputs + members],
        "ops": [
            {
                "op": _name(n),
                "args": _encode(list(n.args), index),
                "kwargs": {k: _encode(v, index) for k, v in n.kwargs.items()},
            }
            for n in members
        ],
        "groups": [{"shape": [_print(s) for s in space]} for space in region.spaces],
        "outputs": [
            {"ref": index[n], "group": region.group_of.get(n, 0), "order": order(n)}
            for n in outputs
        ],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


# ---- rewriting -------------------------------------------------------------------------------
def _build(gm: fx.GraphModule, region: _Region, mode) -> fx.Node:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    members = sorted(region.nodes, key=order.__getitem__)
    hidden = region.nodes | set(region.views_after)
    inputs: list[fx.Node] = []
    for m in members:
        for a in m.all_input_nodes:
            if a not in hidden and a not in inputs:
                inputs.append(a)
    outputs = _outputs(region)
    outputs.sort(key=order.__getitem__)
    text = _region_json(members, inputs, outputs, region)
    with graph.inserting_after(members[-1]):
        fused = graph.call_function(dsc_ops.fused_region.default, (inputs, text))
    set_meta(fused, mode)
    if "stack_trace" in members[-1].meta:
        fused.meta["stack_trace"] = members[-1].meta["stack_trace"]
    fused.meta["dsc_region_ops"] = [_name(m) for m in members]
    last = fused
    for k, out in enumerate(outputs):
        with graph.inserting_after(last):
            item = graph.call_function(operator.getitem, (fused, k))
        item.meta["val"] = fused.meta["val"][k]
        last = item
        value = item
        for view in region.views_after:  # gemm: the views the epilogue was hoisted over
            with graph.inserting_after(last):
                value = graph.call_function(view.target, (value, *view.args[1:]), dict(view.kwargs))
            set_meta(value, mode)
            last = value
        out.replace_all_uses_with(value, delete_user_cb=lambda user: user not in region.nodes)
    for m in sorted(hidden, key=order.__getitem__, reverse=True):
        graph.erase_node(m)
    return fused


def _toposort(graph: fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, keeping the order otherwise."""
    placed: set[fx.Node] = set()
    order: list[fx.Node] = []
    for root in graph.nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in placed:
                continue
            if expanded:
                placed.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((a, False) for a in reversed(node.all_input_nodes) if a not in placed)
    for prev, node in itertools.pairwise(order):
        if prev.next is not node:
            prev.append(node)


# ---- labels --------------------------------------------------------------------------------
def _source(node: Any) -> Any:
    """The node a value comes from, through views and region outputs."""
    while isinstance(node, fx.Node):
        if node.target is operator.getitem and is_op(node.args[0], dsc_ops.fused_region):
            return node.args[0]
        if not is_op(node, *_VIEWS) or not node.args:
            return node
        node = node.args[0]
    return node


def _consumers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read `node`'s value, through views and region outputs."""
    found, frontier = [], list(node.users)
    while frontier:
        user = frontier.pop()
        if is_op(user, *_VIEWS) and not is_op(user.args[0], dsc_ops.fused_region):
            frontier.extend(user.users)
        elif user not in found:
            found.append(user)
    return found


def _gemm_input(node: fx.Node) -> Any:
    if is_op(node, aten.linear):
        return node.args[0]
    if is_op(node, aten.addmm):
        return node.args[1]
    if is_op(node, dsc_ops.fused_region) and json.loads(node.args[1])["kind"] == "gemm":
        first = json.loads(node.args[1])["ops"][0]
        reads_first = ("aten::linear.default", "dsc::rms_norm.default", "dsc::layer_norm.default")
        ref = first["args"][0 if first["op"] in reads_first else 1]["ref"]
        return node.args[0][ref]
    return None


def _region_ops(node: Any) -> list[str]:
    return node.meta.get("dsc_region_ops", []) if isinstance(node, fx.Node) else []


def _label(node: Any, label: str) -> None:
    if isinstance(node, fx.Node) and "dsc_region" not in node.meta:
        node.meta["dsc_region"] = label


def _label_norm_feeding(gemm: fx.Node, label: str) -> None:
    source = _source(_gemm_input(gemm))
    if any(
        op in ("dsc::rms_norm.default", "dsc::layer_norm.default") for op in _region_ops(source)
    ):
        _label(source, label)


def _label_regions(graph: fx.Graph) -> None:
    gemms = [n for n in graph.nodes if _gemm_input(n) is not None]
    for attn in (n for n in graph.nodes if is_op(n, *_ATTENTION)):
        _label(attn, "attention")
        if is_op(attn, dsc_ops.qkv_cached_attention):
            continue  # its norm and QKV projection are inside it; its operands are x and W
        for operand in attn.args[:3]:
            source = _source(operand)
            if "dsc::rotary.default" in _region_ops(source):
                _label(source, "attention")
                sources = [_source(a) for a in source.args[0]]
            else:
                sources = [source]
            for qkv in sources:
                if qkv in gemms:
                    _label(qkv, "norm_qkv")
                    _label_norm_feeding(qkv, "norm_qkv")
    for gemm in gemms:
        ops = _region_ops(gemm)
        consumers = _consumers(gemm)
        activated = any(
            op in ("dsc::activation.default", "dsc::gated_activation.default")
            for c in consumers
            if _gemm_input(c) is None  # an activation of this GEMM's output, not another GEMM's
            for op in _region_ops(c)
        )
        if "dsc::activation.default" in ops or "dsc::gated_activation.default" in ops or activated:
            _label(gemm, "up_act")
            _label_norm_feeding(gemm, "up_act")
            for c in consumers:
                if any("activation" in op for op in _region_ops(c)):
                    _label(c, "up_act")
    for gemm in gemms:
        source = _source(_gemm_input(gemm))
        if (
            is_op(source, *_ATTENTION)
            or (isinstance(source, fx.Node) and source.meta.get("dsc_region") == "up_act")
            or "dsc::residual_add.default" in _region_ops(gemm)
        ):
            _label(gemm, "down_residual")
    for node in graph.nodes:
        if "dsc::residual_add.default" in _region_ops(node):
            _label(node, "down_residual")


def region_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The fused_region nodes of a graph, in order."""
    return [n for n in gm.graph.nodes if is_op(n, dsc_ops.fused_region)]


@register("fuse")
def fuse(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    mode = fake_mode_of(gm)
    _sink_views(graph, mode)
    info = _Graph(graph)
    gemm_regions = []
    claimed: set[fx.Node] = set()
    for node in graph.nodes:
        region = _gemm_region(node)
        if region is None:
            continue
        hidden = region.nodes | set(region.views_after)
        if not hidden & claimed and info.closed(hidden):
            gemm_regions.append(region)
            claimed |= hidden
    region_of = _grow(graph, info, claimed)
    _duplicate_cheap(graph, info, region_of)
    regions = list({id(r): r for r in region_of.values()}.values())
    for region in regions:
        # A region value read outside must be a full row (one value per row is not stored).
        if any(not _same(_shape(n), region.space) for n in _outputs(region)):
            for n in region.nodes:
                region_of.pop(n, None)
    _merge_siblings(graph, info, region_of)
    regions = list({id(r): r for r in region_of.values()}.values()) + gemm_regions
    for region in sorted(regions, key=lambda r: min(info.order[n] for n in r.nodes)):
        _build(gm, region, mode)
    _toposort(graph)
    _label_regions(graph)
    graph.eliminate_dead_code()
    return gm
