"""Trace a few layers of a deep model and stamp out the rest: tracing cost independent of depth.

`torch.export` spends about a second per decoder layer of a 7B model, most of compile time for a
32- or 80-layer model, although every layer after the first produces the same ops. So the frontend
exports the model with its layer stack cut to its first `TRACED_LAYERS` layers and builds the
graph of the remaining layers by copying the last traced layer's nodes:

    traced (3 layers):            stamped (N layers):
      embed -> L0 -> L1 -> L2       embed -> L0 -> L1 -> L2 -> L3' -> ... -> L(N-1)' -> norm -> head
            -> norm -> head         Lk' = L2's nodes with L2's weights replaced by layer k's, and
                                          L1's outputs (what L2 reads from its predecessor)
                                          replaced by L(k-1)'s

It applies only where that is provably the same graph: a ModuleList of at least
`TRACED_LAYERS + 1` distinct modules of one class whose parameters, buffers and plain attributes
agree (`layer_idx` aside); L1 and L2 must be the same op sequence with the same constants, reading
the same shared values (rotary tables, masks) and their own weights, and L2 must read from L1
what L1 read from L0.
A layer whose code bakes its index into the graph (a scale of 1 / (layer_idx + 1), a constant
made per layer) makes L1 and L2 differ and the model is traced whole. Last, the stamped graph is
run once on the example input against the model itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx

__all__ = [
    "LayerStack", "NotRepeatable", "TRACED_LAYERS", "cut_to_traced", "find_layer_stack",
    "stamp_layers",
]

TRACED_LAYERS = 3  # layer 0 may differ from the rest; L1 -> L2 is the step that gets repeated

# Per-layer attributes that may differ without changing the traced ops (cache bookkeeping).
_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_number")


@dataclass
class LayerStack:
    """The model's repeated layers: model.<path> is a ModuleList of `layers`."""

    path: str  # relative to the model, e.g. "model.layers" or "transformer.h"
    parent: torch.nn.Module
    attribute: str
    layers: torch.nn.ModuleList


def _plain_attributes(module: torch.nn.Module) -> tuple:
    return tuple(
        sorted(
            (key, value)
            for key, value in vars(module).items()
            if not key.startswith("_")
            and key not in _INDEX_ATTRIBUTES
            and isinstance(value, (bool, int, float, str, type(None)))
        )
    )


def _signature(layer: torch.nn.Module) -> tuple:
    """What must agree between two layers for them to trace to the same ops."""
    modules = tuple((name, type(m).__qualname__, _plain_attributes(m))
                    for name, m in layer.named_modules())
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, t.device.type)
        for name, t in (*layer.named_parameters(remove_duplicate=False),
                        *layer.named_buffers(remove_duplicate=False))
    )
    return modules, tensors


def _size(layers: torch.nn.ModuleList) -> int:
    return sum(p.numel() for p in layers.parameters())


def find_layer_stack(model: torch.nn.Module) -> LayerStack | None:
    """The ModuleList of identical layers holding the most weights (the decoder layers, not a
    layer's experts), if it is deep enough to be worth stamping; else None."""
    best: LayerStack | None = None
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) <= TRACED_LAYERS:
            continue
        if best is not None and _size(module) <= _size(best.layers):
            continue
        if len({id(layer) for layer in module}) != len(module):
            continue  # one module used at several depths: its weights are shared, keep it whole
        first = _signature(module[0])
        if any(_signature(layer) != first for layer in module):
            continue
        parent_path, _, attribute = path.rpartition(".")
        best = LayerStack(path, model.get_submodule(parent_path), attribute, module)
    return best


@contextlib.contextmanager
def cut_to_traced(stack: LayerStack) -> Iterator[None]:
    """The model with only its first TRACED_LAYERS layers, for the length of the block."""
    setattr(stack.parent, stack.attribute, torch.nn.ModuleList(stack.layers[:TRACED_LAYERS]))
    try:
        yield
    finally:
        setattr(stack.parent, stack.attribute, stack.layers)


class NotRepeatable(Exception):
    """The traced layers are not a repeat of one another; trace the model whole."""


def _layer_of(node: fx.Node, module_prefix: str) -> int | None:
    """Which layer of the stack built `node` (from the module stack export records), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if not path.startswith(module_prefix):
        return None
    index = path[len(module_prefix):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _layer_weight(name: str, weight_prefix: str) -> tuple[int, str] | None:
    """(layer, name inside the layer) for a weight of the stack, else None."""
    if not name.startswith(weight_prefix):
        return None
    index, _, local = name[len(weight_prefix):].partition(".")
    return (int(index), local) if index.isdigit() else None


def stamp_layers(
    gm: fx.GraphModule,
    weights: dict[str, torch.Tensor],
    stack: LayerStack,
    dtype: torch.dtype | None,
) -> None:
    """Extend a graph traced with TRACED_LAYERS layers to all of the stack's layers, in place.

    Raises NotRepeatable when layer 2 is not a repeat of layer 1 (see the module docstring).
    """
    graph = gm.graph
    module_prefix = f"model.{stack.path}."  # the frontend's wrapper holds the model as .model
    weight_prefix = f"{stack.path}."
    nodes = list(graph.nodes)
    by_layer: dict[int, list[fx.Node]] = {}
    for node in nodes:
        if node.op == "call_function":
            layer = _layer_of(node, module_prefix)
            if layer is not None:
                by_layer.setdefault(layer, []).append(node)
    own_weights: dict[int, dict[str, fx.Node]] = {}  # layer -> local name -> placeholder
    for node in nodes:
        found = _layer_weight(node.meta.get("dsc_weight", ""), weight_prefix)
        if node.op == "placeholder" and found:
            own_weights.setdefault(found[0], {})[found[1]] = node
    last, before = TRACED_LAYERS - 1, TRACED_LAYERS - 2
    template, previous = by_layer.get(last, []), by_layer.get(before, [])
    if not template or len(template) != len(previous):
        raise NotRepeatable(f"layers {before} and {last} traced to different op counts")
    if set(by_layer) != set(range(TRACED_LAYERS)):
        raise NotRepeatable("nodes of the stack are not all inside its first layers")

    in_template = {node: i for i, node in enumerate(template)}
    in_previous = {node: i for i, node in enumerate(previous)}
    weight_of = {node: local for local, node in own_weights.get(last, {}).items()}
    _check_repeat(previous, template, in_previous, by_layer.get(before - 1, []), own_weights,
                  before, last)

    # Readers of the last layer outside it (the final norm): they move to the new last layer.
    outside_readers = [
        (user, node) for node in template for user in node.users if user not in in_template
    ]
    order = {node: i for i, node in enumerate(nodes)}
    anchor = template[-1].next
    if any(order[user] < order[anchor] for user, _ in outside_readers if user in order):
        raise NotRepeatable("a node outside the layers sits between the last layer's nodes")
    first_input = next(n for n in nodes if n.op == "placeholder" and "dsc_input" in n.meta)
    own_state = [
        dict((*layer.named_parameters(remove_duplicate=False),
              *layer.named_buffers(remove_duplicate=False)))
        for layer in stack.layers
    ]

    prior = template  # the layer whose outputs the next copy reads
    for k in range(TRACED_LAYERS, len(stack.layers)):
        placeholders: dict[fx.Node, fx.Node] = {}
        for node, local in weight_of.items():
            if local not in own_state[k]:
                raise NotRepeatable(f"layer {k} has no {local}")
            name = f"{weight_prefix}{k}.{local}"
            tensor = own_state[k][local].detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            weights[name] = tensor
            with graph.inserting_before(first_input):  # weights first, as export orders them
                new = graph.placeholder(f"{node.name}_{k}")
            new.meta = {**node.meta, "dsc_weight": name}
            placeholders[node] = new

        copies: list[fx.Node] = []

        def remap(arg: fx.Node, copies: list[fx.Node] = copies, prior: list[fx.Node] = prior,
                  placeholders: dict[fx.Node, fx.Node] = placeholders) -> fx.Node:
            if arg in in_template:
                return copies[in_template[arg]]
            if arg in in_previous:
                return prior[in_previous[arg]]
            return placeholders.get(arg, arg)  # a shared value: rotary tables, masks, positions

        with graph.inserting_before(anchor):
            for node in template:
                copy = graph.node_copy(node, remap)
                copy.meta = _renumbered(node.meta, module_prefix, last, k)
                copies.append(copy)
        prior = copies

    for user, node in outside_readers:
        user.replace_input_with(node, prior[in_template[node]])
    graph.lint()
    gm.recompile()


def _check_repeat(
    previous: list[fx.Node],
    template: list[fx.Node],
    in_previous: dict[fx.Node, int],
    earlier: list[fx.Node],
    own_weights: dict[int, dict[str, fx.Node]],
    before: int,
    last: int,
) -> None:
    """Layer `last` must be layer `before` again, one step further down the stack."""
    in_earlier = {node: i for i, node in enumerate(earlier)}
    weight_local = {node: (layer, local) for layer, named in own_weights.items()
                    for local, node in named.items()}

    def same(a: Any, b: Any) -> bool:
        """Does argument b of a `last` node play the role argument a plays in `before`?"""
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            if a in in_previous:  # from inside the layer: the corresponding node
                return b is template[in_previous[a]]
            if a is b:  # shared by every layer (tables, masks, sizes computed once)
                return a not in weight_local
            if a in in_earlier:
                # Layer `before` reads layer before-1's output; `last` must read the same output
                # of `before`. Layer 0 may hold extra nodes (sizes computed once), so outputs are
                # matched counting from the layer's end.
                return (b in in_previous and a.target == b.target
                        and len(earlier) - in_earlier[a] == len(previous) - in_previous[b])
            if a in weight_local and b in weight_local:  # its own weight, the next layer's
                (layer_a, local_a), (layer_b, local_b) = weight_local[a], weight_local[b]
                return (layer_a, layer_b, local_a) == (before, last, local_b)
            return False
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            return False
        return type(a) is type(b) and a == b

    for p, t in zip(previous, template):
        if p.target != t.target:
            raise NotRepeatable(f"layer {last} runs {t.target} where layer {before} ran {p.target}")
        if not (same(p.args, t.args) and same(p.kwargs, t.kwargs)):
            raise NotRepeatable(f"layer {last}'s {t.name} differs from layer {before}'s {p.name}")


def _renumbered(meta: dict, module_prefix: str, old: int, new: int) -> dict:
    """A copy of a node's meta whose module paths name layer `new` instead of `old`."""
    meta = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        was, now = f"{module_prefix}{old}", f"{module_prefix}{new}"
        meta["nn_module_stack"] = {
            key: ((path.replace(was, now, 1) if path == was or path.startswith(was + ".")
                   else path), kind)
            for key, (path, kind) in stack.items()
        }
    return meta
