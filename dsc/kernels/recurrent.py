"""A decode step of a linear-attention layer: one token through the causal convolution and the
gated delta rule, each one kernel that reads its state, updates it in place and writes the output.

As torch ops (`dsc.ops.recurrent`) a step is some twenty launches a layer — casts, norms,
products and sums over the [Dk, Dv] state — each a round trip through memory. Here:

    causal_conv1d_step: a program per (row, block of channels) loads the channels' K - 1 earlier
        inputs and the weights, sums the window, applies the activation, and shifts the new input
        into the state.
    delta_rule_step: a program per (row, head, block of value lanes) loads the state's columns
        [Dk, BLOCK_DV] once, decays them, writes the token's correction and reads the output.
        Every program of a head needs all of q and k (Dk lanes): it normalises them itself.
    ssm_step: Mamba-2's scan the same way, state [N, BLOCK_P] of a head: decay by exp(dt A),
        add B (dt x)^T, read along C, add D x.

Both take cache_start from device memory: 0 means a sequence begins, so the state read is zero
(a new batch needs no reset, and a CUDA-graph replay no host read). Step inputs may have any
strides; states are contiguous (the runtime allocates them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels import pdl

__all__ = ["causal_conv1d_step", "delta_rule_step", "ssm_step"]


@triton.jit
def _conv_step_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, start_ptr, out_ptr,
    C, K,
    sxb, sxc, swc, swk, sob, soc,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait_and_release(USE_PDL)
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_K)
    c_ok = c < C
    begun = tl.load(start_ptr) > 0
    # The channels' earlier inputs: slots 0..K-2 of the state (zero when the sequence begins).
    row = state_ptr + b * C * (K - 1) + c[:, None] * (K - 1)
    hist_ok = c_ok[:, None] & (j[None, :] < K - 1) & begun
    hist = tl.load(row + j[None, :], mask=hist_ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * sxb + c * sxc, mask=c_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c[:, None] * swc + j[None, :] * swk,
                mask=c_ok[:, None] & (j[None, :] < K), other=0.0).to(tl.float32)
    # The window is hist[0..K-2] then x, so weight K-1 takes x.
    last = j[None, :] == K - 1
    y = tl.sum(tl.where(last, x[:, None], hist) * w, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(out_ptr + b * sob + c * soc, y.to(out_ptr.dtype.element_ty), mask=c_ok)
    # The state moves one slot on: slot i takes slot i + 1, the last slot takes x.
    nxt = tl.load(row + j[None, :] + 1, mask=c_ok[:, None] & (j[None, :] + 1 < K - 1) & begun,
                  other=0.0).to(tl.float32)
    shifted = tl.where(j[None, :] == K - 2, x[:, None], nxt)
    tl.store(row + j[None, :], shifted.to(state_ptr.dtype.element_ty),
             mask=c_ok[:, None] & (j[None, :] < K - 1))


def causal_conv1d_step(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor,
                       start: Tensor, activation: str = "") -> Tensor:
    """dsc.cached_causal_conv1d for one token: x [B, C, 1], weight [C, K], state
    [Bmax, C, K - 1] (contiguous) -> [B, C, 1]."""
    batch, channels, steps = x.shape
    taps = weight.shape[1]
    if steps != 1 or taps < 2 or not state.is_contiguous() or state.shape[1:] != (channels,
                                                                                 taps - 1):
        raise ValueError(f"causal_conv1d_step takes x [B, C, 1], weight [C, K >= 2] and a "
                         f"contiguous state [Bmax, C, K - 1]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, state {tuple(state.shape)}")
    if activation not in ("", "silu"):
        raise ValueError(f"causal_conv1d_step activation {activation!r}: takes '' or 'silu'")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    block = 128
    _conv_step_kernel[(batch, triton.cdiv(channels, block))](
        x, weight, bias if bias is not None else weight, state, start, out,
        channels, taps, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, SILU=activation == "silu", BLOCK_C=block,
        BLOCK_K=triton.next_power_of_2(taps), **pdl.launch_options(x.device),
    )
    return out


@triton.jit
def _delta_step_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, start_ptr, out_ptr,
    H, DK, DV, scale,
    sqb, sqh, sqd, skb, skh, skd, svb, svh, svd, sgb, sgh, sgd, sbb, sbh, sob, soh, sod,
    L2NORM: tl.constexpr, G_PER_LANE: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl.wait_and_release(USE_PDL)
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    i = tl.arange(0, BLOCK_DK)
    e = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    i_ok, e_ok = i < DK, e < DV
    q = tl.load(q_ptr + b * sqb + h * sqh + i * sqd, mask=i_ok, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * skb + h * skh + i * skd, mask=i_ok, other=0.0).to(tl.float32)
    if L2NORM:
        q = q / tl.sqrt(tl.sum(q * q) + 1e-6)
        k = k / tl.sqrt(tl.sum(k * k) + 1e-6)
    q = q * scale
    v = tl.load(v_ptr + b * svb + h * svh + e * svd, mask=e_ok, other=0.0).to(tl.float32)
    if G_PER_LANE:  # Kimi's delta attention: a decay per key lane, one per state row
        g = tl.load(g_ptr + b * sgb + h * sgh + i * sgd, mask=i_ok, other=0.0)
        decay = tl.exp(g.to(tl.float32))[:, None]
    else:
        decay = tl.exp(tl.load(g_ptr + b * sgb + h * sgh).to(tl.float32))
    beta = tl.load(beta_ptr + b * sbb + h * sbh).to(tl.float32)
    # The head's state columns [Dk, BLOCK_DV], zero when the sequence begins.
    cols = state_ptr + (b * H + h) * DK * DV + i[:, None] * DV + e[None, :]
    ok = i_ok[:, None] & e_ok[None, :]
    begun = tl.load(start_ptr) > 0
    s = tl.load(cols, mask=ok & begun, other=0.0) * decay
    # The delta rule: write beta * (v - S^T k) along k, then read along q.
    delta = beta * (v - tl.sum(s * k[:, None], axis=0))
    s += k[:, None] * delta[None, :]
    tl.store(cols, s, mask=ok)
    o = tl.sum(s * q[:, None], axis=0)
    tl.store(out_ptr + b * sob + h * soh + e * sod, o.to(out_ptr.dtype.element_ty), mask=e_ok)


def delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                    start: Tensor, l2norm: bool = True) -> Tensor:
    """dsc.cached_gated_delta_rule for one token: q, k [B, 1, H, Dk], v [B, 1, H, Dv], beta
    [B, 1, H], g [B, 1, H] or [B, 1, H, Dk], state [Bmax, H, Dk, Dv] (fp32, contiguous)
    -> o [B, 1, H, Dv]."""
    batch, steps, heads, dk = q.shape
    dv = v.shape[-1]
    if steps != 1 or state.dtype != torch.float32 or not state.is_contiguous() or (
            state.shape[1:] != (heads, dk, dv)):
        raise ValueError(f"delta_rule_step takes one token (q [B, 1, H, Dk], v [B, 1, H, Dv]) "
                         f"and a contiguous fp32 state [Bmax, H, Dk, Dv]; got q "
                         f"{tuple(q.shape)}, v {tuple(v.shape)}, state {tuple(state.shape)} "
                         f"{state.dtype}")
    out = torch.empty(batch, 1, heads, dv, dtype=q.dtype, device=q.device)
    block_dk = triton.next_power_of_2(dk)
    # A program holds a [Dk, BLOCK_DV] fp32 tile of the state: 4K values keep it in the
    # registers of 4 warps (Dk 128: BLOCK_DV 32; 8K spilled, ptxas -v for sm_90).
    block_dv = max(1, min(triton.next_power_of_2(dv), 4096 // block_dk))
    _delta_step_kernel[(batch * heads, triton.cdiv(dv, block_dv))](
        q, k, v, g, beta, state, start, out, heads, dk, dv, dk ** -0.5,
        q.stride(0), q.stride(2), q.stride(3), k.stride(0), k.stride(2), k.stride(3),
        v.stride(0), v.stride(2), v.stride(3), g.stride(0), g.stride(2),
        g.stride(3) if g.dim() == 4 else 0, beta.stride(0), beta.stride(2), out.stride(0),
        out.stride(2), out.stride(3), L2NORM=l2norm, G_PER_LANE=g.dim() == 4, BLOCK_DK=block_dk, BLOCK_DV=block_dv, **pdl.launch_options(q.device),
    )
    return out


@triton.jit
def _ssm_step_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, state_ptr, start_ptr, out_ptr,
    H, HEADS_PER_GROUP, N, P, dt_min, dt_max,
    sxb, sxh, sxp, sdb, sdh, sbb, sbg, sbn, scb, scg, scn, sob, soh, sop,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.wait_and_release(USE_PDL)
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    group = h // HEADS_PER_GROUP
    n = tl.arange(0, BLOCK_N)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n_ok, p_ok = n < N, p < P
    step = tl.load(dt_ptr + b * sdb + h * sdh).to(tl.float32)
    if HAS_BIAS:
        step += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:  # as torch's softplus: linear past 20
        step = tl.where(step > 20.0, step, tl.log(1.0 + tl.exp(step)))
    step = tl.minimum(tl.maximum(step, dt_min), dt_max)
    decay = tl.exp(step * tl.load(a_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * sxb + h * sxh + p * sxp, mask=p_ok, other=0.0).to(tl.float32)
    k = tl.load(b_ptr + b * sbb + group * sbg + n * sbn, mask=n_ok, other=0.0).to(tl.float32)
    q = tl.load(c_ptr + b * scb + group * scg + n * scn, mask=n_ok, other=0.0).to(tl.float32)
    # The head's state columns [N, BLOCK_P], zero when the sequence begins.
    cols = state_ptr + (b * H + h) * N * P + n[:, None] * P + p[None, :]
    ok = n_ok[:, None] & p_ok[None, :]
    begun = tl.load(start_ptr) > 0
    s = tl.load(cols, mask=ok & begun, other=0.0) * decay + k[:, None] * (step * x)[None, :]
    tl.store(cols, s, mask=ok)
    y = tl.sum(s * q[:, None], axis=0)
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(out_ptr + b * sob + h * soh + p * sop, y, mask=p_ok)


def ssm_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
             dt_bias: Tensor | None, dt_softplus: bool, dt_min: float, dt_max: float,
             state: Tensor, start: Tensor) -> Tensor:
    """dsc.cached_ssm_scan for one token: x [B, 1, H, P], dt [B, 1, H], B and C [B, 1, G, N],
    state [Bmax, H, N, P] (fp32, contiguous) -> y [B, 1, H, P] in fp32."""
    batch, steps, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    if steps != 1 or state.dtype != torch.float32 or not state.is_contiguous() or (
            state.shape[1:] != (heads, n, p)) or heads % groups:
        raise ValueError(f"ssm_step takes one token (x [B, 1, H, P], B [B, 1, G, N], G dividing "
                         f"H) and a contiguous fp32 state [Bmax, H, N, P]; got x "
                         f"{tuple(x.shape)}, B {tuple(B.shape)}, state {tuple(state.shape)} "
                         f"{state.dtype}")
    out = torch.empty(batch, 1, heads, p, dtype=torch.float32, device=x.device)
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(triton.next_power_of_2(p), 4096 // block_n))  # as delta_rule_step
    _ssm_step_kernel[(batch * heads, triton.cdiv(p, block_p))](
        x, dt, A, B, C, D if D is not None else A, dt_bias if dt_bias is not None else A, state,
        start, out, heads, heads // groups, n, p, dt_min, min(dt_max, 3.0e38),
        x.stride(0), x.stride(2), x.stride(3), dt.stride(0), dt.stride(2),
        B.stride(0), B.stride(2), B.stride(3), C.stride(0), C.stride(2), C.stride(3),
        out.stride(0), out.stride(2), out.stride(3),
        HAS_D=D is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_N=block_n, BLOCK_P=block_p, **pdl.launch_options(x.device),
    )
    return out
