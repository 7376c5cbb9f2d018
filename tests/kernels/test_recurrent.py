"""dsc's linear-attention and Mamba-2 ops against the recurrences they define, written out here
token by token with one matrix per head; and their cached forms continuing a sequence step by
step."""

import pytest
import torch
import torch.nn.functional as F

import dsc.ops  # noqa: F401  (registers the dsc ops)

ops = torch.ops.dsc


def _delta_rule_loop(q, k, v, g, beta):
    """The gated delta rule as written: per row, head and token, S <- e^g S, then
    S <- S + k (beta (v - S^T k))^T, o = S^T q (q, k L2-normalised, q / sqrt(Dk))."""
    batch, length, heads, dk = q.shape
    out = torch.zeros(batch, length, heads, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            state = torch.zeros(dk, v.shape[-1], dtype=torch.float64)
            for t in range(length):
                qt, kt = (x[b, t, h].double() for x in (q, k))
                qt, kt = qt / (qt.norm() ** 2 + 1e-6).sqrt(), kt / (kt.norm() ** 2 + 1e-6).sqrt()
                decay = torch.exp(g[b, t, h].double())  # a scalar, or one per key lane
                state = state * (decay[:, None] if decay.dim() else decay)
                delta = beta[b, t, h].double() * (v[b, t, h].double() - state.T @ kt)
                state = state + torch.outer(kt, delta)
                out[b, t, h] = state.T @ (qt / dk**0.5)
    return out


def _inputs(batch, length, heads, dk, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, length, heads, dk, generator=gen) for _ in range(2))
    v = torch.randn(batch, length, heads, dv, generator=gen)
    g = -F.softplus(torch.randn(batch, length, heads, generator=gen))
    beta = torch.rand(batch, length, heads, generator=gen)
    return q, k, v, g, beta


# Lengths: one token, a short prompt (token by token inside), one chunk's remainder, past two
# chunks (the 64-token solve and its carry).
@pytest.mark.parametrize("length", [1, 5, 63, 131])
def test_gated_delta_rule_is_the_recurrence(length):
    q, k, v, g, beta = _inputs(2, length, 3, 8, 5)
    out = ops.gated_delta_rule(q, k, v, g, beta, True)
    assert out.shape == v.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), _delta_rule_loop(q, k, v, g, beta),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("length", [3, 131])
def test_gated_delta_rule_with_a_decay_per_key_lane_is_the_recurrence(length):
    q, k, v, _, beta = _inputs(2, length, 2, 6, 4)
    g = -F.softplus(torch.randn(2, length, 2, 6, generator=torch.Generator().manual_seed(4)))
    out = ops.gated_delta_rule(q, k, v, g, beta, True)
    torch.testing.assert_close(out.double(), _delta_rule_loop(q, k, v, g, beta),
                               atol=2e-5, rtol=2e-5)


def test_cached_gated_delta_rule_continues_across_steps():
    q, k, v, g, beta = _inputs(2, 77, 2, 8, 6)
    whole = ops.gated_delta_rule(q, k, v, g, beta, True)
    state = torch.full((3, 2, 8, 6), 7.0)  # rows past the batch and stale contents: ignored
    start = torch.zeros(1, dtype=torch.int64)
    outs = []
    for lo, hi in [(0, 70), (70, 71), (71, 73), (73, 77)]:  # a prompt, then short steps
        start.fill_(lo)
        outs.append(ops.cached_gated_delta_rule(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi],
                                                g[:, lo:hi], beta[:, lo:hi], state, start, True))
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-5, rtol=1e-5)
    assert bool((state[2] == 7.0).all())  # the row no sequence uses is untouched


def test_gated_delta_rule_names_mismatched_heads():
    q, k, v, g, beta = _inputs(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="repeat key heads to the value heads"):
        ops.gated_delta_rule(q[:, :, :1], k[:, :, :1], v, g, beta, True)


@pytest.mark.parametrize("activation", ["", "silu"])
def test_causal_conv1d_is_a_left_padded_depthwise_convolution(activation):
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 5, 11, generator=gen), torch.randn(5, 4, generator=gen)
    expected = F.conv1d(x, w[:, None], None, padding=3, groups=5)[..., :11]
    expected = F.silu(expected) if activation else expected
    torch.testing.assert_close(ops.causal_conv1d(x, w, None, activation), expected)


def test_cached_causal_conv1d_continues_across_steps():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 6, 9, generator=gen), torch.randn(6, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
    whole = ops.causal_conv1d(x, w, bias, "silu")
    state, start = torch.full((4, 6, 3), 5.0), torch.zeros(1, dtype=torch.int64)
    outs = []
    for lo, hi in [(0, 2), (2, 3), (3, 4), (4, 9)]:  # a prompt shorter than the state, steps
        start.fill_(lo)
        outs.append(ops.cached_causal_conv1d(x[..., lo:hi], w, bias, state, start, "silu"))
    torch.testing.assert_close(torch.cat(outs, -1), whole)
    torch.testing.assert_close(state[:2], x[..., -3:])  # the last K - 1 inputs


def test_causal_conv1d_names_an_activation_it_lacks():
    with pytest.raises(ValueError, match="activation 'gelu'"):
        ops.causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 2), None, "gelu")


def _ssm_loop(x, dt, A, B, C, D, dt_bias):
    """Mamba-2's scan as written: per row and head, dt = softplus(dt + bias), S <- e^(dt A) S +
    dt x B^T (S [P, N]), y = S C + D x; B and C of the head's group."""
    batch, length, heads, p = x.shape
    per_group = heads // B.shape[2]
    y = torch.zeros(batch, length, heads, p, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            state = torch.zeros(p, B.shape[3], dtype=torch.float64)
            for t in range(length):
                step = F.softplus(dt[b, t, h].double() + dt_bias[h].double())
                bt, ct = B[b, t, h // per_group].double(), C[b, t, h // per_group].double()
                xt = x[b, t, h].double()
                state = state * torch.exp(step * A[h].double()) + step * torch.outer(xt, bt)
                y[b, t, h] = state @ ct + D[h].double() * xt
    return y


def _ssm_inputs(batch, length, heads, p, groups, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, p, generator=gen)
    dt = torch.randn(batch, length, heads, generator=gen)
    A = -torch.rand(heads, generator=gen) * 2
    B, C = (torch.randn(batch, length, groups, n, generator=gen) for _ in range(2))
    return x, dt, A, B, C, torch.randn(heads, generator=gen), torch.randn(heads, generator=gen)


@pytest.mark.parametrize("length", [1, 6, 131])
def test_ssm_scan_is_the_recurrence(length):
    x, dt, A, B, C, D, bias = _ssm_inputs(2, length, 4, 3, 2, 5)
    y = ops.ssm_scan(x, dt, A, B, C, D, bias, True, 0.0, float("inf"))
    assert y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y.double(), _ssm_loop(x, dt, A, B, C, D, bias), atol=1e-4,
                               rtol=1e-4)


def test_cached_ssm_scan_continues_across_steps():
    x, dt, A, B, C, D, bias = _ssm_inputs(2, 70, 4, 3, 1, 5, seed=1)
    args = (True, 0.0, float("inf"))
    whole = ops.ssm_scan(x, dt, A, B, C, D, bias, *args)
    state, start = torch.full((3, 4, 5, 3), 2.0), torch.zeros(1, dtype=torch.int64)
    outs = []
    for lo, hi in [(0, 66), (66, 67), (67, 70)]:
        start.fill_(lo)
        outs.append(ops.cached_ssm_scan(x[:, lo:hi], dt[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi],
                                        D, bias, *args, state, start))
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-5, rtol=1e-5)


def test_ssm_scan_names_groups_that_do_not_divide_the_heads():
    x, dt, A, B, C, D, bias = _ssm_inputs(1, 3, 4, 3, 3, 5)
    with pytest.raises(ValueError, match="G dividing H"):
        ops.ssm_scan(x, dt, A, B, C, D, bias, True, 0.0, float("inf"))
