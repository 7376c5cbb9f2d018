"""CUDA implementations of dsc ops, called by plan steps named `cuda::<name>`.

Each wraps a hand-written Triton kernel from `dsc.kernels` with the op's calling convention
(leading dimensions flattened, cache written in place). Everything here is safe to capture in a
CUDA graph: no host synchronisation, positions read from device memory.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

import dsc.ops

__all__ = ["IMPLEMENTATIONS", "resolve", "unpadded_keys"]


@contextlib.contextmanager
def unpadded_keys(promise: bool) -> Iterator[None]:
    """With promise=True, the attention calls inside may assume no padding below start + S
    (prefill of a batch whose attention mask is all ones); see flash_attention.keys_unpadded."""
    if not promise:
        yield
        return
    from dsc.kernels.flash_attention import keys_unpadded

    with keys_unpadded():
        yield


_slopes: dict[tuple[tuple[float, ...], torch.device], Tensor] = {}


def _slopes_on(alibi: list[float] | None, device: torch.device) -> Tensor | None:
    """The op's ALiBi slopes as a float32 device tensor, made once per plan and device (its
    first call is the warm-up before any CUDA-graph capture, where no copy could be made)."""
    if alibi is None:
        return None
    key = (tuple(alibi), device)
    if key not in _slopes:
        _slopes[key] = torch.tensor(alibi, dtype=torch.float32, device=device)
    return _slopes[key]


def linear_small_batch(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    from dsc.kernels.small_batch_gemm import linear_small_batch as kernel
    from dsc.kernels.small_batch_gemm import small_batch_wins

    rows = x.reshape(-1, x.shape[-1])
    if not small_batch_wins(rows.shape[0], weight.shape[0]):
        return torch.nn.functional.linear(x, weight, bias)
    return kernel(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype) -> Tensor:
    from dsc.kernels.norms import rms_norm as kernel

    return kernel(x.contiguous(), weight, eps)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    from dsc.kernels.norms import layer_norm as kernel

    return kernel(x.contiguous(), weight, bias, eps)


def cached_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor,
    start: Tensor, causal: bool, scale: float, prefetch: Tensor | None = None, window: int = 0,
    alibi: list[float] | None = None, sinks: Tensor | None = None,
) -> Tensor:
    """Write the new keys/values at slots start.. (device index), then attend over the cache
    (within a sliding `window` when it is not 0, with `alibi` slopes and attention `sinks` when
    given). A decode step's kernel also pulls `prefetch` (the next projection's weight) toward
    L2."""
    from dsc.kernels.decode_attention import decode_attention
    from dsc.kernels.flash_attention import attention as kernel

    batch, _, seq, _ = k.shape
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3], device=q.device,
                      dtype=q.dtype).transpose(1, 2)
    slopes = _slopes_on(alibi, q.device)
    if _decode_kernel_takes(q, k_cache, valid, window):
        # Decode: the attention kernel writes the new rows itself (no launch per cache tensor).
        return decode_attention(q, k_cache[:batch], v_cache[:batch], valid, start, causal, scale,
                                out=out, new_k=k, new_v=v, prefetch=prefetch, window=window,
                                alibi=slopes, sinks=sinks)
    if k_cache.shape[2] < valid.shape[1]:
        # A prompt into a windowed layer's ring cache (prompts run outside CUDA graphs, so the
        # start slot may be read): attended as the short cache the op's ring step gives.
        from dsc.ops.attention import ring_step

        keys, values, seen, first = ring_step(k, v, k_cache, v_cache, valid, int(start.item()),
                                              window, causal)
        shifted = torch.tensor([first], dtype=torch.int64, device=q.device)
        return kernel(q, keys, values, seen, shifted, causal, scale, out=out, window=window,
                      alibi=slopes, sinks=sinks)
    slots = start + torch.arange(seq, device=k.device)
    k_cache[:batch].index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache[:batch].index_copy_(2, slots, v.to(v_cache.dtype))
    return kernel(q, k_cache[:batch], v_cache[:batch], valid, start, causal, scale, out=out,
                  window=window, alibi=slopes, sinks=sinks)


def _decode_kernel_takes(q: Tensor, k_cache: Tensor, valid: Tensor, window: int) -> bool:
    """A few query rows per kv head go to the decode kernel, unless they would overwrite the
    part of a ring cache their window reads (a prompt longer than ring - window + 1)."""
    from dsc.kernels.decode_attention import uses_decode_kernel

    ring = k_cache.shape[2]
    return uses_decode_kernel(q, k_cache) and (
        ring == valid.shape[1] or q.shape[2] <= ring - window + 1
    )


def rotary_cached_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor,
    start: Tensor, cos: Tensor, sin: Tensor, causal: bool, scale: float,
    prefetch: Tensor | None = None, window: int = 0, alibi: list[float] | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """cached_attention of the rotated q and k: at decode the attention kernel rotates them as it
    loads them; a prompt rotates them first and goes the cached_attention way."""
    from dsc.kernels.decode_attention import decode_attention

    if not _decode_kernel_takes(q, k_cache, valid, window):
        return cached_attention(rotary(q, cos, sin), rotary(k, cos, sin), v, k_cache, v_cache,
                                valid, start, causal, scale, window=window, alibi=alibi,
                                sinks=sinks)
    batch = k.shape[0]
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3], device=q.device,
                      dtype=q.dtype).transpose(1, 2)
    return decode_attention(q, k_cache[:batch], v_cache[:batch], valid, start, causal, scale,
                            out=out, new_k=k, new_v=v, rotary=(cos, sin), prefetch=prefetch,
                            window=window, alibi=_slopes_on(alibi, q.device), sinks=sinks)


def qkv_cached_attention(
    x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None,
    norm_bias: Tensor | None, norm: str, eps: float, k_cache: Tensor, v_cache: Tensor,
    valid: Tensor, start: Tensor, cos: Tensor | None, sin: Tensor | None, causal: bool,
    scale: float, heads: int, kv_heads: int,
) -> Tensor:
    """One sequence's decode step over a short cache: the projection and the attention in one
    kernel (`dsc.kernels.qkv_attention`). Any other step: the projection as a generated GEMM
    region runs it, then the attention kernels."""
    from dsc.kernels import qkv_attention as fused
    from dsc.ops.qkv_attention import split_heads

    batch, seq, d = x.shape[0], x.shape[1], k_cache.shape[-1]
    prologue = None if norm == "none" else (norm, norm_weight, norm_bias, eps)
    rotary_ok = cos is None or (cos.numel() == d and sin.numel() == d)
    if causal and rotary_ok and fused.fits(batch, seq, k_cache.shape[2], d, fused.BLOCK_N):
        out = fused.qkv_attention(
            x.reshape(1, -1), weight, bias, k_cache[:1], v_cache[:1], valid[:1], start, scale,
            heads=heads, kv_heads=kv_heads, norm=prologue,
            rotary=None if cos is None else (cos, sin))
        return out.view(1, 1, heads, d).transpose(1, 2)
    y = _projection(x.reshape(-1, x.shape[-1]), weight, bias, prologue)
    q, k, v = split_heads(y.view(batch, seq, -1), heads, kv_heads, d)
    if cos is not None:
        return rotary_cached_attention(q, k, v, k_cache, v_cache, valid, start, cos, sin, causal,
                                       scale)
    return cached_attention(q, k, v, k_cache, v_cache, valid, start, causal, scale)


def _projection(x: Tensor, weight: Tensor, bias: Tensor | None,
                norm: tuple[str, Tensor | None, Tensor | None, float] | None) -> Tensor:
    """norm(x) @ weight^T + bias the way a generated GEMM region with a norm prologue runs it
    (dsc.codegen.triton_codegen `_gemm`)."""
    from dsc.kernels.gemm import linear_fused
    from dsc.kernels.small_batch_gemm import MAX_ROWS, small_batch_wins
    from dsc.kernels.small_batch_gemm import linear_small_batch as small_batch

    rows = x.shape[0]
    if small_batch_wins(rows, weight.shape[0]):
        return small_batch(x, weight, bias, norm=norm)
    if norm is not None:
        kind, norm_w, norm_b, eps = norm
        x = rms_norm(x, norm_w, eps, x.dtype) if kind == "rms" else layer_norm(x, norm_w, norm_b,
                                                                               eps)
    if rows <= MAX_ROWS:
        return torch.nn.functional.linear(x, weight, bias)
    return linear_fused(x, weight, bias, None, None)


def attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, causal: bool,
              scale: float, window: int = 0, alibi: list[float] | None = None,
              sinks: Tensor | None = None) -> Tensor:
    from dsc.kernels.flash_attention import attention as kernel

    batch, _, seq, _ = k.shape
    padded = None  # the kernel's default: padding possible unless a caller promised otherwise
    if key_valid is None:
        key_valid = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
        padded = False  # no mask at all: the unmasked loops are right
    start = torch.zeros(1, dtype=torch.int64, device=q.device)
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3], device=q.device,
                      dtype=q.dtype).transpose(1, 2)
    return kernel(q, k, v, key_valid, start, causal, scale, out=out, padded=padded, window=window,
                  alibi=_slopes_on(alibi, q.device), sinks=sinks)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    from dsc.kernels.rotary import rotary as kernel

    return kernel(x, cos, sin)


def gated_activation(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    from dsc.kernels.activation import gated_activation as kernel

    return kernel(gate, up, kind)


def moe(x: Tensor, router_weight: Tensor, gate_up: Tensor, down: Tensor, top_k: int,
        normalize: bool, kind: str, router_bias: Tensor | None = None,
        gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None,
        scoring: str = "softmax", selection_bias: Tensor | None = None, groups: int = 1,
        group_top_k: int = 1, scale: float = 1.0, group_scoring: str = "top2") -> Tensor:
    """Router product, routing kernel, then the experts as two grouped GEMMs: no step waits on
    the host for how many tokens an expert got, so a decode step's CUDA graph holds it."""
    from dsc.kernels.moe import moe_experts, route

    tokens = x.reshape(-1, x.shape[-1]).contiguous()
    logits = linear_small_batch(tokens, router_weight, router_bias)
    weights, experts = route(logits, top_k, normalize, scoring=scoring,
                             selection_bias=selection_bias, groups=groups,
                             group_top_k=group_top_k, scale=scale, group_scoring=group_scoring)
    return moe_experts(tokens, weights, experts, gate_up, down, kind, gate_up_bias=gate_up_bias,
                       down_bias=down_bias).view(x.shape)


def cached_causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor,
                         start: Tensor, activation: str = "") -> Tensor:
    """A decode step's token in one kernel; a prompt through the op's torch form."""
    if x.shape[-1] != 1:
        return dsc.ops.direct("cached_causal_conv1d")(x, weight, bias, state, start, activation)
    from dsc.kernels.recurrent import causal_conv1d_step

    return causal_conv1d_step(x, weight, bias, state, start, activation)


def cached_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                            state: Tensor, start: Tensor, l2norm: bool = True) -> Tensor:
    """A decode step's token in one kernel; a prompt through the op's chunked torch form."""
    if q.shape[1] != 1:
        return dsc.ops.direct("cached_gated_delta_rule")(q, k, v, g, beta, state, start, l2norm)
    from dsc.kernels.recurrent import delta_rule_step

    return delta_rule_step(q, k, v, g, beta, state, start, l2norm)


def cached_ssm_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                    dt_bias: Tensor | None, dt_softplus: bool, dt_min: float, dt_max: float,
                    state: Tensor, start: Tensor) -> Tensor:
    """A decode step's token in one kernel; a prompt through the op's chunked torch form."""
    args = (x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, state, start)
    if x.shape[1] != 1:
        return dsc.ops.direct("cached_ssm_scan")(*args)
    from dsc.kernels.recurrent import ssm_step

    return ssm_step(*args)


IMPLEMENTATIONS: dict[str, Callable] = {
    "rotary": rotary,
    "gated_activation": gated_activation,
    "linear_small_batch": linear_small_batch,
    "rms_norm": rms_norm,
    "layer_norm": layer_norm,
    "cached_attention": cached_attention,
    "rotary_cached_attention": rotary_cached_attention,
    "qkv_cached_attention": qkv_cached_attention,
    "attention": attention,
    "moe": moe,
    "cached_causal_conv1d": cached_causal_conv1d,
    "cached_gated_delta_rule": cached_gated_delta_rule,
    "cached_ssm_scan": cached_ssm_scan,
}


def resolve(name: str) -> Callable:
    try:
        return IMPLEMENTATIONS[name]
    except KeyError as exc:
        raise KeyError(f"unknown CUDA implementation {name!r}; known: {sorted(IMPLEMENTATIONS)}") from exc
