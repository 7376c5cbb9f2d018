"""recognize_moe: a mixture-of-experts block becomes one `dsc::moe` node, checked by probing.

Matches (found structurally, then verified numerically):

    logits = linear(x, router_weight[, router_bias])       # [T, E], casts allowed
    w, idx = topk(softmax(logits, -1), k)                  # or softmax(topk(logits, k).values)
    s = sigmoid(logits); idx = topk(s + bias, k)[1]        # or a selection bias (MiniMax-M2,
    w = gather(s, idx)                                     #   ERNIE 4.5: after a softmax) ...
    g = topk(view(s + bias, [T, G, E/G]), 2).sum(-1)       # ... and group-limited (DeepSeek-V3,
    idx = topk(masked_fill(s + bias, not in topk(g, kg)), k)[1]   # GLM-4.5; DeepSeek-V2 takes
                                                           #   a group's max), w scaled
    ...    any expert computation reading x, w, idx, 3-D expert weights and [E, n] biases ...
    out    = first node after the top-k that every path from it passes through, with x's size
             and last dimension (Mixtral in transformers 5: sort/histc/cumsum, grouped_mm x2,
             masked_fill, index_put/index, sum)

Rewrite to (when it computes the same values):

    out = dsc.moe(x, router_weight, gate_up, down, k, normalize, kind,
                  router_bias=.., gate_up_bias=.., down_bias=..,   # the biases the block has
                  scoring="sigmoid", selection_bias=.., groups=G, group_top_k=kg, scale=c,
                  group_scoring="max")
                  # routing keywords only where they differ from a softmax top-k

The router is the one product of a stored 2-D weight a few steps back from a top-k. The
region between x and out is copied into a small graph and run on random x with the real
weights. First the routing: every reading (softmax or sigmoid, with or without the block's
[E] weight as a selection bias, the groups its views and top-ks allow, each group ranked by its
best two experts or its best one, the k of each top-k over
E) whose experts are the ones the block picks, on 512 tokens (the routing subgraph alone: a
reading that differs only now and then must show it). Then each reading of the whole block that the
shapes allow is run through `dsc.moe`'s reference: those routings, normalize True/False, a
scale of 1 or a constant the block multiplies by, kind silu/gelu/gelu_tanh/relu (those the
region computes first) or GPT-OSS's clamped_swiglu, expert weights as stored, transposed, with
gate and up halves swapped or interleaved (their biases likewise), or separate gate and up
tensors concatenated. The first that matches within 1e-4 (relative to the output's size; 3e-2
in half precision) is used; when none does, the block is left alone. A layout other than dsc's
([E, 2F, H] gate rows then up rows; [E, H, F]; a selection bias [E]) is copied once into a new
weight `<name>.dsc_gate_up` / `.dsc_down` / `.dsc_gate_up_bias` / `.dsc_selection_bias`, and
an original no node reads any more is dropped.

Does not match: a top-k that is not an MoE router (no 3-D expert weights behind it); other weights
in the block (a shared expert added inside it); experts that dsc.moe cannot express (another
activation, biases beside separate gate and up tensors); routing it cannot express (groups
scored otherwise than by their best two experts or best one, PhiMoE's sparsemixer); a block
that reads a
tensor other than x.
Ordering: after canonicalize and recognize_rms_norm; before recognize_mlp (which would otherwise
see the experts' activation) and recognize_residual (which counts dsc.moe as a projection).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from dsc.ops.moe import EXPERT_ACTIVATIONS, GROUP_SCORINGS, SCORINGS, moe_reference, route_reference
from dsc.passes import register
from dsc.passes.context import PassContext
from dsc.passes.graph_utils import call, fake_mode_of, is_op, tensor_meta, weight_name

__all__ = ["recognize_moe"]

aten = torch.ops.aten
dsc_ops = torch.ops.dsc

_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.clone, aten.alias)
_ROUTING_STEPS = 16  # how far back from a top-k its router's product may sit
_SCALARS = (int, torch.SymInt)
_PROBE_SIZES = (2, 5, 3, 4)  # values for the block's symbolic sizes: tokens 2*5 = 10
# The routing alone is probed on many more tokens (it costs one router product a token): a
# reading that picks other experts only now and then must show it.
_ROUTING_PROBE_SIZES = (8, 64, 4, 4)
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
_HALF_TOLERANCE = 3e-2  # bf16/fp16: both sides round; a wrong reading is off by O(1)

# What an activation op inside the block says about `kind`; tried before the other kinds.
_KIND_HINTS: dict[object, Callable[[fx.Node], str | None]] = {
    aten.silu: lambda n: "silu",
    aten.sigmoid: lambda n: "silu",
    aten.relu: lambda n: "relu",
    aten.tanh: lambda n: "gelu_tanh",
    aten.erf: lambda n: "gelu",
    aten.gelu: lambda n: "gelu_tanh" if n.kwargs.get("approximate") == "tanh" else "gelu",
    dsc_ops.activation: lambda n: n.args[1],
    dsc_ops.gated_activation: lambda n: n.args[2],
}


@dataclass
class _Block:
    topk: fx.Node
    x: fx.Node  # the router's input
    root: fx.Node  # x with views stripped: the region's only tensor input
    moe_input: fx.Node  # x or a view of it with out's shape
    router: fx.Node  # router weight placeholder
    router_bias: fx.Node | None
    out: fx.Node
    region: list[fx.Node]  # topological order
    externals: list[fx.Node]  # root, weight placeholders, symbolic sizes
    experts: list[fx.Node]  # 3-D weight placeholders
    biases: list[fx.Node]  # [E, n] weight placeholders
    selection_bias: fx.Node | None  # an [E] weight the routing reads besides the router's
    top_ks: list[int]  # the k of every top-k over the E experts in the block
    chosen: fx.Node | None  # the experts the block picks (the last such top-k's indices)
    # (groups, groups kept, group scoring) the block's views and top-ks allow
    groups: list[tuple[int, int, str]]
    scales: list[float]  # the constants the block multiplies by, and 1


@dataclass
class _Reading:
    """One way to read the expert weights as dsc.moe's gate_up [E, 2F, H] and down [E, H, F]."""

    gate_up: Callable[[dict[fx.Node, torch.Tensor]], torch.Tensor]
    down: Callable[[dict[fx.Node, torch.Tensor]], torch.Tensor]
    gate_up_as_is: fx.Node | None  # the placeholder when gate_up is a stored weight unchanged
    down_as_is: fx.Node | None
    gate_up_from: fx.Node  # the placeholder a new gate_up weight is named after
    down_from: fx.Node
    gate_up_bias: Callable[[dict[fx.Node, torch.Tensor]], torch.Tensor] | None = None
    gate_up_bias_as_is: fx.Node | None = None
    gate_up_bias_from: fx.Node | None = None
    down_bias: fx.Node | None = None  # read as stored


def _strip(node, ops) -> fx.Node:
    while is_op(node, *ops):
        node = node.args[0]
    return node


def _strip_cast(node):
    if is_op(node, aten._to_copy) and set(node.kwargs) <= {"dtype"}:
        return node.args[0]
    return node


def _router(topk: fx.Node) -> fx.Node | None:
    """The router linear a top-k's scores come from: the only product of a stored 2-D weight
    (casts allowed) within a few steps back from the top-k's input (through a softmax or
    sigmoid, an added selection bias, group masks, views), never past a product."""
    if len(topk.args) < 2 or not isinstance(topk.args[1], int):
        return None
    dim = topk.kwargs.get("dim", topk.args[2] if len(topk.args) > 2 else -1)
    largest = topk.kwargs.get("largest", topk.args[3] if len(topk.args) > 3 else True)
    scores_val = tensor_meta(topk.args[0])
    if scores_val is None or dim not in (-1, scores_val.dim() - 1) or not largest:
        return None
    found: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    frontier = [topk.args[0]]
    for _ in range(_ROUTING_STEPS):
        step = []
        for node in frontier:
            if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
                continue
            seen.add(node)
            if is_op(node, aten.linear):
                weight = _strip_cast(node.args[1])
                val = tensor_meta(weight)
                if weight_name(weight) is not None and val is not None and val.dim() == 2:
                    found.add(node)
                continue
            step.extend(node.all_input_nodes)
        frontier = step
    return found.pop() if len(found) == 1 else None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return [str(d) for d in a.shape] == [str(d) for d in b.shape]


def _block_output(topk: fx.Node, x_val: torch.Tensor) -> fx.Node | None:
    """The first node after topk that all paths from topk pass through, of x's size."""
    open_users: dict[fx.Node, int] = {}  # nodes reached from topk -> users not yet visited
    started = False
    for node in topk.graph.nodes:
        if node is topk:
            started = True
            open_users[node] = len(node.users)
            continue
        if not started:
            continue
        reached = [a for a in node.all_input_nodes if a in open_users]
        if not reached:
            continue
        for a in reached:
            open_users[a] -= 1
            if open_users[a] == 0:
                del open_users[a]
        if node.users:
            open_users[node] = len(node.users)
        if list(open_users) == [node]:
            val = tensor_meta(node)
            if (
                val is not None
                and val.dim() >= 1
                and str(val.numel()) == str(x_val.numel())
                and str(val.shape[-1]) == str(x_val.shape[-1])
            ):
                return node
        if not open_users:
            return None
    return None


def _region(out: fx.Node, root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(nodes computing out from root, their inputs) or None if out reads another tensor.

    The inputs may be root, weight placeholders and sizes computed before root (sym_size of the
    user inputs); anything else computed before root is a tensor the block should not read.
    """
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    region: set[fx.Node] = set()
    externals: set[fx.Node] = set()
    stack = [out]
    while stack:
        node = stack.pop()
        if node in region or node in externals:
            continue
        if node is root or weight_name(node) is not None:
            externals.add(node)
            continue
        if node.op != "call_function":
            return None
        if order[node] < order[root]:
            if not isinstance(node.meta.get("val"), _SCALARS):
                return None
            externals.add(node)
            continue
        region.add(node)
        stack.extend(node.all_input_nodes)
    return sorted(region, key=order.__getitem__), sorted(externals, key=order.__getitem__)


def _find_block(topk: fx.Node) -> _Block | None:
    linear = _router(topk)
    if linear is None:
        return None
    x, router = _strip_cast(linear.args[0]), _strip_cast(linear.args[1])
    router_bias = _strip_cast(linear.args[2]) if len(linear.args) == 3 else None
    x_val = tensor_meta(x)
    if x_val is None or x_val.dim() < 1:
        return None
    out = _block_output(topk, x_val)
    if out is None:
        return None
    root = _strip(x, _VIEWS)
    chain = [x]
    while chain[-1] is not root:
        chain.append(chain[-1].args[0])
    moe_input = next((n for n in chain if _same_shape(tensor_meta(n), tensor_meta(out))), None)
    if moe_input is None:
        return None
    found_region = _region(out, root)
    if found_region is None:
        return None
    region, externals = found_region
    weights = [n for n in externals if weight_name(n) is not None]
    others = [n for n in weights if n not in (router, router_bias)]
    if router not in weights or not others:
        return None
    n_experts = tensor_meta(router).shape[0]
    # A selection bias may be stored [E] or [1, E] (ERNIE 4.5).
    selection = [w for w in others if tuple(tensor_meta(w).shape) in ((n_experts,),
                                                                      (1, n_experts))]
    if any(tensor_meta(w).dim() not in (2, 3) or tensor_meta(w).shape[0] != n_experts
           for w in others if w not in selection):
        return None
    experts = [w for w in others if tensor_meta(w).dim() == 3]
    biases = [w for w in others if tensor_meta(w).dim() == 2 and w not in selection]
    topks = [n for n in region if is_op(n, aten.topk) and isinstance(n.args[1], int)
             and tensor_meta(n.args[0]).shape[-1] == n_experts]
    if not experts or len(biases) > 2 or len(selection) > 1 or not topks:
        return None
    chosen = next((u for u in topks[-1].users if is_op(u, operator.getitem) and u.args[1] == 1),
                  None)
    return _Block(topk, x, root, moe_input, router, router_bias, out, region,
                  externals, experts, biases, selection[0] if selection else None,
                  sorted({n.args[1] for n in topks}), chosen, _group_options(region, n_experts),
                  _scales(region))


def _group_options(region: list[fx.Node], n_experts: int) -> list[tuple[int, int, str]]:
    """(1, 1, "top2"), then (groups, kept, scoring) for each view of the E scores as
    [groups, E / groups], each top-k over `groups` values in the block and each way to rank a
    group (DeepSeek-V3's and DeepSeek-V2's group-limited routings)."""
    groups = set()
    for node in region:
        val, src = tensor_meta(node), tensor_meta(node.args[0]) if node.args else None
        if (is_op(node, aten.view, aten.reshape, aten._unsafe_view) and val is not None
                and src is not None and src.shape[-1] == n_experts and val.dim() == src.dim() + 1
                and isinstance(val.shape[-2], int) and val.shape[-2] * val.shape[-1] == n_experts):
            groups.add(val.shape[-2])
    kept = {n.args[1] for n in region if is_op(n, aten.topk) and isinstance(n.args[1], int)}
    return [(1, 1, "top2")] + [(g, k, by) for g in sorted(groups) if g > 1
                               for k in sorted(kept) if k <= g for by in GROUP_SCORINGS]


def _scales(region: list[fx.Node]) -> list[float]:
    """Each constant the block multiplies a tensor by (a routed scaling factor), then 1.0."""
    found = []
    for node in region:
        if is_op(node, aten.mul) and len(node.args) == 2:
            for arg in node.args:
                if isinstance(arg, float) and arg not in found and arg != 1.0:
                    found.append(arg)
    return found + [1.0]  # the block's own constants first, as with its groups


def _oriented(w: fx.Node, last: int) -> Iterator[tuple[bool, int]]:
    """(transposed, rows) for each way to read 3-D weight w as [E, rows, last]."""
    _, a, b = tensor_meta(w).shape
    if b == last:
        yield False, a
    if a == last:
        yield True, b


def _view(w: fx.Node, transposed: bool) -> Callable[[dict], torch.Tensor]:
    return lambda t: t[w].transpose(1, 2) if transposed else t[w]


# How gate and up rows can sit in a [E, 2F, H] weight, each mapped to dsc's gate-then-up order.
_HALVES = (
    None,  # gate rows then up rows: dsc's order already
    lambda g, f: torch.cat([g[:, f:], g[:, :f]], 1),  # up rows then gate rows
    lambda g, f: torch.cat([g[:, 0::2], g[:, 1::2]], 1),  # interleaved: gate, up, gate, up, ...
)


def _bias_roles(biases: list[fx.Node], two_f: int,
                hidden: int) -> Iterator[tuple[fx.Node | None, fx.Node | None]]:
    """(gate_up bias, down bias) for each way the block's [E, n] biases fit those two roles."""
    for gate_up_bias, down_bias in itertools.product([None, *biases], repeat=2):
        taken = [b for b in (gate_up_bias, down_bias) if b is not None]
        if len(set(taken)) != len(taken) or set(taken) != set(biases):
            continue
        if gate_up_bias is not None and tensor_meta(gate_up_bias).shape[1] != two_f:
            continue
        if down_bias is None or tensor_meta(down_bias).shape[1] == hidden:
            yield gate_up_bias, down_bias


def _readings(experts: list[fx.Node], biases: list[fx.Node], hidden: int) -> Iterator[_Reading]:
    """Every reading of the expert weights (and biases) as dsc.moe's layout their shapes allow."""
    if len(experts) == 2:
        for gu, dn in itertools.permutations(experts):
            for gu_t, rows in _oriented(gu, hidden):
                if rows % 2:
                    continue
                ffn = rows // 2
                for dn_t, dn_rows in _oriented(dn, ffn):
                    if dn_rows != hidden:
                        continue
                    for reorder, (gu_b, dn_b) in itertools.product(
                        _HALVES, _bias_roles(biases, rows, hidden)
                    ):
                        base = _view(gu, gu_t)

                        def gate_up(t, base=base, reorder=reorder, ffn=ffn):
                            return base(t) if reorder is None else reorder(base(t), ffn)

                        def gate_up_bias(t, gu_b=gu_b, reorder=reorder, ffn=ffn):
                            return t[gu_b] if reorder is None else reorder(t[gu_b], ffn)

                        as_is = gu if (reorder is None and not gu_t) else None
                        yield _Reading(
                            gate_up, _view(dn, dn_t), as_is, dn if not dn_t else None, gu, dn,
                            gate_up_bias if gu_b is not None else None,
                            gu_b if reorder is None else None, gu_b, dn_b,
                        )
    elif len(experts) == 3 and not biases:
        for g, u, dn in itertools.permutations(experts):
            for (g_t, g_rows), (u_t, u_rows) in itertools.product(
                _oriented(g, hidden), _oriented(u, hidden)
            ):
                if g_rows != u_rows:
                    continue
                for dn_t, dn_rows in _oriented(dn, g_rows):
                    if dn_rows != hidden:
                        continue
                    gv, uv = _view(g, g_t), _view(u, u_t)

                    def gate_up(t, gv=gv, uv=uv):
                        return torch.cat([gv(t), uv(t)], 1)

                    yield _Reading(gate_up, _view(dn, dn_t), None, dn if not dn_t else None, g, dn)


def _kinds(region: list[fx.Node]) -> list[str]:
    hinted = []
    for node in region:
        for op, hint in _KIND_HINTS.items():
            kind = hint(node) if is_op(node, op) else None
            if kind in EXPERT_ACTIVATIONS and kind not in hinted:
                hinted.append(kind)
    return hinted + [k for k in EXPERT_ACTIVATIONS if k not in hinted]


def _concrete(value, sizes: dict) -> int:
    if isinstance(value, torch.SymInt):
        expr = value.node.expr.xreplace(sizes)
        if expr.free_symbols:
            raise ValueError(f"size {value} depends on {expr.free_symbols}")
        return int(expr)
    return int(value)


def _probe_sizes(block: _Block, wanted: tuple[int, ...] = _PROBE_SIZES) -> dict:
    """A value for each symbolic size the block's inputs use, inside the range export allows."""
    values = [*tensor_meta(block.root).shape, *(n.meta["val"] for n in block.externals)]
    symbolic = [v for v in values if isinstance(v, torch.SymInt)]
    syms: list = []
    for v in symbolic:
        syms += sorted(v.node.expr.free_symbols - set(syms), key=str)
    sizes = {}
    for i, sym in enumerate(syms):
        want = wanted[i % len(wanted)]
        bounds = symbolic[0].node.shape_env.var_to_range.get(sym)
        if bounds is not None:
            # A data-dependent size's range may be open at either end (torch's int infinity).
            lower, upper = _finite(bounds.lower), _finite(bounds.upper)
            want = max(want, lower) if lower is not None else want
            want = min(want, upper) if upper is not None else want
        sizes[sym] = sympy.Integer(want)
    return sizes


def _finite(bound) -> int | None:
    """A range end as an int, or None where the range is open."""
    try:
        return int(bound) if bound.is_number and bound.is_finite is not False else None
    except (OverflowError, TypeError, AttributeError, ValueError):
        return None


def _region_module(block: _Block, out: fx.Node | None = None) -> fx.GraphModule:
    """The block as a graph of its own: (out, the experts it picks, or None); with `out`, only
    what that node needs, returning it."""
    keep = set(block.region)
    if out is not None:
        keep, stack = set(), [out]
        while stack:
            node = stack.pop()
            if node in block.region and node not in keep:
                keep.add(node)
                stack.extend(node.all_input_nodes)
    graph = fx.Graph()
    env = {n: graph.placeholder(n.name) for n in block.externals}
    for node in block.region:
        if node in keep:
            env[node] = graph.node_copy(node, lambda a: env[a])
    if out is not None:
        graph.output(env[out])
    else:
        graph.output((env[block.out], env[block.chosen] if block.chosen is not None else None))
    return fx.GraphModule(torch.nn.Module(), graph)


def _probe_args(block: _Block, tensors: dict, wanted: tuple[int, ...], dtype, device
                ) -> tuple[torch.Tensor, list]:
    """(x, the region's arguments) for random x at the sizes `wanted` picks."""
    sizes = _probe_sizes(block, wanted)
    shape = [_concrete(d, sizes) for d in tensor_meta(block.root).shape]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device, dtype)
    args = [x if n is block.root else tensors[n] if n in tensors
            else _concrete(n.meta["val"], sizes) for n in block.externals]
    return x, args


def _routings(block: _Block, tensors: dict, logits: torch.Tensor,
              chosen: torch.Tensor | None) -> Iterator[dict]:
    """dsc.moe's routing keywords for every reading of the block's routing whose choice of
    experts is the block's own (all of them when the block's choice is not at hand). What the
    block holds is used first: its selection bias always, its groups before none, so that a
    probe on which they happen not to change the choice cannot drop them."""
    bias = block.selection_bias
    for scoring, (groups, kept, group_scoring), top_k in itertools.product(
            SCORINGS, block.groups[1:] + block.groups[:1], reversed(block.top_ks)):
        if top_k > logits.shape[-1] or (groups > 1 and logits.shape[-1] // groups < 1):
            continue
        bias_value = tensors[bias].reshape(-1) if bias is not None else None
        if chosen is not None:
            picked = route_reference(logits, top_k, False, scoring, bias_value, groups, kept,
                                     group_scoring=group_scoring)[1]
            if picked.shape != chosen.shape or not torch.equal(
                    picked.sort(-1).values, chosen.long().sort(-1).values):
                continue
        yield {"top_k": top_k, "scoring": scoring, "selection_bias": bias, "groups": groups,
               "group_top_k": kept, "group_scoring": group_scoring}


def _probe(block: _Block, ctx: PassContext) -> tuple[_Reading, bool, str, dict] | None:
    """The first reading of the block as dsc.moe that computes what the block computes."""
    tensors = {n: ctx.weights[weight_name(n)] for n in block.externals if weight_name(n)}
    router = tensors[block.router]
    router_bias = tensors[block.router_bias] if block.router_bias is not None else None
    root_val = tensor_meta(block.root)
    try:
        x, args = _probe_args(block, tensors, _PROBE_SIZES, root_val.dtype, router.device)
        shape = list(x.shape)
        with torch.no_grad():
            expected, _ = _region_module(block)(*args)
            route_x, chosen = x, None
            if block.chosen is not None:
                route_x, route_args = _probe_args(block, tensors, _ROUTING_PROBE_SIZES,
                                                  root_val.dtype, router.device)
                chosen = _region_module(block, block.chosen)(*route_args)
    # A region that cannot run on its own (an op without a CPU kernel, a size it cannot take)
    # is left alone.
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, NotImplementedError):
        return None
    expected = expected.reshape(-1, shape[-1]).float()
    if not torch.isfinite(expected).all():
        return None
    size = max(1.0, float(expected.abs().max()))
    tolerance = _TOLERANCE.get(root_val.dtype, _HALF_TOLERANCE) * size
    kinds = _kinds(block.region)
    with torch.no_grad():
        logits = torch.nn.functional.linear(route_x.reshape(-1, shape[-1]), router, router_bias)
        if chosen is not None:
            chosen = chosen.reshape(logits.shape[0], -1)
        routings = list(_routings(block, tensors, logits, chosen))
        for reading in _readings(block.experts, block.biases, shape[-1]):
            gate_up, down = reading.gate_up(tensors), reading.down(tensors)
            biases = (router_bias,
                      reading.gate_up_bias(tensors) if reading.gate_up_bias else None,
                      tensors[reading.down_bias] if reading.down_bias is not None else None)
            for routing, normalize, kind, scale in itertools.product(
                    routings, (True, False), kinds, block.scales):
                bias = routing["selection_bias"]
                got = moe_reference(
                    x, router, gate_up, down, routing["top_k"], normalize, kind, *biases,
                    routing["scoring"], tensors[bias].reshape(-1) if bias is not None else None,
                    routing["groups"], routing["group_top_k"], scale, routing["group_scoring"])
                if (got.reshape(-1, shape[-1]).float() - expected).abs().max() <= tolerance:
                    return reading, normalize, kind, {**routing, "scale": scale}
    return None


def _weight_node(
    gm: fx.GraphModule,
    ctx: PassContext,
    as_is: fx.Node | None,
    source: fx.Node,
    suffix: str,
    make: Callable[[], torch.Tensor],
) -> fx.Node:
    """The stored placeholder, or a new one holding `make()` as `<source name>.<suffix>`."""
    if as_is is not None:
        return as_is
    name = f"{weight_name(source)}.{suffix}"
    for node in gm.graph.nodes:
        if node.op == "placeholder" and weight_name(node) == name:
            return node
    ctx.weights[name] = make().contiguous()
    # Next to the weight it is made from, so weights stay grouped ahead of the user inputs.
    with gm.graph.inserting_after(source):
        node = gm.graph.placeholder(name.replace(".", "_"))
    node.meta["dsc_weight"] = name
    node.meta["val"] = fake_mode_of(gm).from_tensor(ctx.weights[name], static_shapes=True)
    return node


def _rewrite(gm: fx.GraphModule, ctx: PassContext, block: _Block, choice) -> None:
    reading, normalize, kind, routing = choice
    tensors = {n: ctx.weights[weight_name(n)] for n in block.experts + block.biases}
    with torch.no_grad():
        gate_up = _weight_node(
            gm,
            ctx,
            reading.gate_up_as_is,
            reading.gate_up_from,
            "dsc_gate_up",
            lambda: reading.gate_up(tensors),
        )
        down = _weight_node(
            gm,
            ctx,
            reading.down_as_is,
            reading.down_from,
            "dsc_down",
            lambda: reading.down(tensors),
        )
        gate_up_bias = None
        if reading.gate_up_bias is not None:
            gate_up_bias = _weight_node(
                gm,
                ctx,
                reading.gate_up_bias_as_is,
                reading.gate_up_bias_from,
                "dsc_gate_up_bias",
                lambda: reading.gate_up_bias(tensors),
            )
        selection = routing["selection_bias"]
        if selection is not None and tensor_meta(selection).dim() != 1:  # [1, E] -> [E]
            stored = ctx.weights[weight_name(selection)]
            selection = _weight_node(gm, ctx, None, selection, "dsc_selection_bias",
                                     lambda: stored.reshape(-1))
    args = (block.moe_input, block.router, gate_up, down, routing["top_k"], normalize, kind)
    # Keywords only where the block differs from the plain softmax top-k without biases.
    kwargs = {"router_bias": block.router_bias, "gate_up_bias": gate_up_bias,
              "down_bias": reading.down_bias, "selection_bias": selection}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if routing["scoring"] != "softmax":
        kwargs["scoring"] = routing["scoring"]
    if routing["groups"] > 1:
        kwargs.update(groups=routing["groups"], group_top_k=routing["group_top_k"])
        if routing["group_scoring"] != "top2":
            kwargs["group_scoring"] = routing["group_scoring"]
    if routing["scale"] != 1.0:
        kwargs["scale"] = routing["scale"]
    with gm.graph.inserting_after(block.out):
        new = call(gm.graph, dsc_ops.moe.default, args, kwargs, like=block.out)
    block.out.replace_all_uses_with(new)


@register("recognize_moe")
def recognize_moe(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    replaced: set[fx.Node] = set()
    for topk in [n for n in gm.graph.nodes if is_op(n, aten.topk)]:
        if topk not in set(gm.graph.nodes):
            continue  # part of a block already rewritten
        block = _find_block(topk)
        if block is None:
            continue
        choice = _probe(block, ctx)
        if choice is None:
            continue
        _rewrite(gm, ctx, block, choice)
        replaced.update(block.experts + block.biases)
        if block.selection_bias is not None:
            replaced.add(block.selection_bias)  # dropped when a reshaped copy took its place
        gm.graph.eliminate_dead_code()
    # Weights stored in another layout were copied; the originals go when nothing reads them.
    for node in replaced:
        if not node.users:
            del ctx.weights[weight_name(node)]
            gm.graph.erase_node(node)
    return gm
