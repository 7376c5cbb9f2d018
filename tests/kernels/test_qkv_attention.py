"""qkv_attention (the QKV projection and one token's attention in one launch) against the
unfused reference, on the Triton interpreter: tiny irregular shapes, GQA and MHA, each norm,
rotary, padding, an empty cache."""

import pytest
import torch

from dsc.kernels.qkv_attention import MAX_KEYS, fits, qkv_attention
from dsc.kernels.reference import attention_reference, linear_reference
from dsc.ops.norms import layer_norm, rms_norm


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def unfused(x, w, bias, k_cache, v_cache, valid, start, scale, heads, kv_heads, norm, rotary):
    """norm -> linear -> split -> rotary -> cache write -> attention, op by op."""
    d = k_cache.shape[-1]
    if norm is not None and norm[0] == "rms":
        x = rms_norm(x, norm[1], norm[3], x.dtype)
    elif norm is not None:
        x = layer_norm(x, norm[1], norm[2], norm[3])
    qkv = linear_reference(x, w, bias)
    q = qkv[:, : heads * d].view(1, heads, 1, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(1, kv_heads, 1, d)
    v = qkv[:, (heads + kv_heads) * d :].view(1, kv_heads, 1, d)
    if rotary is not None:
        q, k = rotate(q, *rotary), rotate(k, *rotary)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    slot = int(start)
    k_cache[:, :, slot] = k[:, :, 0]
    v_cache[:, :, slot] = v[:, :, 0]
    out = attention_reference(q, k_cache, v_cache, valid, start, True, scale)
    return out.reshape(1, heads * d), k_cache, v_cache


CASES = {
    # heads, kv_heads, D, K, T, start, norm, bias, rotary
    "gqa-rms-rotary": (4, 2, 16, 40, 70, 67, "rms", False, True),
    "mha-layer-bias": (3, 3, 16, 37, 20, 9, "layer", True, False),
    "mqa-no-norm": (4, 1, 32, 24, 9, 5, None, False, False),
    "empty-cache": (2, 1, 16, 33, 8, 0, "rms", True, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_the_unfused_ops(case, assert_close):
    heads, kv_heads, d, k, t, start, kind, with_bias, with_rotary = case
    g = torch.Generator().manual_seed(heads * 100 + t)
    n = (heads + 2 * kv_heads) * d
    x = torch.randn(1, k, generator=g) * 2 + 0.5
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g) if with_bias else None
    norm = None
    if kind == "rms":
        norm = ("rms", torch.rand(k, generator=g) + 0.5, None, 1e-5)
    elif kind == "layer":
        norm = ("layer", torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g), 1e-5)
    rotary = None
    if with_rotary:
        angle = torch.rand(d // 2, generator=g) * 6
        rotary = (torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2))
    k_cache = torch.randn(1, kv_heads, t, d, generator=g)
    v_cache = torch.randn(1, kv_heads, t, d, generator=g)
    valid = torch.rand(1, t, generator=g) > 0.25
    valid[0, start] = True
    # Slots past the new token and padded slots hold NaN: they must never be read.
    k_cache[:, :, start + 1 :] = float("nan")
    v_cache[:, :, start + 1 :] = float("nan")
    k_cache.masked_fill_(~valid[:, None, :, None], float("nan"))
    v_cache.masked_fill_(~valid[:, None, :, None], float("nan"))
    pos = torch.tensor([start], dtype=torch.int64)
    want, want_k, want_v = unfused(x, w, bias, k_cache, v_cache, valid, pos, 0.3, heads,
                                   kv_heads, norm, rotary)
    got = qkv_attention(x, w, bias, k_cache, v_cache, valid, pos, 0.3, heads=heads,
                        kv_heads=kv_heads, norm=norm, rotary=rotary, block_n=8, block_k=16,
                        num_stages=1)
    assert_close(got, want)
    assert_close(k_cache[:, :, start], want_k[:, :, start])
    assert_close(v_cache[:, :, start], want_v[:, :, start])
    # A second call at the next slot: the arrival counters were left at zero.
    if start + 1 < t:
        valid[0, start + 1] = True
        pos2 = pos + 1
        want2, _, _ = unfused(x, w, bias, k_cache, v_cache, valid, pos2, 0.3, heads, kv_heads,
                              norm, rotary)
        got2 = qkv_attention(x, w, bias, k_cache, v_cache, valid, pos2, 0.3, heads=heads,
                             kv_heads=kv_heads, norm=norm, rotary=rotary, block_n=8,
                             block_k=16, num_stages=1)
        assert_close(got2, want2)


def test_fits_one_token_of_one_sequence_over_a_short_cache():
    assert fits(1, 1, MAX_KEYS, 64, 16)
    assert not fits(2, 1, 200, 64, 16)
    assert not fits(1, 2, 200, 64, 16)
    assert not fits(1, 1, MAX_KEYS + 1, 64, 16)
    assert not fits(1, 1, 200, 40, 16)


def test_bad_input_is_named():
    x, w = torch.randn(1, 8), torch.randn((2 + 2) * 16, 8)
    cache = torch.zeros(1, 1, 4, 16)
    valid, start = torch.ones(1, 4, dtype=torch.bool), torch.tensor([1])
    with pytest.raises(ValueError, match="one row"):
        qkv_attention(torch.randn(2, 8), w, None, cache, cache.clone(), valid, start, 1.0,
                      heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="heads=3"):
        qkv_attention(x, w, None, cache, cache.clone(), valid, start, 1.0, heads=3, kv_heads=1)
    with pytest.raises(ValueError, match="block_n"):
        qkv_attention(x, w, None, cache, cache.clone(), valid, start, 1.0, heads=2, kv_heads=1,
                      block_n=12)
    with pytest.raises(ValueError, match="cos and sin"):
        qkv_attention(x, w, None, cache, cache.clone(), valid, start, 1.0, heads=2, kv_heads=1,
                      rotary=(torch.ones(8), torch.ones(8)))


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 1), (1, 3)])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_the_runtime_op_equals_its_reference(batch, seq, kind, assert_close):
    """dsc.runtime.cuda_impls.qkv_cached_attention: the fused kernel for one token of one
    sequence, the projection and attention kernels otherwise; each equal to the op's reference
    (logits side and the cache it writes)."""
    from dsc.ops import direct
    from dsc.runtime.cuda_impls import qkv_cached_attention

    heads, kv_heads, d, k, t, start = 4, 2, 16, 48, 24, 6
    g = torch.Generator().manual_seed(batch * 10 + seq)
    n = (heads + 2 * kv_heads) * d
    x = torch.randn(batch, seq, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g) if kind == "layer" else None
    nw = torch.rand(k, generator=g) + 0.5
    nb = torch.randn(k, generator=g) if kind == "layer" else None
    caches = [torch.randn(2, kv_heads, t, d, generator=g) for _ in range(2)]
    valid = torch.ones(batch, t, dtype=torch.bool)
    pos = torch.tensor([start])
    angle = torch.rand(1, 1, seq, d // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    mine = [c.clone() for c in caches]
    want = direct("qkv_cached_attention")(x, w, bias, nw, nb, kind, 1e-5, *caches, valid, pos,
                                          cos, sin, True, 0.25, heads, kv_heads)
    got = qkv_cached_attention(x, w, bias, nw, nb, kind, 1e-5, *mine, valid, pos, cos, sin,
                               True, 0.25, heads, kv_heads)
    assert got.shape == want.shape == (batch, heads, seq, d)
    assert_close(got, want)
    for a, b in zip(mine, caches):
        assert_close(a[:batch, :, start:start + seq], b[:batch, :, start:start + seq])
