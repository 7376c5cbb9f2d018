"""Which lines of a weight a kernel requests into L2 (`dsc.kernels.l2_prefetch`), and that a
decode attention given a weight to prefetch computes the same thing."""

import pytest
import torch

from dsc.kernels import l2_prefetch
from dsc.kernels.l2_prefetch import weight_lines


def test_a_weight_within_the_budget_is_requested_whole():
    w = torch.empty(96, 200, dtype=torch.bfloat16)  # 400-byte rows: 4 lines, the last ragged
    lines = weight_lines(w, budget=1 << 20)
    assert (lines.rows, lines.lines, lines.stride_row, lines.line_elems) == (96, 4, 200, 64)


def test_over_the_budget_every_row_gets_the_same_first_lines():
    w = torch.empty(4096, 4096, dtype=torch.float16)  # 32 MiB, 64 lines a row
    lines = weight_lines(w, budget=16 << 20)
    assert (lines.rows, lines.lines) == (4096, 32)
    assert lines.rows * lines.lines * l2_prefetch.LINE_BYTES <= 16 << 20


def test_fp32_lines_hold_32_elements_and_views_keep_their_row_stride():
    w = torch.empty(10, 300, dtype=torch.float32)[:, :100]
    lines = weight_lines(w, budget=1 << 20)
    assert (lines.rows, lines.lines, lines.stride_row, lines.line_elems) == (10, 4, 300, 32)


def test_nothing_to_request():
    assert weight_lines(torch.empty(4096, dtype=torch.bfloat16)) is None  # a vector
    assert weight_lines(torch.empty(64, 64).t()) is None  # rows not contiguous
    assert weight_lines(torch.empty(1 << 16, 64), budget=1024) is None  # not one line a row


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DSC_PREFETCH_MB", "0.5")
    assert l2_prefetch.budget_bytes() == 1 << 19
    monkeypatch.setenv("DSC_PREFETCH_MB", "lots")
    with pytest.raises(ValueError, match="DSC_PREFETCH_MB='lots'"):
        l2_prefetch.budget_bytes()


def test_decode_attention_with_a_weight_to_prefetch_is_unchanged():
    # On the interpreter the requests themselves are skipped (no inline PTX there): this checks
    # the argument's path through the launcher; tests/gpu runs the requests, test_hopper_ptx
    # checks where they sit.
    from dsc.kernels.decode_attention import decode_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 1, 16, generator=g)
    k_cache, v_cache = (torch.randn(1, 2, 37, 16, generator=g) for _ in range(2))
    new_k, new_v = (torch.randn(1, 2, 1, 16, generator=g) for _ in range(2))
    valid = torch.ones(1, 37, dtype=torch.bool)
    start = torch.tensor([20])
    weight = torch.randn(48, 96, generator=g)
    outs = []
    for prefetch in (None, weight):
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append((decode_attention(q, kc, vc, valid, start, True, 0.25, new_k=new_k,
                                      new_v=new_v, prefetch=prefetch), kc, vc))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
