"""Does a compiled decode step continue the forward pass? Checked once, at compile.

A plan's decode step sees one new token and the KV cache. That is all a transformer needs, but a
model that carries other state along the sequence — a state-space (Mamba) or convolution layer
beside its attention — would decode from a cache that lacks it and answer wrongly without any
error. So `compile` runs the plan once on a short random prompt: the prefill of n + 1 tokens,
and the prefill of n tokens followed by one decode step. Their last logits must agree (up to the
dtype's rounding across kernels); when they do not, the plan keeps its forward entry only and
`generate` says why. (The prefill program, not the forward one: generation needs its kernels
anyway, so on a GPU the check compiles none that the first `generate` would not.)

Not run for tensor-parallel plans (every rank would have to run it in step) or with weight
offload (a forward pass would stream every weight from CPU memory or disk).
"""

from __future__ import annotations

import torch

from dsc.runtime.model import CompiledModel

__all__ = ["decode_disagrees", "decode_error"]

_PROMPT = 4  # tokens of the prefill before the decode step
# Relative error of the last logits that rounding stays under: one row's GEMV and five rows'
# tiles sum in other orders, which in 16-bit activations compounds over the layers. Losing a
# layer's state is an O(1) error (0.85 and 1.4 in the tests' fp32 models).
_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.3, torch.float16: 0.3}


def decode_error(compiled: CompiledModel) -> float | None:
    """Relative error between the last logits of the prefill of n + 1 tokens and of the prefill
    of n and one decode step; None when the check does not apply (see the module docstring)."""
    target = compiled.target
    if target.world_size > 1 or target.offload or target.max_seq_len <= _PROMPT:
        return None
    vocab = compiled.info.get("vocab_size") or 2
    generator = torch.Generator().manual_seed(0)  # the caller's random stream stays as it was
    ids = torch.randint(0, vocab, (1, _PROMPT + 1), generator=generator).to(compiled.device)
    mask = torch.ones_like(ids)
    positions = torch.arange(_PROMPT + 1, device=compiled.device)[None]
    with torch.no_grad():
        full = compiled._prefill(ids, mask, positions).float()
        compiled._prefill(ids[:, :_PROMPT], mask[:, :_PROMPT], positions[:, :_PROMPT])
        step = compiled._decode(ids[:, _PROMPT:], positions[:, _PROMPT:], _PROMPT).float()
    return float((step - full).norm() / full.norm().clamp_min(1e-30))


def decode_disagrees(compiled: CompiledModel) -> str | None:
    """Why the decode step does not continue the forward pass, or None when it does (or when
    the check does not apply)."""
    error = decode_error(compiled)
    if error is None or error <= _TOLERANCE[compiled.target.torch_dtype]:
        return None
    return (f"its decode step does not continue its forward pass (last logits {error:.2g} apart "
            f"in relative error): the model carries state along the sequence outside attention "
            f"(a state-space or convolution layer) that a KV cache does not hold")
