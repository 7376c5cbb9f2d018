"""Plain-torch references for the hand-written kernels.

Each function here defines the exact semantics its Triton kernel must reproduce, in the simplest
torch that runs anywhere. They compute in float32 (or the `compute_dtype` asked for) and return the
dtype the kernel returns, so a test compares the two with one relative-error check. They favour
clarity over speed: the attention reference materialises the whole score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "activation_reference",
    "attention_reference",
    "gated_linear_reference",
    "layer_norm_reference",
    "linear_reference",
    "rms_norm_reference",
]

#: Activation names the fused GEMM epilogues accept (None means identity).
ACTIVATIONS = (None, "silu", "gelu", "gelu_tanh", "relu")


def activation_reference(x: Tensor, activation: str | None) -> Tensor:
    """Apply one of `ACTIVATIONS` to x ("gelu" is the erf form, "gelu_tanh" the tanh approximation)."""
    if activation is None:
        return x
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """act(x @ weight^T + bias) + residual, computed in `compute_dtype`, returned in x.dtype.

    weight is [N, K] (the nn.Linear layout); x is [M, K]; residual, when given, is [M, N].
    """
    out = x.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        out = out + bias.to(compute_dtype)
    out = activation_reference(out, activation)
    if residual is not None:
        out = out + residual.to(compute_dtype)
    return out.to(x.dtype)


def gated_linear_reference(
    x: Tensor,
    weight_gate_up: Tensor,
    activation: str | None = "silu",
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """act(x @ Wg^T) * (x @ Wu^T), where weight_gate_up [2N, K] holds the gate rows, then the up rows."""
    n = weight_gate_up.shape[0] // 2
    both = x.to(compute_dtype) @ weight_gate_up.to(compute_dtype).t()
    gate, up = both[:, :n], both[:, n:]
    return (activation_reference(gate, activation) * up).to(x.dtype)


def rms_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """weight * (h / sqrt(mean(h^2) + eps)) over the last dim, with h = x (+ residual).

    Statistics are taken in float32. The normalised value is rounded to x.dtype before the weight
    multiplies it, which is what Hugging Face's Llama-family norms do. With a residual, h is
    rounded to x.dtype (it is the value the next layer adds to) and (normed, h) is returned.
    """
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float()
    if weight is not None:
        normed = normed * weight.float()
    out = normed.to(x.dtype)
    return out if residual is None else (out, h)


def layer_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim of h = x (+ residual), float32 math, one rounding at the end.

    With a residual, (normed, h) is returned, h rounded to x.dtype.
    """
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    out = F.layer_norm(h.float(), h.shape[-1:], w, b, eps).to(x.dtype)
    return out if residual is None else (out, h)


def attention_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_valid: Tensor,
    start: Tensor,
    causal: bool,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    window: int = 0,
    alibi: Tensor | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """The KV-cache attention op of dsc, written out in full.

    q [B, Hq, S, D] holds S new query tokens that sit at cache slots start .. start+S-1;
    k_cache, v_cache [B, Hkv, T, D] (or more sequences, of which the first B are used); query head
    h reads kv head h // (Hq // Hkv).
    Query i of sequence b may attend key slot j iff
        j < start + S  and  kv_valid[b, j]  and  (not causal or j <= start + i)
        and  (window == 0 or j > start + i - window).
    `alibi` [Hq] (causal only) adds alibi[h] * (j - (start + i)) to the scores of query head h.
    `sinks` [Hq]: a logit of head h beside the keys in each softmax, then dropped.
    A query with no key it may attend gets zeros. Returns [B, Hq, S, D] in q.dtype.
    """
    batch, hq, s, d = q.shape
    hkv, t = k_cache.shape[1], k_cache.shape[2]
    k_cache, v_cache = k_cache[:batch], v_cache[:batch]  # a cache may be sized for more sequences
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    first = int(start.reshape(-1)[0])
    group = hq // hkv
    k = k_cache.to(compute_dtype).repeat_interleave(group, dim=1)
    v = v_cache.to(compute_dtype).repeat_interleave(group, dim=1)
    scores = (q.to(compute_dtype) @ k.transpose(-1, -2)) * scale  # [B, Hq, S, T]

    key = torch.arange(t, device=q.device)
    query_pos = first + torch.arange(s, device=q.device)
    if alibi is not None:
        distance = (key[None, :] - query_pos[:, None]).to(compute_dtype)
        scores = scores + alibi.to(compute_dtype)[:, None, None] * distance
    allowed = (key[None, :] < first + s).expand(s, t)
    if causal:
        allowed = allowed & (key[None, :] <= query_pos[:, None])
    if window:
        allowed = allowed & (key[None, :] > query_pos[:, None] - window)
    allowed = allowed[None, None] & kv_valid.bool()[:, None, None, :]  # [B, 1, S, T]

    # Slots past the live length or marked padding may hold anything (NaN too): zero their V rows
    # so a zero probability cannot meet a NaN value.
    key_ok = (key[None, :] < first + s) & kv_valid.bool()  # [B, T]
    v = v.masked_fill(~key_ok[:, None, :, None], 0.0)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.to(compute_dtype)[None, :, None, None].expand(batch, hq, s, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    # softmax of an all -inf row is NaN; such a row attends nothing and must read as zeros.
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return (probs @ v).to(q.dtype)
