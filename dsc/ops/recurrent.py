"""Sequence mixers that carry state along the sequence outside attention (linear-attention layers).

A gated delta-net layer (Qwen3-Next, Qwen3.5, OLMo-Hybrid) or a Mamba-2 layer (Granite 4,
Falcon-H1, Nemotron-H, Bamba, Zamba2) mixes tokens twice without attention:

    causal_conv1d:     y[b, c, t] = act(sum_j w[c, j] * x[b, c, t - K + 1 + j] + bias[c])
                       (a depthwise convolution over the K - 1 tokens before t and t itself)
    gated_delta_rule:  per head, a state S [Dk, Dv] that every token t updates and reads:
                       S <- exp(g_t) * S    (g_t per head, or per key lane: exp(g_t)[:, None] * S)
                       S <- S + k_t (beta_t * (v_t - S^T k_t))^T
                       o_t = S^T (q_t / sqrt(Dk))
                       (q and k first L2-normalised when l2norm is set)
    ssm_scan:          Mamba-2's selective state space, per head a state S [N, P]:
                       dt_t = clamp(softplus(dt_t + dt_bias)), S <- exp(dt_t A) S + B_t (dt_t x_t)^T
                       y_t = S^T C_t + D x_t   (B and C shared by the heads of a group)

The forward ops start from a zero state. Their cached forms read the state a previous step left
in a buffer the runtime owns (rows of the batch, like the KV cache) and write back the state at
the step's last token — the last K - 1 inputs of the convolution, S of the delta rule. A step
at cache_start 0 begins a sequence: it ignores what the buffer holds, so a new batch needs no
reset (and a CUDA-graph replay no host read of the start).

Padding tokens on the left of a prompt are zero inputs (the layers zero them before their input
projection): they leave a zero state zero, so a left-padded row decodes like an unpadded one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS", "CHUNK", "causal_conv1d", "cached_causal_conv1d", "gated_delta_rule",
    "cached_gated_delta_rule", "delta_rule_by_token", "ssm_scan", "cached_ssm_scan",
]

ACTIVATIONS = ("", "silu")  # "" : none
CHUNK = 64  # tokens the chunked delta rule solves at once


def _activate(y: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(y)
    if activation:
        raise ValueError(f"causal_conv1d activation {activation!r}: dsc takes {ACTIVATIONS}")
    return y


def _conv(full: Tensor, weight: Tensor, bias: Tensor | None, steps: int,
          activation: str) -> Tensor:
    """The last `steps` outputs of the depthwise convolution over `full` [B, C, K - 1 + steps]."""
    channels = weight.shape[0]
    y = F.conv1d(full.to(weight.dtype), weight[:, None, :], bias, groups=channels)
    return _activate(y[..., -steps:], activation).to(full.dtype).contiguous()


@torch.library.custom_op("dsc::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  activation: str = "") -> Tensor:
    """x [B, C, L], weight [C, K], bias [C] or None -> [B, C, L] (contiguous), from a zero
    state."""
    history = x.new_zeros(x.shape[0], x.shape[1], weight.shape[1] - 1)
    return _conv(torch.cat([history, x], -1), weight, bias, x.shape[-1], activation)


@causal_conv1d.register_fake
def _(x, weight, bias=None, activation=""):
    return x.new_empty(x.shape)


@torch.library.custom_op("dsc::cached_causal_conv1d", mutates_args=("state",))
def cached_causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor,
                         start: Tensor, activation: str = "") -> Tensor:
    """causal_conv1d continuing from state [Bmax, C, K - 1] (the inputs before x; ignored when
    start is 0), which it then holds x's last K - 1 inputs (with those before, when x is
    shorter)."""
    batch, steps = x.shape[0], x.shape[-1]
    before = torch.where(start > 0, state[:batch], torch.zeros_like(state[:batch]))
    full = torch.cat([before.to(x.dtype), x], -1)
    out = _conv(full, weight, bias, steps, activation)
    state[:batch].copy_(full[..., full.shape[-1] - state.shape[-1]:])
    return out


@cached_causal_conv1d.register_fake
def _(x, weight, bias, state, start, activation=""):
    return x.new_empty(x.shape)


def _prepare(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, l2norm: bool):
    """[B, L, H, D] inputs as fp32 [B, H, L, D] (beta [B, H, L], g [B, H, L] or [B, H, L, Dk]);
    q scaled by 1/sqrt(Dk)."""
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    g, beta = (t.transpose(1, 2).float() for t in (g, beta))
    if l2norm:  # as the reference kernels do: x / sqrt(sum x^2 + 1e-6)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def delta_rule_by_token(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                        state: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence token by token over prepared inputs (see _prepare): (o [B, H, L, Dv],
    final state [B, H, Dk, Dv]). Cheapest for a decode step's one token."""
    outs = []
    for t in range(q.shape[2]):
        decay = g[:, :, t].exp()  # [B, H] or, per key lane, [B, H, Dk]
        state = state * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        read = (state * k[:, :, t, :, None]).sum(-2)
        delta = (v[:, :, t] - read) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outs, 2), state


def _delta_rule_by_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                         state: Tensor) -> tuple[Tensor, Tensor]:
    """The same recurrence, CHUNK tokens at a time. Within a chunk, with G_t the running sum of
    g from its start and S0 the state entering it, each token's write u_t = beta_t (v_t - S'^T
    k_t) depends on the earlier writes of the chunk through a unit lower-triangular system:

        (I + A) U = diag(beta) V - diag(beta) (K * e^G) S0
        A[t, s] = beta_t k_t.(e^(G_t - G_s) k_s)  (s < t)
        o_t = (q_t * e^G_t)^T S0 + sum_{s <= t} q_t.(e^(G_t - G_s) k_s) u_s
        S   = e^G_C S0 + sum_s (e^(G_C - G_s) k_s) u_s^T

    with e^G a scalar per head and token, or a vector over the key lanes (per-channel decay).
    The solves run for every chunk at once; only the S0 terms go chunk after chunk."""
    batch, heads, length, dk = k.shape
    per_channel = g.dim() == 4
    pad = -length % CHUNK
    # Zero tokens at the end (k = v = beta = g = 0) neither move nor decay the state.
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g = F.pad(g, (0, 0, 0, pad) if per_channel else (0, pad))
    beta = F.pad(beta, (0, pad))
    chunks = (length + pad) // CHUNK
    q, k, v = (t.reshape(batch, heads, chunks, CHUNK, t.shape[-1]) for t in (q, k, v))
    beta = beta.reshape(batch, heads, chunks, CHUNK)
    # G [..., CHUNK, Dk or 1]: the decay as a lane vector either way.
    G = g.reshape(batch, heads, chunks, CHUNK, -1 if per_channel else 1).cumsum(-2)
    later = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    pair = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(later[..., None], float("-inf"))
    def decayed(a: Tensor, b: Tensor) -> Tensor:
        """[..., t, s] = a_t.(e^(G_t - G_s) b_s), zero for s > t."""
        if per_channel:  # each lane weighed by its own decay: [..., t, s, lane]
            return (a[..., :, None, :] * b[..., None, :, :] * pair.exp()).sum(-1)
        return (a @ b.transpose(-1, -2)) * pair[..., 0].exp()

    # The diagonal is ignored (unitriangular), so A + I needs no identity added.
    system = (decayed(k, k) * beta[..., None]).tril(-1)
    solve = lambda rhs: torch.linalg.solve_triangular(system, rhs, upper=False,  # noqa: E731
                                                      unitriangular=True)
    u_from_v = solve(v * beta[..., None])
    u_per_state = solve(k * G.exp() * beta[..., None])  # U = u_from_v - u_per_state @ S0
    scores = decayed(q, k)
    q_read = q * G.exp()
    k_write = k * (G[..., -1:, :] - G).exp()
    chunk_decay = G[..., -1, :, None].exp()  # [..., Dk or 1, 1]
    outs = []
    for c in range(chunks):
        u = u_from_v[:, :, c] - u_per_state[:, :, c] @ state
        outs.append(q_read[:, :, c] @ state + scores[:, :, c] @ u)
        state = state * chunk_decay[:, :, c] + k_write[:, :, c].transpose(-1, -2) @ u
    out = torch.stack(outs, 2).reshape(batch, heads, chunks * CHUNK, -1)
    return out[:, :, :length], state


def _delta_rule(q, k, v, g, beta, state, l2norm) -> tuple[Tensor, Tensor]:
    """o [B, L, H, Dv] (contiguous) in q's dtype and the final fp32 state, from the fp32
    state [B, H, Dk, Dv]."""
    dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, l2norm)
    run = delta_rule_by_token if q.shape[2] <= 2 else _delta_rule_by_chunk
    out, state = run(q, k, v, g, beta, state)
    return out.transpose(1, 2).to(dtype).contiguous(), state


def _check_heads(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> None:
    if not (q.shape[:3] == k.shape[:3] == v.shape[:3] == beta.shape and (
            g.shape == beta.shape or g.shape == k.shape)):
        raise ValueError(
            f"gated_delta_rule takes q, k [B, L, H, Dk], v [B, L, H, Dv], beta [B, L, H] and g "
            f"[B, L, H] or [B, L, H, Dk] with one H (repeat key heads to the value heads "
            f"first); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
            f"beta {tuple(beta.shape)}")


@torch.library.custom_op("dsc::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     l2norm: bool = True) -> Tensor:
    """q, k [B, L, H, Dk], v [B, L, H, Dv], beta [B, L, H], g (log decay, <= 0) [B, L, H] or
    per key lane [B, L, H, Dk] (Kimi's delta attention) -> o [B, L, H, Dv], from a zero
    state."""
    _check_heads(q, k, v, g, beta)
    state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
    return _delta_rule(q, k, v, g, beta, state, l2norm)[0]


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, l2norm=True):
    return v.new_empty(v.shape, dtype=q.dtype)


@torch.library.custom_op("dsc::cached_gated_delta_rule", mutates_args=("state",))
def cached_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                            state: Tensor, start: Tensor, l2norm: bool = True) -> Tensor:
    """gated_delta_rule continuing from state [Bmax, H, Dk, Dv] (fp32; ignored when start is
    0), which then holds the state after the step's last token."""
    _check_heads(q, k, v, g, beta)
    batch = q.shape[0]
    before = torch.where(start > 0, state[:batch], torch.zeros_like(state[:batch]))
    out, after = _delta_rule(q, k, v, g, beta, before, l2norm)
    state[:batch].copy_(after)
    return out


@cached_gated_delta_rule.register_fake
def _(q, k, v, g, beta, state, start, l2norm=True):
    return v.new_empty(v.shape, dtype=q.dtype)


def _linear_attention_by_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor,
                               state: Tensor) -> tuple[Tensor, Tensor]:
    """Per head S <- e^g_t S + k_t v_t^T, o_t = S^T q_t over fp32 [B, H, L, D] inputs (g [B, H,
    L]), CHUNK tokens at a time: within a chunk o = (q k^T * e^(G_t - G_s), s <= t) v +
    e^G q S0, and S = e^G_C S0 + (k e^(G_C - G))^T v."""
    batch, heads, length, _ = k.shape
    pad = -length % CHUNK
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g = F.pad(g, (0, pad))  # zero tokens at the end neither move nor decay the state
    chunks = (length + pad) // CHUNK
    q, k, v = (t.reshape(batch, heads, chunks, CHUNK, t.shape[-1]) for t in (q, k, v))
    G = g.reshape(batch, heads, chunks, CHUNK).cumsum(-1)
    later = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(later, float("-inf")).exp()
    scores = (q @ k.transpose(-1, -2)) * decay
    q_read = q * G.exp()[..., None]
    k_write = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()[..., None, None]
    outs = []
    for c in range(chunks):
        outs.append(q_read[:, :, c] @ state + scores[:, :, c] @ v[:, :, c])
        state = state * chunk_decay[:, :, c] + k_write[:, :, c].transpose(-1, -2) @ v[:, :, c]
    out = torch.stack(outs, 2).reshape(batch, heads, chunks * CHUNK, -1)
    return out[:, :, :length], state


def _ssm(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, state):
    """y [B, L, H, P] fp32 and the final state [B, H, N, P] of the scan from `state`."""
    heads, groups = x.shape[2], B.shape[2]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = F.softplus(dt) if dt_softplus else dt
    dt = dt.clamp(dt_min, dt_max).transpose(1, 2)  # [B, H, L]
    xf = x.float().transpose(1, 2)  # [B, H, L, P]
    k, q = (t.float().repeat_interleave(heads // groups, 2).transpose(1, 2) for t in (B, C))
    v = xf * dt[..., None]
    g = dt * A.float()[None, :, None]
    if x.shape[1] <= 2:  # a decode step: the recurrence itself
        outs = []
        for t in range(x.shape[1]):
            state = state * g[:, :, t, None, None].exp() + k[:, :, t, :, None] * v[:, :, t, None]
            outs.append((state * q[:, :, t, :, None]).sum(-2))
        y = torch.stack(outs, 2)
    else:
        y, state = _linear_attention_by_chunk(q, k, v, g, state)
    if D is not None:
        y = y + D.float()[None, :, None, None] * xf
    return y.transpose(1, 2).contiguous(), state


def _check_ssm(x: Tensor, dt: Tensor, B: Tensor, C: Tensor) -> None:
    batch, length, heads, _ = x.shape
    if not (dt.shape == (batch, length, heads) and B.shape == C.shape
            and B.shape[:2] == (batch, length) and heads % B.shape[2] == 0):
        raise ValueError(
            f"ssm_scan takes x [B, L, H, P], dt [B, L, H], B and C [B, L, G, N] with G dividing "
            f"H; got x {tuple(x.shape)}, dt {tuple(dt.shape)}, B {tuple(B.shape)}, "
            f"C {tuple(C.shape)}")


@torch.library.custom_op("dsc::ssm_scan", mutates_args=())
def ssm_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
             dt_bias: Tensor | None, dt_softplus: bool, dt_min: float, dt_max: float) -> Tensor:
    """Mamba-2's scan from a zero state: x [B, L, H, P], dt [B, L, H], A, D, dt_bias [H], B and
    C [B, L, G, N] -> y [B, L, H, P] in fp32 (as the layers' own torch form returns it)."""
    _check_ssm(x, dt, B, C)
    state = x.new_zeros(x.shape[0], x.shape[2], B.shape[3], x.shape[3], dtype=torch.float32)
    return _ssm(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, state)[0]


@ssm_scan.register_fake
def _(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("dsc::cached_ssm_scan", mutates_args=("state",))
def cached_ssm_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                    dt_bias: Tensor | None, dt_softplus: bool, dt_min: float, dt_max: float,
                    state: Tensor, start: Tensor) -> Tensor:
    """ssm_scan continuing from state [Bmax, H, N, P] (fp32; ignored when start is 0), which
    then holds the state after the step's last token."""
    _check_ssm(x, dt, B, C)
    batch = x.shape[0]
    before = torch.where(start > 0, state[:batch], torch.zeros_like(state[:batch]))
    y, after = _ssm(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, before)
    state[:batch].copy_(after)
    return y


@cached_ssm_scan.register_fake
def _(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, state, start):
    return x.new_empty(x.shape, dtype=torch.float32)
