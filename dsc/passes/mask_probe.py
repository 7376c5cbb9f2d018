"""Classify an attention mask computed inside the graph by evaluating it on probe inputs.

HF models build masks from `attention_mask` with long chains of arange/compare/index ops that
change between releases. Rather than match those chains, the subgraph that computes the mask is
copied out and run on a padded probe batch; its result is compared with the masks dsc knows:

    causal:        query i may attend key j  iff  j <= i  and  attention_mask[b, j]
    bidirectional: query i may attend key j  iff  attention_mask[b, j]
    sliding:       causal, and  i - j < window  (slots counted with padding, as HF counts them)

Rows of padding queries are not compared (HF rewrites them in ways that differ between paths).
A window only shows on a probe longer than itself: the six-token probe finds short ones, and a
causal mask is probed again, at the length of the window the config names (`ModelInfo
.sliding_window`) when that is shorter than the target's `max_seq_len`, else at `max_seq_len`
itself (at most the model's positions and `MAX_PROBED_WINDOW`), so a window under any name
that could apply to the plan's sequences is found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from dsc.passes.context import PassContext
from dsc.passes.graph_utils import ancestors
from dsc.target import MAX_PROBED_WINDOW

__all__ = ["MaskKind", "alibi_slopes", "classify_mask"]

_PROBE_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


@dataclass(frozen=True)
class MaskKind:
    causal: bool
    uses_padding: bool
    window: int = 0  # a causal sliding window: keys a query sees, itself included (0: none)


def _probe_inputs(ctx: PassContext, probe_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    batch, seq = probe_mask.shape
    vocab = ctx.info.vocab_size or 2
    return {
        # A generator of its own: compiling leaves the caller's random stream as it was.
        "input_ids": torch.randint(0, max(vocab - 1, 1), (batch, seq),
                                   generator=torch.Generator().manual_seed(0)),
        "attention_mask": probe_mask.clone(),
        "position_ids": (probe_mask.cumsum(-1) - 1).clamp(min=0),
    }


def evaluate_subgraph(node: fx.Node, ctx: PassContext, inputs: dict[str, torch.Tensor]):
    """Run only the ancestors of `node` on concrete inputs; None if it needs anything else."""
    needed = ancestors([node])
    env: dict[fx.Node, object] = {}
    for n in node.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            if "dsc_input" in n.meta and n.meta["dsc_input"] in inputs:
                env[n] = inputs[n.meta["dsc_input"]]
            elif "dsc_weight" in n.meta and n.meta["dsc_weight"] in ctx.weights:
                env[n] = ctx.weights[n.meta["dsc_weight"]].cpu()
            else:
                return None
            continue
        if n.op != "call_function":
            return None
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if "device" in kwargs:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        env[n] = n.target(*args, **kwargs)
    return env[node]


def _evaluate(node: fx.Node, ctx: PassContext, probe_mask: torch.Tensor) -> torch.Tensor | None:
    """node's value for the probe batch, or None when it is not a tensor computed from it."""
    try:
        with torch.no_grad():
            value = evaluate_subgraph(node, ctx, _probe_inputs(ctx, probe_mask))
    except Exception:  # any op that cannot run on the probe means: not a mask we know
        return None
    return value if isinstance(value, torch.Tensor) else None


def _allowed(mask: fx.Node, ctx: PassContext, probe_mask: torch.Tensor,
             inverted: bool = False) -> torch.Tensor | None:
    """The mask's value on the probe as bool [B, 1|H, L, L] (True: may attend), or None when it
    does not evaluate or is an additive bias rather than a mask. inverted: a bool mask of the
    slots that may not be attended (what masked_fill takes)."""
    batch, seq = probe_mask.shape
    value = _evaluate(mask, ctx, probe_mask)
    if value is None or value.dim() != 4 or (inverted and value.dtype != torch.bool):
        return None
    if value.dtype == torch.bool:
        allowed = ~value if inverted else value
    else:
        allowed = value > -1.0
        if bool((value[allowed] != 0).any()):
            return None  # an additive bias (ALiBi, relative position): not a plain mask
    try:
        return allowed.expand(batch, allowed.shape[1], seq, seq)
    except RuntimeError:
        return None


def _expected(probe_mask: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """[B, 1, L, L] bool: the known mask of that kind on the probe."""
    seq = probe_mask.shape[1]
    allowed = probe_mask.bool()[:, None, None, :].expand(-1, 1, seq, seq)
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    if causal:
        allowed = allowed & (j <= i)
    if window:
        allowed = allowed & (i - j < window)
    return allowed


def _matches(allowed: torch.Tensor, expected: torch.Tensor, probe_mask: torch.Tensor) -> bool:
    rows = probe_mask.bool()[:, None, :, None].expand_as(allowed)
    return bool((allowed == expected.expand_as(allowed))[rows].all())


def _window_seen(allowed: torch.Tensor, probe_mask: torch.Tensor, row: int) -> int:
    """The window a causal mask shows in the last query of a probe row whose padding is on the
    left: the number of keys it may attend when that is fewer than the row's real tokens, else
    0 (no window, or one longer than the probe)."""
    seen = int(allowed[row, 0, -1].sum())
    return seen if seen < int(probe_mask[row].sum()) else 0


def _classify(mask: fx.Node, ctx: PassContext, inverted: bool) -> MaskKind | None:
    allowed = _allowed(mask, ctx, _PROBE_MASK, inverted)
    if allowed is None:
        return None
    short_window = _window_seen(allowed, _PROBE_MASK, 1)
    kind = None
    for candidate in (
        MaskKind(causal=True, uses_padding=True, window=short_window),
        MaskKind(causal=False, uses_padding=True),
        MaskKind(causal=True, uses_padding=False, window=short_window),
        MaskKind(causal=False, uses_padding=False),
    ):
        probe = _PROBE_MASK if candidate.uses_padding else torch.ones_like(_PROBE_MASK)
        if _matches(allowed, _expected(probe, candidate.causal, candidate.window), _PROBE_MASK):
            kind = candidate
            break
    if kind is None or not kind.causal or kind.window:
        return kind
    hint = ctx.info.sliding_window
    positions = ctx.info.max_positions or ctx.target.max_seq_len
    longest = min(ctx.target.max_seq_len, positions)  # the longest sequence the plan serves
    if hint is not None and _PROBE_MASK.shape[1] <= hint < longest:
        if hint > MAX_PROBED_WINDOW:
            return None  # Target.check_against refuses such plans before tracing
        # The window the config names: one sequence, left-padded by two like the short probe's
        # first row, whose last query has window + 2 keys (unpadded, window + 1 tokens, where
        # that would pass the model's positions).
        if hint + 4 <= positions:
            probe = torch.ones(1, hint + 4, dtype=torch.long)
            probe[0, :2] = 0
        else:
            probe = torch.ones(1, hint + 1, dtype=torch.long)
        named = True
    else:
        # Any window shorter than the longest sequence the plan serves, whatever the config
        # calls it (or if it names none): one unpadded sequence that long.
        length = min(longest, MAX_PROBED_WINDOW)
        if length <= _PROBE_MASK.shape[1]:
            return kind
        probe = torch.ones(1, length, dtype=torch.long)
        named = False
    allowed = _allowed(mask, ctx, probe, inverted)
    if allowed is None:
        # The mask did not evaluate at that length (a buffer sized for fewer positions): a
        # window the config names stays unknown; without one, the short probe's kind stands.
        return None if named else kind
    window = _window_seen(allowed, probe, 0)
    padded_probe = probe if kind.uses_padding else torch.ones_like(probe)
    if not _matches(allowed, _expected(padded_probe, True, window), probe):
        return None
    return MaskKind(causal=True, uses_padding=kind.uses_padding, window=window)


def classify_mask(mask: fx.Node, ctx: PassContext, inverted: bool = False) -> MaskKind | None:
    """The kind of mask `mask` computes, or None when it is none of the known kinds; inverted:
    `mask` is True where attention is not allowed (masked_fill's mask). Evaluated once per mask
    node (layers share their masks)."""
    key = "dsc_mask_kind_inverted" if inverted else "dsc_mask_kind"
    if key not in mask.meta:
        mask.meta[key] = _classify(mask, ctx, inverted)
    return mask.meta[key]


def alibi_slopes(bias: fx.Node, ctx: PassContext, heads: int) -> list[float] | None:
    """One slope per head when `bias` computes ALiBi's score bias, else None.

    Evaluated on the padded probe, one row per sequence and head ([B * heads, 1, L] as BLOOM
    lays it out, [B, heads, 1, L], or [heads, 1, L] for every sequence as MPT's): in every row,
    each head's bias over the real keys must grow by its slope per key (BLOOM counts key
    positions from the row's first real token, MPT back from the last slot; softmax does not
    see a constant per row, so either is the attention of dsc's slope * (key slot - query
    slot)).
    """
    batch, seq = _PROBE_MASK.shape
    value = _evaluate(bias, ctx, _PROBE_MASK)
    if value is None or value.dim() < 2 or value.shape[-1] != seq or value.shape[-2] != 1:
        return None  # a bias that varies with the query, or of another layout
    if value.numel() == heads * seq:
        value = value.reshape(1, heads, seq).expand(batch, heads, seq)
    elif value.numel() == batch * heads * seq:
        value = value.reshape(batch, heads, seq)
    else:
        return None
    value = value.double()
    slopes = value[1, :, 1] - value[1, :, 0]  # probe row 1 has no padding
    key = torch.arange(seq, dtype=torch.float64)
    for row, real in enumerate(_PROBE_MASK.bool()):
        first = int(real.nonzero()[0])
        want = value[row, :, first : first + 1] + slopes[:, None] * (key - first)
        if not torch.allclose(value[row][:, real], want[:, real], rtol=1e-5, atol=1e-6):
            return None
    return [float(x) for x in slopes]
