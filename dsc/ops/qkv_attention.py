"""`dsc::qkv_cached_attention`: a layer's input norm, QKV projection and cached attention as one
op, so that a decode step of one sequence can run them as one kernel
(`dsc.kernels.qkv_attention`; the pass is `fuse_qkv_attention`)."""

from __future__ import annotations

import torch
from torch import Tensor

from dsc.ops.attention import cached_attention, rotary_cached_attention
from dsc.ops.norms import layer_norm, rms_norm

__all__ = ["qkv_cached_attention", "split_heads"]


def split_heads(y: Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[Tensor, ...]:
    """q, k, v [B, H, S, D] from the projection y [B, S, (heads + 2 * kv_heads) * D]."""
    batch, seq = y.shape[0], y.shape[1]
    q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
    q = y[..., :q_end].view(batch, seq, heads, head_dim).transpose(1, 2)
    k = y[..., q_end:k_end].view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    v = y[..., k_end:].view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    return q, k, v


@torch.library.custom_op("dsc::qkv_cached_attention", mutates_args=("k_cache", "v_cache"))
def qkv_cached_attention(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str,
    eps: float,
    k_cache: Tensor,
    v_cache: Tensor,
    valid: Tensor,
    start: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    causal: bool,
    scale: float,
    heads: int,
    kv_heads: int,
) -> Tensor:
    """cached_attention (rotary_cached_attention when cos and sin are given) of the q, k and v
    that split(linear(norm(x), weight, bias)) gives: x [B, S, K]; weight [(heads + 2 * kv_heads)
    * D, K], q rows then k then v; norm "rms" (norm_weight, eps), "layer" (norm_weight,
    norm_bias, eps) or "none". Returns [B, heads, S, D] as the attention ops do."""
    if norm == "rms":
        h = rms_norm(x, norm_weight, eps, x.dtype)
    elif norm == "layer":
        h = layer_norm(x, norm_weight, norm_bias, eps)
    elif norm == "none":
        h = x
    else:
        raise ValueError(f"norm must be 'rms', 'layer' or 'none'; got {norm!r}")
    q, k, v = split_heads(torch.nn.functional.linear(h, weight, bias), heads, kv_heads,
                          k_cache.shape[-1])
    if cos is not None:
        return rotary_cached_attention(q, k, v, k_cache, v_cache, valid, start, cos, sin, causal,
                                       scale)
    return cached_attention(q, k, v, k_cache, v_cache, valid, start, causal, scale)


@qkv_cached_attention.register_fake
def _(x, weight, bias, norm_weight, norm_bias, norm, eps, k_cache, v_cache, valid, start, cos,
      sin, causal, scale, heads, kv_heads):
    return x.new_empty(x.shape[0], x.shape[1], heads, k_cache.shape[-1]).transpose(1, 2)
