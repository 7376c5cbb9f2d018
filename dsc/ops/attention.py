"""Attention ops: `dsc::attention` (no cache), `dsc::cached_attention` (compiler-owned KV cache)
and `dsc::rotary_cached_attention` (the same, rotating the new queries and keys first).

One masking rule serves both. Keys live in slots 0..T-1; the S queries sit at slots
start..start+S-1. Query i of sequence b may attend slot j iff
    j < start + S  and  valid[b, j]  and  (not causal or j <= start + i)
    and  (window == 0 or j > start + i - window).
`window` (causal attention only) is a sliding window: a query sees itself and the window - 1
slots before it, padding slots included, as HF's sliding-window masks count them.
`alibi` (causal attention only; the linear biases of BLOOM, MPT, Falcon) adds alibi[h] * (j - (start + i)) to the
scores of query head h: a slope per head times the distance back to the key.
`sinks` (GPT-OSS's attention sinks): a learned logit per query head that joins each query's
softmax beside the keys and is then dropped, so the weights of the keys sum to less than one.
A query with no slot it may attend (a padding token at the left edge) gets zeros, never NaN.
Grouped-query attention: query head h reads key/value head h // (Hq // Hkv).
Values may be narrower or wider than queries and keys (latent attention: DeepSeek's keys are
192 wide, its values 128); the output has the values' head size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsc.kernels.checks import check_alibi, check_ring, check_sinks, check_window

__all__ = [
    "attention", "cached_attention", "masked_attention_reference", "ring_step",
    "rotary_cached_attention",
]


def masked_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, start: int, causal: bool, scale: float,
    window: int = 0, alibi: list[float] | None = None, sinks: Tensor | None = None,
) -> Tensor:
    """The masking rule above in plain torch, fp32 softmax. q [B,Hq,S,D]; k [B,Hkv,T,D];
    v [B,Hkv,T,Dv]; sinks [Hq] or None. Returns [B,Hq,S,Dv]."""
    check_window(window, causal)
    check_alibi(alibi, q.shape[1], causal)
    batch, q_heads, seq, _ = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    group = q_heads // kv_heads
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    key_slot = torch.arange(slots, device=q.device)
    query_slot = start + torch.arange(seq, device=q.device)
    if alibi is not None:
        slopes = torch.tensor(alibi, dtype=torch.float32, device=q.device)
        distance = (key_slot[None, :] - query_slot[:, None]).float()
        scores = scores + slopes[:, None, None] * distance
    allowed = (key_slot[None, :] < start + seq).expand(seq, slots)
    if causal:
        allowed = allowed & (key_slot[None, :] <= query_slot[:, None])
    if window:
        allowed = allowed & (key_slot[None, :] > query_slot[:, None] - window)
    allowed = allowed[None, None].expand(batch, 1, seq, slots)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :slots].bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        check_sinks(sinks, q_heads)
        sink = sinks.float()[None, :, None, None].expand(batch, q_heads, seq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, v).to(q.dtype)
    # Lay the result out as [B, S, H, D] like F.scaled_dot_product_attention does: traced graphs
    # view the transposed output without a copy and rely on those strides.
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("dsc::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, causal: bool, scale: float,
    window: int = 0, alibi: list[float] | None = None, sinks: Tensor | None = None,
) -> Tensor:
    """Attention of q [B,Hq,S,D] over k, v [B,Hkv,S,D]; key_valid [B,S] bool marks real tokens;
    window: a causal sliding window (0: none); alibi: a score slope per query head (None: none);
    sinks: a logit per query head beside the keys (None: none)."""
    return masked_attention_reference(q, k, v, key_valid, 0, causal, scale, window, alibi, sinks)


@attention.register_fake
def _(q, k, v, key_valid, causal, scale, window=0, alibi=None, sinks=None):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3]).transpose(1, 2)


@torch.library.custom_op("dsc::cached_attention", mutates_args=("k_cache", "v_cache"))
def cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid: Tensor,
    start: Tensor,
    causal: bool,
    scale: float,
    prefetch: Tensor | None = None,
    window: int = 0,
    alibi: list[float] | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Write k [B,Hkv,S,D], v [B,Hkv,S,Dv] into the cache at slots start..start+S-1, then
    attend over it.

    k_cache, v_cache: [max_batch, Hkv, max_seq, D or Dv]; the first B rows are used. valid: [B, max_seq]
    bool; start: int64 tensor of shape [1] (device memory, so CUDA-graph replays can move it).
    prefetch: a weight the next projection reads, which the GPU's decode kernel pulls toward L2
    while it attends (`prefetch_next_weight`); it never changes the result.
    window: a causal sliding window (0: none).
    alibi: a score slope per query head (ALiBi; None: none).
    sinks: a logit per query head beside the keys (attention sinks; None: none).

    A ring cache: with a window, the caches may hold R < max_seq slots (R >= window), position
    p living in slot p % R; only the last R positions are kept, all a window reaches.
    """
    batch, _, seq, _ = k.shape
    first = int(start.item())
    if k_cache.shape[2] < valid.shape[1]:
        return _ring_attention(q, k, v, k_cache, v_cache, valid, first, causal, scale, window,
                               alibi, sinks)
    k_cache[:batch, :, first : first + seq] = k.to(k_cache.dtype)
    v_cache[:batch, :, first : first + seq] = v.to(v_cache.dtype)
    live = first + seq
    return masked_attention_reference(
        q, k_cache[:batch, :, :live], v_cache[:batch, :, :live], valid[:, :live], first, causal,
        scale, window, alibi, sinks,
    )


def ring_step(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor,
              first: int, window: int, causal: bool) -> tuple[Tensor, Tensor, Tensor, int]:
    """A step of S tokens at position `first` into a ring cache: (keys, values, valid, start)
    of the short cache it attends — its window's earlier positions read back from the ring, its
    own appended — after which the ring keeps the step's last rows. Positions count from the
    window's first one: causality, the window and ALiBi's distances are all relative."""
    check_ring(k_cache.shape[2], window, causal)
    keys, values, lo = _ring_keys(k, v, k_cache, v_cache, first, window)
    _ring_write(k, v, k_cache, v_cache, first)
    return keys, values, valid[:, lo : first + k.shape[2]], first - lo


def _ring_keys(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, first: int,
               window: int) -> tuple[Tensor, Tensor, int]:
    """(keys, values, lo): positions lo .. first+S-1 laid out in order, the ones before `first`
    read back from the ring, the step's own from k and v; lo is where the step's window begins."""
    batch, ring = k.shape[0], k_cache.shape[2]
    lo = max(0, first - window + 1)
    old = torch.arange(lo, first, device=k.device) % ring
    keys = torch.cat([k_cache[:batch].index_select(2, old), k.to(k_cache.dtype)], dim=2)
    values = torch.cat([v_cache[:batch].index_select(2, old), v.to(v_cache.dtype)], dim=2)
    return keys, values, lo


def _ring_write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, first: int) -> None:
    """Keep the step's last R positions in the ring (a prompt longer than it keeps its tail)."""
    batch, seq, ring = k.shape[0], k.shape[2], k_cache.shape[2]
    kept = min(seq, ring)
    slots = torch.arange(first + seq - kept, first + seq, device=k.device) % ring
    k_cache[:batch].index_copy_(2, slots, k[:, :, seq - kept :].to(k_cache.dtype))
    v_cache[:batch].index_copy_(2, slots, v[:, :, seq - kept :].to(v_cache.dtype))


def _ring_attention(q, k, v, k_cache, v_cache, valid, first, causal, scale, window, alibi,
                    sinks) -> Tensor:
    keys, values, seen, start = ring_step(k, v, k_cache, v_cache, valid, first, window, causal)
    return masked_attention_reference(q, keys, values, seen, start, causal, scale, window, alibi,
                                      sinks)


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, valid, start, causal, scale, prefetch=None, window=0,
      alibi=None, sinks=None):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3]).transpose(1, 2)


@torch.library.custom_op("dsc::rotary_cached_attention", mutates_args=("k_cache", "v_cache"))
def rotary_cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid: Tensor,
    start: Tensor,
    cos: Tensor,
    sin: Tensor,
    causal: bool,
    scale: float,
    prefetch: Tensor | None = None,
    window: int = 0,
    alibi: list[float] | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """cached_attention(rotary(q, cos, sin), rotary(k, cos, sin), v, ...): one op, so that the
    decode kernel can rotate the step's queries and keys as it loads them (no rotary launch).
    prefetch, window, alibi, sinks: as in cached_attention."""
    from dsc.ops.rotary import rotary

    return cached_attention(rotary(q, cos, sin), rotary(k, cos, sin), v, k_cache, v_cache, valid,
                            start, causal, scale, window=window, alibi=alibi, sinks=sinks)


@rotary_cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, valid, start, cos, sin, causal, scale, prefetch=None, window=0,
      alibi=None, sinks=None):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3]).transpose(1, 2)
