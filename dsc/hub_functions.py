"""HF's swappable sequence-mixing functions, traced as dsc ops.

HF's linear-attention and Mamba-2 layers call their sequence mixers through module-level
functions it marks as replaceable by kernels (`use_kernel_func_from_hub_with_fallback`:
chunk_gated_delta_rule, chunk_kda, causal_conv1d_fn, mamba_chunk_scan_combined). Their torch fallbacks do
not trace to a graph that serves every length: they loop over chunks of the sequence in
Python, so export keeps the iterations the length it saw needed, and a longer prompt would be
answered wrongly. While dsc traces, those functions are dsc ops instead (`dsc.ops.recurrent`):
one node each, whose state the `recurrent_state` pass gives a buffer for generation. A call
whose arguments the op does not take runs HF's function as before.

    torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=l2)
    chunk_kimi_delta_attention(q, k, v, g, beta, use_qk_l2norm_in_kernel=l2)
        -> (dsc.gated_delta_rule(q, k, v, g, beta, l2), None)
    causal_conv1d_fn(x, weight, bias, activation="silu")
        -> dsc.causal_conv1d(x, weight, bias, "silu")
    mamba2_chunk_scan(x, dt, A, B, C, chunk, D, dt_bias, dt_softplus=True, dt_limit=(lo, hi))
        -> dsc.ssm_scan(x, dt, A, B, C, D, dt_bias, True, lo, hi)
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from dsc.ops.recurrent import ACTIVATIONS

__all__ = ["REPLACED", "dsc_sequence_mixers"]


# Options of HF's functions that pack several sequences into one row; the ops take none.
_PACKING = ("cu_seqlens", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k")


def _no_extras(kwargs: dict[str, Any]) -> bool:
    """No sequences packed into a row (the rest of kwargs are the model's forward flags, which
    HF's functions drop too)."""
    return all(kwargs.get(name) is None for name in _PACKING)


def _gated_delta_rule(original: Callable) -> Callable:
    def traced(query, key, value, g, beta, chunk_size=64, initial_state=None,
               output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
        heads = query.shape[:3] == key.shape[:3] == value.shape[:3] == beta.shape and (
            g.shape in (beta.shape, key.shape))
        if initial_state is not None or output_final_state or not heads or not _no_extras(kwargs):
            return original(query, key, value, g=g, beta=beta, chunk_size=chunk_size,
                             initial_state=initial_state, output_final_state=output_final_state,
                             use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
        out = torch.ops.dsc.gated_delta_rule(query, key, value, g, beta,
                                             bool(use_qk_l2norm_in_kernel))
        return out, None

    return traced


def _causal_conv1d(original: Callable) -> Callable:
    def traced(hidden_states, weight, bias=None, activation=None, **kwargs):
        kind = {None: "", "silu": "silu", "swish": "silu"}.get(activation)
        if kind not in ACTIVATIONS or weight.dim() != 2 or not _no_extras(kwargs):
            return original(hidden_states, weight, bias, activation=activation, **kwargs)
        return torch.ops.dsc.causal_conv1d(hidden_states, weight, bias, kind)

    return traced


def _mamba2_chunk_scan(original: Callable) -> Callable:
    def traced(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
               dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
               **kwargs):
        if (initial_states is not None or return_final_states or kwargs.get("z") is not None
                or not _no_extras(kwargs) or A.dim() != 1 or (D is not None and D.dim() != 1)):
            return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                            initial_states=initial_states, dt_softplus=dt_softplus,
                            dt_limit=dt_limit, return_final_states=return_final_states,
                            **kwargs)
        return torch.ops.dsc.ssm_scan(hidden_states, dt, A, B, C, D, dt_bias, bool(dt_softplus),
                                      float(dt_limit[0]), float(dt_limit[1]))

    return traced


# The module-level name HF's layers call -> what dsc traces in its place.
REPLACED: dict[str, Callable[[Callable], Callable]] = {
    "torch_chunk_gated_delta_rule": _gated_delta_rule,
    "chunk_kimi_delta_attention": _gated_delta_rule,  # its decay per key lane
    "causal_conv1d_fn": _causal_conv1d,
    "mamba2_chunk_scan": _mamba2_chunk_scan,
}


@contextmanager
def dsc_sequence_mixers(model: torch.nn.Module) -> Iterator[None]:
    """While inside, the modules that define `model`'s layers call dsc ops for REPLACED."""
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()} - {None}
    saved = []
    for module in modules:
        for name, replacement in REPLACED.items():
            original = getattr(module, name, None)
            if callable(original):
                saved.append((module, name, original))
                setattr(module, name, replacement(original))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
