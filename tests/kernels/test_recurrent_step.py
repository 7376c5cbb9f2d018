"""The decode-step kernels of linear attention against the ops they implement (dsc.ops.recurrent),
on irregular sizes: a token after a prompt, a token that begins a sequence, rows past the batch."""

import pytest
import torch
import torch.nn.functional as F

import dsc.ops  # noqa: F401  (registers the dsc ops)
from dsc.kernels.recurrent import causal_conv1d_step, delta_rule_step

ops = torch.ops.dsc


def _token(batch, heads, dk, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, 1, heads, dk, generator=gen) for _ in range(2))
    v = torch.randn(batch, 1, heads, dv, generator=gen)
    return q, k, v, -F.softplus(torch.randn(batch, 1, heads, generator=gen)), torch.rand(
        batch, 1, heads, generator=gen)


# (heads, Dk, Dv): lanes that are no power of two; values wider than the tile (Dk 40 -> 64 lanes,
# Dv 200 -> tiles of 128); keys wider than values.
@pytest.mark.parametrize("heads,dk,dv", [(3, 12, 5), (2, 40, 200), (1, 24, 8)])
@pytest.mark.parametrize("begun", [True, False])
@pytest.mark.parametrize("l2norm", [True, False])
@pytest.mark.parametrize("per_lane", [False, True])  # Kimi's decay per key lane
def test_delta_rule_step_is_the_op(heads, dk, dv, begun, l2norm, per_lane, assert_close):
    q, k, v, g, beta = _token(2, heads, dk, dv, seed=dk + dv)
    if per_lane:
        g = -F.softplus(torch.randn(2, 1, heads, dk, generator=torch.Generator().manual_seed(5)))
    state = torch.randn(3, heads, dk, dv, generator=torch.Generator().manual_seed(1))
    start = torch.tensor([4 if begun else 0])
    ref_state = state.clone()
    ref = ops.cached_gated_delta_rule(q, k, v, g, beta, ref_state, start, l2norm)
    # q and k as slices of one wider tensor: the kernel reads their strides.
    wide = torch.cat([q, k], -1)
    out = delta_rule_step(wide[..., :dk], wide[..., dk:], v, g, beta, state, start, l2norm)
    assert_close(out, ref, tol=1e-5)
    assert_close(state, ref_state, tol=1e-5)


def test_delta_rule_step_refuses_a_prompt():
    q, k, v, g, beta = _token(1, 2, 8, 8, seed=0)
    two = lambda t: torch.cat([t, t], 1)  # noqa: E731
    with pytest.raises(ValueError, match="takes one token"):
        delta_rule_step(two(q), two(k), two(v), two(g), two(beta), torch.zeros(1, 2, 8, 8),
                        torch.tensor([0]))


@pytest.mark.parametrize("channels,taps", [(5, 4), (130, 3), (7, 2)])
@pytest.mark.parametrize("activation", ["", "silu"])
@pytest.mark.parametrize("begun", [True, False])
def test_causal_conv1d_step_is_the_op(channels, taps, activation, begun, assert_close):
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(2, 1, channels, generator=gen).transpose(1, 2)  # [B, C, 1], strided
    weight, bias = torch.randn(channels, taps, generator=gen), torch.randn(channels,
                                                                          generator=gen)
    state = torch.randn(3, channels, taps - 1, generator=gen)
    start = torch.tensor([6 if begun else 0])
    ref_state = state.clone()
    ref = ops.cached_causal_conv1d(x, weight, bias, ref_state, start, activation)
    out = causal_conv1d_step(x, weight, bias, state, start, activation)
    assert_close(out, ref, tol=1e-5)
    assert_close(state, ref_state, tol=1e-6)
    no_bias = ops.cached_causal_conv1d(x, weight, None, state.clone(), start, activation)
    assert_close(causal_conv1d_step(x, weight, None, state.clone(), start, activation), no_bias,
                 tol=1e-5)


# (heads, groups, P, N): a group per head or shared by two; head and state sizes that are no
# power of two; P wider than its tile (N 40 -> 64 lanes, P 100 -> tiles of 64).
@pytest.mark.parametrize("heads,groups,p,n", [(4, 2, 3, 5), (2, 1, 100, 40), (3, 3, 8, 16)])
@pytest.mark.parametrize("begun", [True, False])
def test_ssm_step_is_the_op(heads, groups, p, n, begun, assert_close):
    from dsc.kernels.recurrent import ssm_step

    gen = torch.Generator().manual_seed(heads * p + n)
    x = torch.randn(2, 1, heads, p, generator=gen)
    dt = torch.randn(2, 1, heads, generator=gen) * 3  # some past softplus's linear point
    A, D, bias = (torch.randn(heads, generator=gen) for _ in range(3))
    B, C = (torch.randn(2, 1, groups, n, generator=gen) for _ in range(2))
    state = torch.randn(3, heads, n, p, generator=gen)
    start = torch.tensor([3 if begun else 0])
    for d, b, limit in [(D, bias, (0.0, float("inf"))), (None, None, (0.1, 2.0))]:
        ref_state, got_state = state.clone(), state.clone()
        ref = ops.cached_ssm_scan(x, dt, -A.abs(), B, C, d, b, True, *limit, ref_state, start)
        out = ssm_step(x, dt, -A.abs(), B, C, d, b, True, *limit, got_state, start)
        assert_close(out, ref, tol=1e-5)
        assert_close(got_state, ref_state, tol=1e-5)
