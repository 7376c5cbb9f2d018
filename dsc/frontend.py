"""Frontend: a model object to an aten-level torch.fx graph with weights as named inputs.

`torch.export` (non-strict) traces the model with `use_cache=False` and dynamic batch and sequence
dimensions; `run_decompositions({})` inlines higher-order wrappers while keeping high-level ops
(linear, layer_norm, scaled_dot_product_attention) that recognition passes look for. Every weight
becomes a placeholder whose `meta["dsc_weight"]` is its qualified name; every node has
`meta["val"]`. Failures are reported as `TraceError` naming the op and the model source line.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx

from dsc.dynamic_rope import rope_switch_length, traceable_dynamic_rope
from dsc.errors import TraceError
from dsc.hub_functions import dsc_sequence_mixers
from dsc.repeat_layers import (
    TRACED_LAYERS,
    NotRepeatable,
    cut_to_traced,
    find_layer_stack,
    stamp_layers,
)

__all__ = ["TracedModel", "ModelInfo", "trace", "default_positions", "model_info", "USER_INPUTS"]

# The user inputs a traced graph can take, in placeholder order.
USER_INPUTS = ("input_ids", "attention_mask", "position_ids")

_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 5
# The longer sequence a traced graph is checked on: past two 64-token chunks.
_PROBE_SEQ = 2 * 64 + 3
# Parameters x tokens past which the check is not run on the CPU (about a 1B model).
_CPU_PROBE_BUDGET = 1.5e11

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What the runtime and later passes need to know about the model, read from its config."""

    output: str  # "logits" or "last_hidden_state"
    vocab_size: int | None
    num_heads: int | None
    num_kv_heads: int | None
    num_layers: int | None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    max_positions: int | None = None
    name: str = ""
    sliding_window: int | None = None  # keys a query may see, when some layer limits them
    rope_switch_at: int | None = None  # longrope: past this length the long factors apply

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TracedModel:
    gm: fx.GraphModule
    weights: dict[str, torch.Tensor]
    inputs: list[str]
    info: ModelInfo
    stamped_layers: int = 0  # layers built by copying a traced one (dsc.repeat_layers)
    not_stamped_because: str = ""  # why a stack of layers was traced whole


class _Forward(torch.nn.Module):
    """Calls the model the way dsc serves it: keyword inputs, no HF cache, one output tensor."""

    def __init__(self, model: torch.nn.Module, inputs: list[str], output: str, extra: dict):
        super().__init__()
        self.model = model
        self.input_names = inputs
        self.output = output
        self.extra = extra

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.input_names, args)), **self.extra)
        if isinstance(out, torch.Tensor):  # a plain token model returning one tensor
            return out
        return out[self.output] if isinstance(out, dict) else getattr(out, self.output)


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _sliding_window(config: Any) -> int | None:
    """The attention window of the model's sliding-window layers, if it has any: HF configs name
    it `sliding_window`, switched off by `use_sliding_window=False` (Qwen2) or by `layer_types`
    holding no "sliding_attention" layer; GPT-Neo's local layers take `window_size`."""
    if "local" in (getattr(config, "attention_layers", None) or []):
        return _config_int(config, "window_size")
    window = _config_int(config, "sliding_window")
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Facts about the model read from its config (heads, vocabulary, stop tokens)."""
    config = getattr(model, "config", None)
    output = "logits" if hasattr(model, "get_output_embeddings") and (
        model.get_output_embeddings() is not None
    ) else "last_hidden_state"
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and config is not None:
        eos = getattr(config, "eos_token_id", None)
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    heads = _config_int(config, "num_attention_heads", "n_head")
    return ModelInfo(
        output=output,
        vocab_size=_config_int(config, "vocab_size"),
        num_heads=heads,
        num_kv_heads=_config_int(config, "num_key_value_heads") or heads,
        num_layers=_config_int(config, "num_hidden_layers", "n_layer"),
        eos_token_id=eos_list,
        pad_token_id=_config_int(config, "pad_token_id"),
        max_positions=_config_int(config, "max_position_embeddings", "n_positions"),
        name=type(model).__name__,
        sliding_window=_sliding_window(config),
        rope_switch_at=rope_switch_length(model),
    )


@contextlib.contextmanager
def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Temporarily give the model's floating weights `dtype`; the originals come back untouched."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    tensors = list(model.parameters()) + list(model.buffers())
    try:
        if dtype is not None:
            for t in tensors:
                if t.is_floating_point() and t.dtype != dtype:
                    saved.append((t, t.data))
                    t.data = t.data.to(dtype)
        yield
    finally:
        for t, data in saved:
            t.data = data


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and dsc: the model's own source line."""
    frames = traceback.extract_tb(exc.__traceback__)
    text = "".join(traceback.format_exception(exc))
    ours = [f for f in frames if "/torch/" not in f.filename and "/dsc/" not in f.filename]
    if ours:
        f = ours[-1]
        return f"{f.filename}:{f.lineno} ({f.line})"
    match = re.findall(r'File "([^"]+)", line (\d+)', text)
    return ":".join(match[-1]) if match else "unknown location"


def _op_name(exc: BaseException) -> str:
    match = re.search(r"(aten\.\w+(?:\.\w+)?|torch\.\w+(?:\.\w+)*|Could not guard on[^\n]*)", str(exc))
    return match.group(1) if match else type(exc).__name__


def trace(
    model: torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
    max_batch: int = 64,
    max_seq_len: int = 4096,
    position_ids: bool = False,
    repeat_layers: bool = True,
) -> TracedModel:
    """Export `model` to an aten graph with dynamic batch and sequence dimensions.

    position_ids: make positions a graph input (generation needs them: a decode step's position
    is not its index). Without it the model computes its own default positions, as model(...)
    does — which differs between architectures for padded batches.
    repeat_layers: trace the first layers of a stack of identical layers and copy the last one
    for the rest (`dsc.repeat_layers`); the model is traced whole where that is not provably the
    same graph.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"dsc.compile needs a torch.nn.Module, got {type(model).__name__}.")
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "input_ids" not in params:
        raise TraceError(
            f"{type(model).__name__}.forward has no `input_ids` argument; dsc compiles token models "
            "(HF transformers causal LMs and encoders)."
        )
    inputs = [name for name in USER_INPUTS if name in params]
    if not position_ids:
        inputs = [name for name in inputs if name != "position_ids"]
    extra: dict[str, Any] = {"return_dict": True} if "return_dict" in params or takes_kwargs else {}
    if "use_cache" in params or takes_kwargs:
        extra["use_cache"] = False
    info = model_info(model)
    wrapper = _Forward(model, inputs, info.output, extra).eval()

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seq = min(_EXAMPLE_SEQ, max_seq_len)
    args = _example(info, inputs, seq, device)
    batch_dim = torch.export.Dim("batch", min=1, max=max(max_batch, _EXAMPLE_BATCH))
    max_seq = max(max_seq_len, seq + 1)
    if info.max_positions:
        max_seq = min(max_seq, info.max_positions)
    seq_dim = torch.export.Dim("seq", min=1, max=max(max_seq, seq + 1))
    dynamic = tuple({0: batch_dim, 1: seq_dim} for _ in inputs)
    stack = find_layer_stack(model) if repeat_layers else None
    gm = weights = None
    stamped, refused = 0, ""
    if stack is not None:
        try:
            with cut_to_traced(stack):
                exported = _export(model, wrapper, args, dynamic, inputs, dtype)
            gm, weights = _lift_weights(exported, inputs, dtype)
            stamp_layers(gm, weights, stack, dtype)
            why = _differs_from_model(gm, weights, model, wrapper, args, dtype)
            if why is not None:
                raise NotRepeatable(f"the stamped graph {why}")
            stamped = len(stack.layers) - TRACED_LAYERS
        except Exception as why:  # noqa: BLE001 — any failure here only costs the shortcut
            # NotRepeatable says why the layers differ; a model whose code insists on its full
            # depth (a TraceError from the cut export) or anything unforeseen falls back too.
            log.info("tracing %s whole: %s", type(model).__name__, why)
            gm = weights = None
            first_line = str(why).partition("\n")[0]
            refused = first_line if isinstance(why, NotRepeatable) else (
                f"{type(why).__name__}: {first_line}")
    if gm is None:
        exported = _export(model, wrapper, args, dynamic, inputs, dtype)
        gm, weights = _lift_weights(exported, inputs, dtype)
    ids_val = next(n.meta["val"] for n in gm.graph.nodes if n.meta.get("dsc_input") == "input_ids")
    if not all(isinstance(d, torch.SymInt) for d in ids_val.shape):
        raise TraceError(
            f"{type(model).__name__} traced only for input shape {tuple(ids_val.shape)} (its code "
            "branches on the batch or sequence length); dsc needs a shape-generic graph."
        )
    _check_length(gm, weights, model, wrapper, inputs, info, max_seq, dtype, device)
    return TracedModel(gm=gm, weights=weights, inputs=inputs, info=info, stamped_layers=stamped,
                       not_stamped_because=refused)


def _export(
    model: torch.nn.Module,
    wrapper: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    dynamic: tuple[dict, ...],
    inputs: list[str],
    dtype: torch.dtype | None,
) -> torch.export.ExportedProgram:
    """torch.export of the wrapper with dynamic batch and sequence, decomposed to aten."""
    try:
        with (_cast_parameters(model, dtype), torch.no_grad(), traceable_dynamic_rope(model),
              dsc_sequence_mixers(model)):
            try:
                exported = torch.export.export(wrapper, args, dynamic_shapes=(dynamic,),
                                               strict=False)
            except Exception as exc:
                if "Constraints violated" not in str(exc):
                    raise
                # Some kernels' dispatch (CUDA sdpa pads masks to multiples of 8) adds guards
                # the solver cannot prove for every length in range, though they hold; let
                # export keep them as runtime checks instead of refusing the bounds.
                auto = tuple({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
                             for _ in inputs)
                exported = torch.export.export(wrapper, args, dynamic_shapes=(auto,),
                                               strict=False)
            return exported.run_decompositions({})
    except Exception as exc:  # export raises many types; all mean "cannot trace"
        raise TraceError(
            f"could not trace {type(model).__name__}: {_op_name(exc)} at {_user_frame(exc)}.\n"
            f"torch.export said: {str(exc).strip().splitlines()[0][:500]}"
        ) from exc


def _differs_from_model(
    gm: fx.GraphModule,
    weights: dict[str, torch.Tensor],
    model: torch.nn.Module,
    wrapper: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    dtype: torch.dtype | None,
) -> str | None:
    """How the traced graph's output on `args` differs from the model's own ("differs from the
    model by ...", "fails: ...", "gives shape ..."), or None when it does not (beyond rounding)
    or when the model itself cannot run them (a length past positions it does not name)."""
    user = iter(args)
    feed = [weights[n.meta["dsc_weight"]] if "dsc_weight" in n.meta else next(user)
            for n in gm.graph.nodes if n.op == "placeholder"]
    with _cast_parameters(model, dtype), torch.no_grad():
        try:
            want = wrapper(*args)
        except Exception:  # noqa: BLE001 — nothing to compare with
            return None
        try:
            got = gm(*feed)
        except Exception as exc:  # noqa: BLE001 — a graph that cannot run differs
            return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    got = got[0] if isinstance(got, (tuple, list)) else got
    if got.shape != want.shape:
        return f"gives shape {tuple(got.shape)}, the model {tuple(want.shape)}"
    # The same ops run in both; only rounding may differ, at the output's own precision.
    tolerance = 1e-4 if want.dtype == torch.float32 else 2e-2
    want, got = want.float(), got.float()
    error = float((got - want).norm() / want.norm().clamp(min=1e-12))
    return None if error <= tolerance else f"differs from the model by {error:.2e} (relative)"


def _example(info: ModelInfo, inputs: list[str], seq: int,
             device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch of _EXAMPLE_BATCH unpadded random sequences of `seq` tokens, as `inputs`."""
    generator = torch.Generator().manual_seed(seq)  # the caller's random stream stays as it was
    example = {
        "input_ids": torch.randint(0, max(2, (info.vocab_size or 2) - 1), (_EXAMPLE_BATCH, seq),
                                   generator=generator),
        "attention_mask": torch.ones(_EXAMPLE_BATCH, seq, dtype=torch.long),
        "position_ids": torch.arange(seq).expand(_EXAMPLE_BATCH, seq).contiguous(),
    }
    return tuple(example[name].to(device) for name in inputs)


def _check_length(gm: fx.GraphModule, weights: dict[str, torch.Tensor], model: torch.nn.Module,
                  wrapper: torch.nn.Module, inputs: list[str], info: ModelInfo, longest: int,
                  dtype: torch.dtype | None, device: torch.device) -> None:
    """The graph, traced on a few tokens, must answer as the model does on a longer sequence:
    a Python loop over chunks of the sequence (a state-space layer's scan) runs at trace time
    as often as the example needs, and the graph would keep that count for every length.
    Skipped for a large model held on the CPU, where the two forward passes would take
    minutes (on a GPU they take milliseconds)."""
    seq = min(_PROBE_SEQ, longest)
    parameters = sum(p.numel() for p in model.parameters())
    if seq <= _EXAMPLE_SEQ or (device.type == "cpu" and parameters * seq > _CPU_PROBE_BUDGET):
        return
    why = _differs_from_model(gm, weights, model, wrapper, _example(info, inputs, seq, device),
                              dtype)
    if why is not None:
        raise TraceError(
            f"{type(model).__name__} traced on {_EXAMPLE_SEQ} tokens does not answer as the "
            f"model does on {seq} (the graph {why}): its code fixes something to the traced "
            "length, such as a loop over chunks of the sequence in a state-space or "
            "linear-attention layer whose function dsc does not trace as its own op "
            "(dsc.hub_functions lists those it does). dsc cannot compile it.")


def _lift_weights(
    exported: torch.export.ExportedProgram, inputs: list[str], dtype: torch.dtype | None
) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """Turn the exported program into a plain GraphModule with one placeholder per weight."""
    from torch.export.graph_signature import InputKind

    gm = exported.graph_module
    state = dict(exported.state_dict)
    state.update(exported.constants)
    weights: dict[str, torch.Tensor] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user_inputs = iter(inputs)
    for node, spec in zip(placeholders, exported.graph_signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            node.meta["dsc_input"] = next(user_inputs)
            continue
        tensor = state[spec.target]
        name = spec.target.removeprefix("model.")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)  # as traced: _cast_parameters cast buffers too
        weights[name] = tensor.detach()
        node.meta["dsc_weight"] = name
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (
            torch.ops.aten._assert_tensor_metadata.default,
            torch.ops.aten._assert_scalar.default,
        ):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    new = fx.GraphModule(torch.nn.Module(), gm.graph)
    new.recompile()
    return new, weights


def position_rule(mask: torch.Tensor, rule: str) -> torch.Tensor:
    """Positions by a named rule: 'arange' (the padded index) or 'cumsum' (count of real tokens)."""
    if rule == "arange":
        return torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def default_positions(model: torch.nn.Module, traced: TracedModel) -> str | None:
    """The rule by which `model` computes positions when none are given, found by running it.

    Architectures differ for padded batches (Llama counts the padded index, OPT counts real
    tokens); one small left-padded probe tells which, so one trace with positions as an input
    can serve the forward entry point too. None when neither rule reproduces the model.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    vocab = max(2, (traced.info.vocab_size or 2) - 1)
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], device=device)
    extra = {"use_cache": False} if traced.info.output == "logits" else {}
    name = traced.info.output
    with torch.no_grad():
        ref = getattr(model(input_ids=ids, attention_mask=mask, **extra), name).float()
        real = mask.bool()
        for rule in ("arange", "cumsum"):
            out = getattr(model(input_ids=ids, attention_mask=mask,
                                position_ids=position_rule(mask, rule), **extra), name).float()
            scale = ref[real].abs().max().clamp(min=1e-6)
            if float((out[real] - ref[real]).abs().max() / scale) < 1e-3:
                return rule
    return None
