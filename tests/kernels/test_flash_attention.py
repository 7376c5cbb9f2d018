"""flash_attention (prefill) and the `attention` entry against the reference, interpreted."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsc.kernels.flash_attention import FlashConfig, attention, flash_attention, keys_unpadded
from dsc.kernels.reference import attention_reference

SMALL = FlashConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)


def make_inputs(b=2, hq=4, hkv=2, s=5, t=13, d=16, start=0, seed=0):
    """Random q and cache with padding; slots nobody may attend hold NaN to prove they are unread."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g)
    valid = torch.rand(b, t, generator=g) > 0.3
    valid[:, start + s - 1] = True
    valid[0, : start + 1] = False  # sequence 0: its first query row sees no key when causal
    k[:, :, start + s :] = float("nan")
    v[:, :, start + s :] = float("nan")
    k.masked_fill_(~valid[:, None, :, None], float("nan"))
    v.masked_fill_(~valid[:, None, :, None], float("nan"))
    return q, k, v, valid, torch.tensor([start], dtype=torch.int64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "s,t,start", [(5, 13, 0), (5, 13, 8), (35, 50, 0), (35, 50, 9)], ids=["5", "5@8", "35", "35@9"]
)
def test_matches_reference(s, t, start, causal, assert_close, poisoned):
    q, k, v, valid, st = make_inputs(s=s, t=t, start=start, seed=s + t + start)
    out = flash_attention(q, k, v, valid, st, causal, 0.3, out=poisoned(q.shape), config=SMALL)
    assert_close(out, attention_reference(q, k, v, valid, st, causal, 0.3))
    if causal:
        assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))


@pytest.mark.parametrize("d", [16, 20], ids=["d16", "d20-masked-lanes"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s,t,start", [(35, 50, 0), (19, 50, 17)], ids=["35", "19@17"])
def test_unpadded_fast_path_matches_reference(s, t, start, causal, d, assert_close, poisoned):
    # padded=False (no padding below start + S): whole tiles load unmasked; slots past the live
    # length still hold NaN and must stay unread.
    q, k, v, valid, st = make_inputs(s=s, t=t, start=start, d=d, seed=s + start)
    valid[:] = True
    g = torch.Generator().manual_seed(7)
    live = start + s
    k[:, :, :live] = torch.randn(k[:, :, :live].shape, generator=g)
    v[:, :, :live] = torch.randn(v[:, :, :live].shape, generator=g)
    out = flash_attention(q, k, v, valid, st, causal, 0.3, out=poisoned(q.shape), config=SMALL,
                          padded=False)
    assert_close(out, attention_reference(q, k, v, valid, st, causal, 0.3))
    # The same promise made by a caller's context instead of the argument.
    with keys_unpadded():
        again = flash_attention(q, k, v, valid, st, causal, 0.3, config=SMALL)
    assert_close(again, out)


def test_padded_and_unpadded_sequences_in_one_batch(assert_close, poisoned):
    # Sequence 0 is left-padded (its programs take the masked loops), sequence 1 is not.
    q, k, v, valid, st = make_inputs(s=35, t=50, start=0, seed=3)
    valid[:] = True
    valid[0, :6] = False
    k[:, :, :35] = torch.randn(k[:, :, :35].shape, generator=torch.Generator().manual_seed(4))
    v[:, :, :35] = torch.randn(v[:, :, :35].shape, generator=torch.Generator().manual_seed(5))
    k[0, :, :6] = float("nan")  # padding slots may hold anything
    v[0, :, :6] = float("nan")
    out = flash_attention(q, k, v, valid, st, True, 0.3, out=poisoned(q.shape), config=SMALL)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3))


def test_mqa_odd_head_dim_and_strided(assert_close):
    # One kv head for 3 query heads; D = 20; q and out as transposed [B, S, H, D] views.
    q, k, v, valid, st = make_inputs(b=1, hq=3, hkv=1, s=17, t=24, d=20, start=3, seed=1)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.full((1, 17, 3, 20), float("nan")).transpose(1, 2)
    flash_attention(q, k, v, valid, st, True, 0.2, out=out, config=SMALL)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.2))


@pytest.mark.parametrize("s", [2, 20])
def test_attention_dispatch(s, assert_close):
    # S = 2 goes to the decode kernel, S = 20 to flash; both must agree with the reference.
    q, k, v, valid, st = make_inputs(s=s, t=30, start=4, seed=s)
    out = attention(q, k, v, valid, st, True, 0.3)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3))


def test_reference_matches_sdpa():
    # The reference itself: a plain causal prefill with nothing masked is SDPA.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    valid = torch.ones(1, 6, dtype=torch.bool)
    ref = attention_reference(q, k, v, valid, torch.tensor([0]), True, 1 / math.sqrt(8))
    torch.testing.assert_close(ref, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_bad_inputs_raise():
    q, k, v, valid, st = make_inputs()
    with pytest.raises(ValueError, match="not a multiple of Hkv"):
        flash_attention(q[:, :3], k, v, valid, st, True, 0.3)
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        flash_attention(q, k[0], v[0], valid, st, True, 0.3)
    with pytest.raises(ValueError, match="start must be"):
        attention(q, k, v, valid, 0, True, 0.3)
    with pytest.raises(ValueError, match="share one floating dtype"):
        flash_attention(q.double(), k, v, valid, st, True, 0.3)
    with pytest.raises(ValueError, match="do not fit"):
        flash_attention(torch.randn(2, 4, 14, 16), k, v, valid, st, True, 0.3)


def test_cpu_tensors_need_cuda(no_interpreter):
    q, k, v, valid, st = make_inputs()
    with pytest.raises(ValueError, match="needs CUDA"):
        flash_attention(q, k, v, valid, st, True, 0.3)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("s,t,start,window", [(35, 50, 0, 7), (35, 50, 9, 20), (19, 50, 17, 1),
                                              (5, 13, 8, 40), (40, 50, 3, 16)],
                         ids=["7", "20@9", "1@17", "wider-than-live", "tile-wide"])
def test_sliding_window_matches_reference(s, t, start, window, padded, assert_close, poisoned):
    # Key tiles behind every row's window are skipped, the ones its edge cuts are masked: the
    # slots no query may see hold NaN and stay unread.
    q, k, v, valid, st = make_inputs(s=s, t=t, start=start, seed=s + start + window)
    if not padded:
        valid[:] = True
        g = torch.Generator().manual_seed(7)
        k[:, :, : start + s] = torch.randn(k[:, :, : start + s].shape, generator=g)
        v[:, :, : start + s] = torch.randn(v[:, :, : start + s].shape, generator=g)
    ref = attention_reference(q, k, v, valid, st, True, 0.3, window=window)
    behind = max(start - window + 1, 0)
    k[:, :, :behind] = float("nan")
    v[:, :, :behind] = float("nan")
    out = flash_attention(q, k, v, valid, st, True, 0.3, out=poisoned(q.shape), config=SMALL,
                          padded=padded, window=window)
    assert_close(out, ref)


def test_attention_entry_passes_the_window_on(assert_close):
    for s in (2, 35):  # the decode kernel, then flash tiles
        q, k, v, valid, st = make_inputs(s=s, t=50, start=9, seed=s)
        out = attention(q, k, v, valid, st, True, 0.3, window=6)
        assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3, window=6))


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("s,t,start,window", [(35, 50, 0, 0), (19, 50, 17, 0), (40, 50, 3, 16)],
                         ids=["35", "19@17", "window-16"])
def test_alibi_slopes_bias_the_scores(s, t, start, window, padded, assert_close):
    # Every key block, the unmasked ones below the diagonal too, adds slope * (key - query).
    q, k, v, valid, st = make_inputs(s=s, t=t, start=start, seed=s + start + 1)
    if not padded:
        valid[:] = True
        g = torch.Generator().manual_seed(7)
        k[:, :, : start + s] = torch.randn(k[:, :, : start + s].shape, generator=g)
        v[:, :, : start + s] = torch.randn(v[:, :, : start + s].shape, generator=g)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    out = flash_attention(q, k, v, valid, st, True, 0.3, config=SMALL, padded=padded,
                          window=window, alibi=slopes)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3, window=window,
                                          alibi=slopes))


@pytest.mark.parametrize("s,t,start,window", [(35, 50, 0, 0), (19, 50, 17, 0), (40, 50, 3, 16)],
                         ids=["35", "19@17", "window-16"])
def test_attention_sinks_join_the_denominator(s, t, start, window, assert_close, poisoned):
    q, k, v, valid, st = make_inputs(s=s, t=t, start=start, seed=s + start + 2)
    sinks = torch.tensor([2.0, -1.0, 0.5, 9.0])
    out = flash_attention(q, k, v, valid, st, True, 0.3, out=poisoned(q.shape), config=SMALL,
                          window=window, sinks=sinks)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3, window=window,
                                          sinks=sinks))
    # The entry point hands them to the decode kernel for a few rows as well.
    out = attention(q[:, :, :2], k, v, valid, st, True, 0.3, window=window, sinks=sinks)
    assert_close(out, attention_reference(q[:, :, :2], k, v, valid, st, True, 0.3,
                                          window=window, sinks=sinks))


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("d,d_v", [(24, 16), (16, 40)], ids=["values-narrower", "values-wider"])
def test_values_of_their_own_head_size(d, d_v, padded, assert_close, poisoned):
    # Latent attention's prefill: keys 24 wide (masked lanes), values 16 — or wider than the
    # keys; the output takes the values' size. Slots past the live length hold NaN.
    s, t, start = 19, 40, 7
    q, k, _, valid, st = make_inputs(s=s, t=t, d=d, start=start, seed=21)
    if not padded:
        valid[:] = True
        k[:, :, : start + s] = torch.randn(k[:, :, : start + s].shape)
    v = torch.randn(2, 2, t, d_v, generator=torch.Generator().manual_seed(22))
    v[:, :, start + s :] = float("nan")
    v.masked_fill_(~valid[:, None, :, None], float("nan"))
    out = flash_attention(q, k, v, valid, st, True, 0.3, out=poisoned((2, 4, s, d_v)),
                          config=SMALL, padded=padded)
    assert out.shape == (2, 4, s, d_v)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3))


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_keys_past_256_lanes_are_scored_by_chunks(padded, assert_close, poisoned):
    # Absorbed latent attention's prompt: queries and keys 576 wide on one kv head, values
    # 512; here 320 (five 64-lane chunks, the last masked) and 288.
    s, t, start = 19, 30, 4
    q, k, _, valid, st = make_inputs(hq=4, hkv=1, s=s, t=t, d=320, start=start, seed=51)
    if not padded:
        valid[:] = True
        k[:, :, : start + s] = torch.randn(k[:, :, : start + s].shape)
    v = torch.randn(2, 1, t, 288, generator=torch.Generator().manual_seed(52))
    v[:, :, start + s :] = float("nan")
    v.masked_fill_(~valid[:, None, :, None], float("nan"))
    out = flash_attention(q, k, v, valid, st, True, 0.05, out=poisoned((2, 4, s, 288)),
                          config=SMALL, padded=padded)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.05))
