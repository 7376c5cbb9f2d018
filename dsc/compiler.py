"""`dsc.compile`: trace, run the pass pipeline, lower to a Plan, bind it to the runtime."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from dsc.errors import TraceError

import dsc.ops  # noqa: F401  (registers the dsc op set)
from dsc import passes as _passes  # noqa: F401
from dsc.codegen.lower import lower
from dsc.codegen.select import choose_kernels
from dsc.codegen.triton_codegen import region_sources
from dsc.decode_check import decode_disagrees
from dsc.frontend import default_positions, model_info, trace
from dsc.passes.context import PassContext
from dsc.passes.manager import PassManager
from dsc.passes.tensor_parallel import collective_kernels
from dsc.pipelines import backend, cached, partition, trunk
from dsc.plan import Plan
from dsc.runtime import generated
from dsc.runtime.model import CompiledModel
from dsc.target import Target, as_target

__all__ = ["compile"]


aten = torch.ops.aten


def _load_passes() -> None:
    """Import every pass module so its @register runs."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(_passes.__path__):
        importlib.import_module(f"dsc.passes.{module.name}")


def _not_a_decoder_because(gm: fx.GraphModule) -> str | None:
    """Why the model cannot generate (None when it can: every recognised attention is causal)."""
    attentions = [n for n in gm.graph.nodes if n.target is torch.ops.dsc.attention.default]
    if not attentions:
        return ("no attention was recognised in its graph (recognize_attention takes attention "
                "with a causal, padding or causal sliding-window mask, and the ALiBi biases of "
                "BLOOM, MPT and Falcon; other position biases are not matched), so it has no KV "
                "cache")
    if not all(n.args[4] for n in attentions):
        return "its attention is not causal (an encoder)"
    return None


def _positions_only_in_alibi(gm: fx.GraphModule) -> bool:
    """A model without position_ids can still generate when every attention takes ALiBi slopes
    (BLOOM): its positions enter only through that bias, which the op measures between cache
    slots. Nothing else may count positions: no arange left in the graph, and the attention
    mask read only as the keys' validity."""
    attentions = [n for n in gm.graph.nodes if n.target is torch.ops.dsc.attention.default]
    if not attentions or any(n.kwargs.get("alibi") is None for n in attentions):
        return False
    if any(n.target in (aten.arange.default, aten.arange.start, aten.arange.start_step)
           for n in gm.graph.nodes):
        return False
    mask = next((n for n in gm.graph.nodes if n.meta.get("dsc_input") == "attention_mask"), None)
    return mask is None or all(user.meta.get("dsc_key_valid") for user in mask.users)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy of the graph (node meta shared: it is read-only)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(torch.nn.Module(), graph)


def _rank(target: Target) -> int:
    """This process's rank: 0 alone; for tp > 1 (one process per rank, under torchrun) the rank
    in the default process group, which is created from torchrun's environment if needed."""
    if target.world_size == 1:
        return 0
    from dsc.runtime.distributed import init

    return init(target.device, target.world_size)


def _kernels(gm: fx.GraphModule, program: str, target: Target) -> dict[str, str]:
    return {**choose_kernels(gm, program, target), **collective_kernels(gm)}


def compile(model: torch.nn.Module, target: Target | str | dict[str, Any] = "cpu") -> CompiledModel:
    """Compile a HF transformers model (or any token model) for `target`."""
    _load_passes()
    target = as_target(target)
    target.check_machine()
    if isinstance(model, torch.nn.Module):  # refuse a split the model cannot take before any work
        info = model_info(model)
        target.check_against(info)
    rank = _rank(target)
    limits = dict(dtype=target.torch_dtype, max_batch=target.max_batch,
                  max_seq_len=target.max_seq_len)
    # One trace serves every entry point: positions are an input (a decode step's position is
    # not its index) and the forward entry feeds the positions the model would compute itself.
    traced = trace(model, **limits, position_ids=True)
    positions = default_positions(model, traced) if "position_ids" in traced.inputs else None
    if "position_ids" in traced.inputs and positions is None:
        traced = trace(model, **limits)  # defaults we cannot name: let the graph compute them
    target.check_against(traced.info)
    ctx = PassContext(target=target, weights=traced.weights, info=traced.info, inputs=traced.inputs,
                      rank=rank)
    manager = PassManager(ctx)
    shared = manager.run(traced.gm, trunk(target), program="forward")
    recognised_weights = dict(ctx.weights)
    not_a_decoder_because = _not_a_decoder_because(shared)
    decoder = _copy(shared) if not_a_decoder_because is None else None
    forward = manager.run(shared, partition(target) + backend(target), program="forward")
    programs = {"forward": lower(forward, "forward", _kernels(forward, "forward", target))}
    model_facts = {**traced.info.to_dict(), "default_positions": positions,
                   "stamped_layers": traced.stamped_layers,
                   "not_stamped_because": traced.not_stamped_because,
                   "not_a_decoder_because": not_a_decoder_because}
    if decoder is not None:
        if "position_ids" not in traced.inputs and not _positions_only_in_alibi(decoder):
            raise TraceError(
                f"{traced.info.name}.forward takes no position_ids, so decode steps cannot be given "
                "their positions; dsc cannot generate with this model (forward still works)."
            )
        # Partitioning replaced whole weights by this rank's shards; the decode graph starts
        # again from the recognised ones (unused weights are dropped below).
        ctx.weights.update(recognised_weights)
        decoder = manager.run(decoder, cached(target) + partition(target) + backend(target),
                              program="decode")
        model_facts["cache"] = ctx.notes["cache"]
        for entry in ("prefill", "decode"):
            programs[entry] = lower(decoder, entry, _kernels(decoder, entry, target))
    model_facts["peak_activation_bytes"] = dict(ctx.notes.get("peak_activation_bytes", {}))
    device = torch.device(target.device)
    used = {ref for program in programs.values() for ref in program.weight_refs()}
    weights = {k: v.to(device) for k, v in ctx.weights.items() if k in used}
    plan = Plan(
        target=target, programs=programs, weights=weights, model=model_facts,
        kernel_sources=region_sources(programs.values()),
        history=[r.to_dict() for r in manager.history], rank=rank,
        world_size=target.world_size,
    )
    generated.register_sources(plan.kernel_sources)
    compiled = CompiledModel(plan, history=manager.history)
    if decoder is not None:
        why = decode_disagrees(compiled)
        if why is not None:  # forward only: generate() says why
            for entry in ("prefill", "decode"):
                del plan.programs[entry]
            plan.model.pop("cache")
            plan.model["not_a_decoder_because"] = why
            compiled = CompiledModel(plan, history=manager.history)
    return compiled
