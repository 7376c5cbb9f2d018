"""flash_attention_tma (descriptor loads, unpadded keys) against the reference, interpreted."""

import pytest
import torch

from dsc.kernels.flash_attention import flash_attention
from dsc.kernels.flash_attention_tma import TmaFlashConfig, flash_attention_tma, tma_eligible
from dsc.kernels.reference import attention_reference
from tests.kernels.test_flash_attention import make_inputs

SMALL = TmaFlashConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)


def unpadded_inputs(s, t, start, d=16, hq=4, hkv=2, seed=0):
    """No padding below start + s; slots past it hold NaN to prove they are unread."""
    q, k, v, valid, st = make_inputs(hq=hq, hkv=hkv, s=s, t=t, start=start, d=d, seed=seed)
    valid[:] = True
    g = torch.Generator().manual_seed(seed + 1)
    live = start + s
    k[:, :, :live] = torch.randn(k[:, :, :live].shape, generator=g)
    v[:, :, :live] = torch.randn(v[:, :, :live].shape, generator=g)
    return q, k, v, valid, st


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s,t,start", [(35, 50, 0), (19, 50, 17), (5, 13, 8)],
                         ids=["35", "19@17", "5@8"])
def test_matches_reference(s, t, start, causal, assert_close, poisoned):
    q, k, v, valid, st = unpadded_inputs(s, t, start, seed=s + start)
    out = flash_attention_tma(q, k, v, st, causal, 0.3, poisoned(q.shape), SMALL)
    assert_close(out, attention_reference(q, k, v, valid, st, causal, 0.3))


def test_strided_query_and_output_views(assert_close):
    # q and out as [B, S, H, D] buffers seen as [B, H, S, D]: only the last dim is contiguous.
    q, k, v, valid, st = unpadded_inputs(21, 40, 3, hq=8, hkv=2, seed=5)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.full((2, 21, 8, 16), float("nan")).transpose(1, 2)
    flash_attention_tma(q, k, v, st, True, 0.25, out, SMALL)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.25))


def test_switch_and_eligibility(monkeypatch, assert_close):
    q, k, v, valid, st = unpadded_inputs(35, 50, 0, seed=2)
    assert not tma_eligible(q, k, v, None)  # off unless asked
    monkeypatch.setenv("DSC_FLASH_TMA", "1")
    assert tma_eligible(q, k, v, None)
    assert not tma_eligible(q[..., :12], k[..., :12], v[..., :12], None)  # D not a power of two
    assert not tma_eligible(q.transpose(2, 3), k, v, None)  # last dim not contiguous
    # Through the entry point: taken for unpadded keys with the default tiles.
    out = flash_attention(q, k, v, valid, st, True, 0.3, padded=False)
    assert_close(out, attention_reference(q, k, v, valid, st, True, 0.3))
