"""Small helpers passes share: fake-value propagation, node matching, weight placeholders."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.utils._pytree as pytree
import torch.fx as fx
from torch._guards import detect_fake_mode

__all__ = [
    "add_weight",
    "all_reduce_into_residual",
    "is_op",
    "only_user",
    "set_meta",
    "fake_mode_of",
    "weight_name",
    "tensor_meta",
    "same_shape",
    "replace_with",
    "call",
    "ancestors",
]


def is_op(node: Any, *targets: Any) -> bool:
    """True when `node` is a call_function node of one of the given ops (overloads or packets)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    for target in targets:
        if node.target is target:
            return True
        packet = getattr(node.target, "overloadpacket", None)
        if packet is not None and packet is target:
            return True
    return False


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def tensor_meta(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def same_shape(a: Any, b: Any) -> bool:
    """Both nodes carry tensor metadata of one shape (symbolic sizes compared as written)."""
    va, vb = tensor_meta(a), tensor_meta(b)
    return va is not None and vb is not None and [str(d) for d in va.shape] == [
        str(d) for d in vb.shape
    ]


def fake_mode_of(gm: fx.GraphModule):
    vals = [n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def _to_fake(arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        return arg.meta["val"]
    if isinstance(arg, (list, tuple)):
        return type(arg)(_to_fake(a) for a in arg)
    return arg


def set_meta(node: fx.Node, mode=None) -> fx.Node:
    """Compute node.meta['val'] by running its op on the fake values of its inputs."""
    args = _to_fake(node.args)
    kwargs = {k: _to_fake(v) for k, v in node.kwargs.items()}
    if mode is None:
        leaves = pytree.tree_leaves((args, kwargs))  # cat's list of tensors too
        flat = [a for a in leaves if isinstance(a, torch.Tensor)]
        mode = detect_fake_mode(flat)
    with mode:
        if node.target is torch.ops.aten.linear.default:
            # Some torch builds decompose linear through numel(), which symbolic shapes refuse.
            x, weight = args[0], args[1]
            node.meta["val"] = x.new_empty((*x.shape[:-1], weight.shape[0]))
        else:
            node.meta["val"] = node.target(*args, **kwargs)
    return node


def call(graph: fx.Graph, target: Callable, args: tuple, kwargs: dict | None = None,
         like: fx.Node | None = None) -> fx.Node:
    """Create a call_function node and give it meta['val'] (and `like`'s stack trace)."""
    node = graph.call_function(target, args, kwargs or {})
    if like is not None and "stack_trace" in like.meta:
        node.meta["stack_trace"] = like.meta["stack_trace"]
    return set_meta(node)


def add_weight(gm: fx.GraphModule, ctx, name: str, make: Callable[[], torch.Tensor]) -> fx.Node:
    """The placeholder of weight `name`, made from `make()` (contiguous) on first use: once
    into ctx.weights for every program of the compile, once into this graph, ahead of the
    first placeholder."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and weight_name(node) == name:
            return node
    if name not in ctx.weights:  # another program of this compile may have made it already
        ctx.weights[name] = make().contiguous()
    tensor = ctx.weights[name]
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_before(first):
        node = gm.graph.placeholder(name.replace(".", "_").replace(":", "_"))
    node.meta["dsc_weight"] = name
    node.meta["val"] = fake_mode_of(gm).from_tensor(tensor, static_shapes=True)
    return node


def replace_with(old: fx.Node, new: fx.Node) -> None:
    """Route old's users to new and erase old (DCE alone keeps ops torch marks impure, e.g. sdpa)."""
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def weight_name(node: Any) -> str | None:
    """The qualified weight name when `node` is a weight placeholder, else None."""
    if isinstance(node, fx.Node) and node.op == "placeholder":
        return node.meta.get("dsc_weight")
    return None


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def all_reduce_into_residual(add: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(stream, reduced) when `add` is dsc.residual_add(stream, dsc.all_reduce(p)) (operands in
    either order), the sum read by the add alone and of the stream's shape; else None."""
    if not is_op(add, torch.ops.dsc.residual_add):
        return None
    first, second = add.args[0], add.args[1]
    if is_op(second, torch.ops.dsc.all_reduce):
        stream, reduced = first, second
    elif is_op(first, torch.ops.dsc.all_reduce):
        stream, reduced = second, first
    else:
        return None
    if len(reduced.users) != 1 or not same_shape(stream, reduced):
        return None
    return stream, reduced
