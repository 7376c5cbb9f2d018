"""Gated activation in one pass: out = act(gate) * up (SwiGLU, GeGLU).

After the merged gate/up projection, gate and up are the two halves of one [rows, 2F] tensor.
Torch runs the activation and the product as two kernels with a round trip in between; here each
program reads a block of both halves once and writes the product once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import pdl

__all__ = ["gated_activation"]

_KINDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.jit
def _gated_kernel(gate_ptr, up_ptr, out_ptr, F, s_gate, s_up, s_out,
                  KIND: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.wait_and_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(gate_ptr + row * s_gate + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * s_up + cols, mask=ok, other=0.0).to(tl.float32)
    if KIND == 0:
        a = g / (1.0 + tl.exp(-g))
    elif KIND == 1:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif KIND == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    else:
        a = tl.maximum(g, 0.0)
    tl.store(out_ptr + row * s_out + cols, (a * u).to(out_ptr.dtype.element_ty), mask=ok)


def gated_activation(gate: Tensor, up: Tensor, kind: str, *, out: Tensor | None = None) -> Tensor:
    """act(gate) * up over [..., F] tensors whose last dimension is contiguous."""
    if kind not in _KINDS:
        raise ValueError(f"unknown activation {kind!r}; known: {sorted(_KINDS)}")
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    width = gate.shape[-1]
    g2 = gate.reshape(-1, width) if gate.stride(-1) == 1 else gate.contiguous().view(-1, width)
    u2 = up.reshape(-1, width) if up.stride(-1) == 1 else up.contiguous().view(-1, width)
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    o2 = out.view(-1, width)
    block = min(1024, triton.next_power_of_2(width))
    _gated_kernel[(g2.shape[0], triton.cdiv(width, block))](
        g2, u2, o2, width, g2.stride(0), u2.stride(0), o2.stride(0),
        KIND=_KINDS[kind], BLOCK=block, **pdl.launch_options(gate.device),
    )
    return out
