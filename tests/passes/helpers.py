"""Helpers for pass tests: trace a small function to an aten graph and compare graph structure."""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

import dsc.ops  # noqa: F401  (registers the dsc ops)
from dsc.frontend import ModelInfo
from dsc.passes.context import PassContext
from dsc.target import Target


def export_fn(fn, *example: torch.Tensor, weights: dict[str, torch.Tensor] | None = None):
    """Export `fn(*inputs, *weights)` to a graph whose weight placeholders carry dsc_weight meta."""
    weights = weights or {}

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, w in weights.items():
                self.register_buffer(name, w)

        def forward(self, *xs):
            return fn(*xs, *[getattr(self, n) for n in weights])

    ep = torch.export.export(M(), tuple(example), strict=False).run_decompositions({})
    from torch.export.graph_signature import InputKind

    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = iter(f"x{i}" for i in range(len(example)))
    for node, spec in zip(placeholders, ep.graph_signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            node.meta["dsc_input"] = next(inputs)
        else:
            node.meta["dsc_weight"] = spec.target
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm = fx.GraphModule(torch.nn.Module(), gm.graph)
    return gm, dict(weights)


def context(weights: dict[str, torch.Tensor] | None = None, **target) -> PassContext:
    info = ModelInfo(output="logits", vocab_size=None, num_heads=None, num_kv_heads=None,
                     num_layers=None)
    return PassContext(target=Target(**target), weights=dict(weights or {}), info=info, inputs=[])


def export_and_run_passes(fn, *example: torch.Tensor, passes: list[str],
                          weights: dict[str, torch.Tensor] | None = None):
    """`export_fn`, then the named passes over the graph: (gm, weights)."""
    from dsc.passes.manager import PassManager

    gm, weights = export_fn(fn, *example, weights=weights)
    return PassManager(context(weights)).run(gm, passes), weights


def ops(gm: fx.GraphModule) -> Counter:
    """Counter of call_function targets by short name ('rms_norm', 'mul', ...)."""
    out = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            t = n.target
            out[getattr(t, "_opname", getattr(t, "__name__", str(t)))] += 1
    return out


def run(gm: fx.GraphModule, weights: dict[str, torch.Tensor], *inputs: torch.Tensor):
    """Execute a graph: weights by placeholder meta, inputs in order."""
    args, it = [], iter(inputs)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            args.append(weights[n.meta["dsc_weight"]] if "dsc_weight" in n.meta else next(it))
    gm.recompile()
    return gm(*args)


def decode_graph(name: str, passes: list[str]):
    """(PassManager, graph): a zoo model's decode graph after recognition and `passes` (a
    two-sequence, 16-slot cache)."""
    from dsc import zoo
    from dsc.compiler import _load_passes
    from dsc.frontend import trace
    from dsc.passes.manager import PassManager
    from dsc.pipelines import trunk

    _load_passes()
    model = zoo.build(name, init_std=0.3, seed=3)
    traced = trace(model, position_ids=True)
    ctx = PassContext(Target(max_batch=2, max_seq_len=16), traced.weights, traced.info,
                      traced.inputs)
    manager = PassManager(ctx)
    return manager, manager.run(traced.gm, trunk(ctx.target) + passes, program="decode")


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite (passes rewrite in place)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(torch.nn.Module(), graph)


def decode_inputs(manager, start: int) -> list[torch.Tensor]:
    """One decode step's inputs for `decode_graph`: a cache holding `start` random earlier
    tokens."""
    g = torch.Generator().manual_seed(start)
    caches = [torch.randn(spec["shape"], generator=g) for spec in manager.ctx.notes["cache"]]
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[:, : start + 1] = True
    ids = torch.randint(3, 100, (2, 1), generator=g)
    return [ids, torch.ones(2, 1, dtype=torch.long), torch.full((2, 1), start), valid,
            torch.tensor([start]), *caches]
