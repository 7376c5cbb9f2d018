"""Sequence mixers that carry state along the sequence outside attention (linear-attention layers).

A gated delta-net layer (Qwen3-Next, Qwen3.5, OLMo-Hybrid) mixes tokens twice without attention:

    causal_conv1d:     y[b, c, t] = act(sum_j w[c, j] * x[b, c, t - K + 1 + j] + bias[c])
                       (a depthwise convolution over the K - 1 tokens before t and t itself)
    gated_delta_rule:  per head, a state S [Dk, Dv] that every token t updates and reads:
                       S <- exp(g_t) * S
                       S <- S + k_t (beta_t * (v_t - S^T k_t))^T
                       o_t = S^T (q_t / sqrt(Dk))
                       (q and k first L2-normalised when l2norm is set)

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
    "cached_gated_delta_rule", "delta_rule_by_token",
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
    """[B, L, H, D] inputs as fp32 [B, H, L, D] (g, beta [B, H, L]); q scaled by 1/sqrt(Dk)."""
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
        state = state * g[:, :, t, None, None].exp()
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

        (I + A) U = diag(beta) V - diag(beta e^G) K S0,   A[t, s] = beta_t e^(G_t - G_s) k_t.k_s
        o_t = e^G_t S0^T q_t + sum_{s <= t} e^(G_t - G_s) (q_t.k_s) u_s
        S   = e^G_C S0 + sum_s e^(G_C - G_s) k_s u_s^T

    The solves run for every chunk at once; only the S0 terms go chunk after chunk."""
    batch, heads, length, dk = k.shape
    pad = -length % CHUNK
    # Zero tokens at the end (k = v = beta = g = 0) neither move nor decay the state.
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    chunks = (length + pad) // CHUNK
    q, k, v = (t.reshape(batch, heads, chunks, CHUNK, t.shape[-1]) for t in (q, k, v))
    g, beta = (t.reshape(batch, heads, chunks, CHUNK) for t in (g, beta))
    G = g.cumsum(-1)
    later = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(later, float("-inf")).exp()
    # The diagonal is ignored (unitriangular), so A + I needs no identity added.
    system = ((k @ k.transpose(-1, -2)) * decay * beta[..., None]).tril(-1)
    solve = lambda rhs: torch.linalg.solve_triangular(system, rhs, upper=False,  # noqa: E731
                                                      unitriangular=True)
    u_from_v = solve(v * beta[..., None])
    u_per_state = solve(k * (beta * G.exp())[..., None])  # U = u_from_v - u_per_state @ S0
    scores = (q @ k.transpose(-1, -2)) * decay
    q_read = q * G.exp()[..., None]
    k_write = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()[..., None, None]
    outs = []
    for c in range(chunks):
        u = u_from_v[:, :, c] - u_per_state[:, :, c] @ state
        outs.append(q_read[:, :, c] @ state + scores[:, :, c] @ u)
        state = state * chunk_decay[:, :, c] + k_write[:, :, c].transpose(-1, -2) @ u
    out = torch.stack(outs, 2).reshape(batch, heads, chunks * CHUNK, -1)
    return out[:, :, :length], state


def _delta_rule(q, k, v, g, beta, state, l2norm) -> tuple[Tensor, Tensor]:
    """o [B, L, H, Dv] (contiguous) in q's dtype and the final fp32 state, from fp32 state [B, H, Dk, Dv]."""
    dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, l2norm)
    run = delta_rule_by_token if q.shape[2] <= 2 else _delta_rule_by_chunk
    out, state = run(q, k, v, g, beta, state)
    return out.transpose(1, 2).to(dtype).contiguous(), state


def _check_heads(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> None:
    if not (q.shape[:3] == k.shape[:3] == v.shape[:3] == g.shape == beta.shape):
        raise ValueError(
            f"gated_delta_rule takes q, k [B, L, H, Dk], v [B, L, H, Dv], g and beta [B, L, H] "
            f"with one H (repeat key heads to the value heads first); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
            f"beta {tuple(beta.shape)}")


@torch.library.custom_op("dsc::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     l2norm: bool = True) -> Tensor:
    """q, k [B, L, H, Dk], v [B, L, H, Dv], g (log decay, <= 0) and beta [B, L, H]
    -> o [B, L, H, Dv], from a zero state."""
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
