"""Mixture-of-experts on the GPU: routing and the experts' two grouped GEMMs, with no host sync.

Nothing here waits for the host to learn how many tokens each expert received, so a CUDA graph
can hold a whole MoE block: every launch is sized by an upper bound known from the shapes alone.

1. `route`: one program per token scores the router's E logits (softmax or sigmoid, fp32),
   keeps the best groups when routing is group-limited (by their best two experts or best one), picks the top k of the scores plus a
   selection bias by repeated argmax (ties to the lower expert), and renormalises and scales
   their scores when asked.
2. `align`: the T*k (token, slot) pairs sorted by expert (in one program for a decode step's
   pairs: histogram, sort and scans in registers, one launch instead of a dozen); each expert's
   run is padded to BLOCK_M rows with the sentinel T*k, so every BLOCK_M-row block belongs to
   one expert. There are at most min(T*k, cdiv(T*k, BLOCK_M) + E) blocks: the grids are
   launched at that bound and a block past the last one (expert -1) returns at once.
3. `_gate_up_kernel`: block b's rows times expert e's gate and up rows, act(gate) * up stored
   per pair ([T*k, F]); each program reads its expert's weight tile once for all its rows.
4. `_down_kernel`: those rows times expert e's down rows, scaled by the pair's routing weight,
   stored per pair ([T*k, H]).
5. The k rows of each token are summed in a fixed order (the same answer every run; no atomics).

A decode step's few pairs waste most of a 16-row block's arithmetic, but the step is bound by
reading the chosen experts' weights, which happens once per block either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsc.kernels.checks import check_device
from dsc.kernels.gemm import _apply_activation
from dsc.ops.moe import (
    CLAMPED_SWIGLU_ALPHA,
    CLAMPED_SWIGLU_LIMIT,
    EXPERT_ACTIVATIONS,
    GROUP_SCORINGS,
    SCORINGS,
)

__all__ = ["align", "moe_experts", "route"]


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, experts_ptr, E, stride_t, scale,
                  TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, SIGMOID: tl.constexpr,
                  HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr, GROUP_TOP_K: tl.constexpr,
                  GROUP_MAX: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    ok = cols < E
    # The token's logits -> scores in fp32: a softmax over the experts, or each one's sigmoid.
    z = tl.load(logits_ptr + token * stride_t + cols, mask=ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-z))
    else:
        scores = tl.exp(z - tl.max(z, 0))
        scores = scores / tl.sum(scores, 0)
    # What the choice is made on: the scores, plus a bias that steers the choice only.
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok, choice, float("-inf"))
    if GROUPS > 1:
        # Keep the GROUP_TOP_K groups whose two best experts (GROUP_MAX: best one) score highest.
        size = E // GROUPS
        group = cols // size
        g_ids = tl.arange(0, GROUPS)
        g_score = tl.zeros((GROUPS,), dtype=tl.float32)
        for j in tl.static_range(GROUPS):
            mine = ok & (group == j)
            first = tl.max(tl.where(mine, choice, float("-inf")), 0)
            at = tl.min(tl.where(mine & (choice == first), cols, BLOCK_E), 0)
            second = tl.max(tl.where(mine & (cols != at), choice, float("-inf")), 0)
            second = tl.where((size > 1) & (not GROUP_MAX), second, 0.0)
            g_score = tl.where(g_ids == j, first + second, g_score)
        kept = tl.zeros((BLOCK_E,), dtype=tl.int1)
        for _ in tl.static_range(GROUP_TOP_K):
            best = tl.max(g_score, 0)
            g = tl.min(tl.where(g_score == best, g_ids, GROUPS), 0)
            kept = kept | (group == g)
            g_score = tl.where(g_ids == g, float("-inf"), g_score)
        choice = tl.where(kept, choice, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    chosen_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    chosen_e = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(choice, 0)
        expert = tl.min(tl.where(choice == best, cols, BLOCK_E), 0)
        expert = tl.minimum(expert, E - 1)  # never an id past the experts, whatever the scores
        weight = tl.sum(tl.where(cols == expert, scores, 0.0), 0)
        chosen_w = tl.where(slots == slot, weight, chosen_w)
        chosen_e = tl.where(slots == slot, expert, chosen_e)
        choice = tl.where(cols == expert, float("-inf"), choice)
    if NORMALIZE:
        chosen_w = chosen_w / tl.sum(chosen_w, 0)
    # Only the k pairs leave the program.
    out = token * TOP_K + slots
    tl.store(weights_ptr + out, chosen_w * scale, mask=slots < TOP_K)
    tl.store(experts_ptr + out, chosen_e, mask=slots < TOP_K)


def route(logits: Tensor, top_k: int, normalize: bool, *, scoring: str = "softmax",
          selection_bias: Tensor | None = None, groups: int = 1, group_top_k: int = 1,
          scale: float = 1.0, group_scoring: str = "top2") -> tuple[Tensor, Tensor]:
    """The experts and weights `dsc.ops.moe.route_reference` gives, in one program per token:
    weights [T, k] float32 and experts [T, k] int32, highest choice first. logits: [T, E]."""
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts]; got {tuple(logits.shape)}")
    tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts} (the experts); got {top_k}")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    if group_scoring not in GROUP_SCORINGS:
        raise ValueError(f"unknown group_scoring {group_scoring!r}; expected one of "
                         f"{GROUP_SCORINGS}")
    if groups < 1 or num_experts % groups or groups & (groups - 1) or not (
            1 <= group_top_k <= groups):
        raise ValueError(f"groups must be a power of two dividing the {num_experts} experts and "
                         f"group_top_k in 1..groups; got groups={groups}, "
                         f"group_top_k={group_top_k}")
    if selection_bias is not None and tuple(selection_bias.shape) != (num_experts,):
        raise ValueError(f"selection_bias must be [{num_experts}]; got "
                         f"{tuple(selection_bias.shape)}")
    check_device(*(t for t in (logits, selection_bias) if t is not None))
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(tokens, top_k, dtype=torch.int32, device=logits.device)
    if tokens:
        _route_kernel[(tokens,)](
            logits, selection_bias if selection_bias is not None else logits, weights, experts,
            num_experts, logits.stride(0), float(scale),
            TOP_K=top_k, NORMALIZE=normalize, SIGMOID=scoring == "sigmoid",
            HAS_BIAS=selection_bias is not None, GROUPS=groups, GROUP_TOP_K=group_top_k,
            GROUP_MAX=group_scoring == "max", BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
        )
    return weights, experts


def _max_blocks(pairs: int, num_experts: int, block_m: int) -> int:
    # Each expert's run adds at most one partial block; no block is without a real pair.
    return min(pairs, triton.cdiv(pairs, block_m) + num_experts)


# Up to this many pairs (a decode step's) one program groups them; more go to torch's sort.
ALIGN_IN_ONE_PROGRAM = 1024


@triton.jit
def _align_kernel(experts_ptr, grouped_ptr, block_expert_ptr, P, E, n_grouped, n_blocks,
                  BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                  FILL: tl.constexpr):
    i = tl.arange(0, BLOCK_P)
    # Each pair's expert; lanes past P count in bin E, which sorts after every real expert.
    e = tl.load(experts_ptr + i, mask=i < P, other=E)
    counts = tl.histogram(e, BLOCK_E)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    starts = tl.cumsum(padded, 0) - padded  # where each expert's padded run begins
    firsts = tl.cumsum(counts, 0) - counts  # its first pair in expert order
    # Sorting (expert, pair) keys groups the pairs by expert, in pair order within one.
    key = tl.sort(e * BLOCK_P + i)
    expert = key // BLOCK_P
    pair = key % BLOCK_P
    slot = tl.gather(starts, expert, 0) + i - tl.gather(firsts, expert, 0)
    real = expert < E
    # Sentinels everywhere first; the barrier orders them before the pairs' own stores.
    for o in range(0, n_grouped, FILL):
        lanes = o + tl.arange(0, FILL)
        tl.store(grouped_ptr + lanes, tl.full((FILL,), 0, tl.int32) + P, mask=lanes < n_grouped)
    for o in range(0, n_blocks, FILL):
        lanes = o + tl.arange(0, FILL)
        tl.store(block_expert_ptr + lanes, tl.full((FILL,), -1, tl.int32), mask=lanes < n_blocks)
    tl.debug_barrier()
    tl.store(grouped_ptr + slot, pair, mask=real)
    # Every block holds at least one real pair, and all of a block's pairs share its expert.
    tl.store(block_expert_ptr + slot // BLOCK_M, expert, mask=real)


def align(experts: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """(pairs, block_expert): pair ids (token * k + slot) grouped by expert, each expert's run
    padded to a multiple of `block_m` with the sentinel T*k ([blocks * block_m] int32); and the
    expert of each block, -1 past the last ([blocks] int32). Device work only (no host sync):
    one program for a decode step's pairs, torch's sort and scans past ALIGN_IN_ONE_PROGRAM."""
    pairs = experts.numel()
    blocks = _max_blocks(pairs, num_experts, block_m)
    if 0 < pairs <= ALIGN_IN_ONE_PROGRAM:
        check_device(experts)
        grouped = torch.empty(blocks * block_m, dtype=torch.int32, device=experts.device)
        block_expert = torch.empty(blocks, dtype=torch.int32, device=experts.device)
        _align_kernel[(1,)](
            experts.reshape(-1).to(torch.int32), grouped, block_expert, pairs, num_experts,
            grouped.numel(), blocks, BLOCK_M=block_m, BLOCK_P=triton.next_power_of_2(pairs),
            BLOCK_E=triton.next_power_of_2(num_experts + 1), FILL=1024,
        )
        return grouped, block_expert
    flat = experts.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)  # where each expert's padded run ends
    order = torch.sort(flat, stable=True).indices  # pair ids, grouped by expert
    by_expert = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[by_expert]
    grouped = torch.full((blocks * block_m,), pairs, dtype=torch.int32, device=flat.device)
    grouped[(ends - padded)[by_expert] + rank] = order.to(torch.int32)
    firsts = torch.arange(blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, firsts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return grouped, block_expert


LIMIT: tl.constexpr = tl.constexpr(CLAMPED_SWIGLU_LIMIT)
ALPHA: tl.constexpr = tl.constexpr(CLAMPED_SWIGLU_ALPHA)


@triton.jit
def _expert_activation(gate, up, ACTIVATION: tl.constexpr):
    if ACTIVATION == "clamped_swiglu":
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        h = gate * tl.sigmoid(gate * ALPHA) * (up + 1.0)
    else:
        h = _apply_activation(gate, ACTIVATION) * up
    return h


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, b_ptr, h_ptr, pairs_ptr, block_expert_ptr,
                    P, F, H, s_xt, s_we, s_wn, s_be, s_hp,
                    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert < 0:  # past the last expert's run
        return
    pair = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    real = pair < P
    token = tl.where(real, pair // TOP_K, 0).to(tl.int64)  # padding rows read token 0
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (offs_n % F).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * s_xt + offs_k[None, :]
    # Gate row n and up row F + n of the expert's stacked weight, as W^T [BLOCK_K, BLOCK_N].
    g_ptrs = w_ptr + expert * s_we + cols[None, :] * s_wn + offs_k[:, None]
    u_ptrs = g_ptrs + F * s_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + offs_k) < H
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        acc_g = tl.dot(a, tl.load(g_ptrs, mask=k_ok[:, None], other=0.0), acc_g,
                       input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, tl.load(u_ptrs, mask=k_ok[:, None], other=0.0), acc_u,
                       input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + expert * s_be + cols).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + expert * s_be + F + cols).to(tl.float32)[None, :]
    h = _expert_activation(acc_g, acc_u, ACTIVATION)
    # Only act(gate) * up of the real rows leaves the chip, in the pair's row.
    mask = real[:, None] & (offs_n < F)[None, :]
    tl.store(h_ptr + pair.to(tl.int64)[:, None] * s_hp + offs_n[None, :],
             h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_kernel(h_ptr, w_ptr, b_ptr, route_ptr, y_ptr, pairs_ptr, block_expert_ptr,
                 P, F, H, s_hp, s_we, s_wn, s_be, s_yp,
                 HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    real = pair < P
    row = tl.where(real, pair, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (offs_n % H).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + row[:, None] * s_hp + offs_k[None, :]
    w_ptrs = w_ptr + expert * s_we + cols[None, :] * s_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_ok = (k0 + offs_k) < F
        acc = tl.dot(tl.load(h_ptrs, mask=k_ok[None, :], other=0.0),
                     tl.load(w_ptrs, mask=k_ok[:, None], other=0.0), acc,
                     input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * s_be + cols).to(tl.float32)[None, :]
    # The routing weight scales the expert's output before the token's k rows are summed.
    acc *= tl.load(route_ptr + row, mask=real, other=0.0)[:, None]
    mask = real[:, None] & (offs_n < H)[None, :]
    tl.store(y_ptr + row[:, None] * s_yp + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask)


def _check_experts(x: Tensor, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None,
                   down_bias: Tensor | None, kind: str) -> None:
    if kind not in EXPERT_ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}; expected one of {EXPERT_ACTIVATIONS}")
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"x must be [T, H], gate_up [E, 2F, H] and down [E, H, F]; got "
                         f"{tuple(x.shape)}, {tuple(gate_up.shape)}, {tuple(down.shape)}")
    experts, two_f, hidden = gate_up.shape
    if (x.shape[1] != hidden or two_f % 2 or tuple(down.shape) != (experts, hidden, two_f // 2)):
        raise ValueError(f"x [T, H], gate_up [E, 2F, H] and down [E, H, F] disagree: "
                         f"{tuple(x.shape)}, {tuple(gate_up.shape)}, {tuple(down.shape)}")
    for name, bias, shape in (("gate_up_bias", gate_up_bias, (experts, two_f)),
                              ("down_bias", down_bias, (experts, hidden))):
        if bias is not None and tuple(bias.shape) != shape:
            raise ValueError(f"{name} must be {shape}; got {tuple(bias.shape)}")
    for name, t in (("x", x), ("gate_up", gate_up), ("down", down)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous; got strides "
                             f"{t.stride()}")


def moe_experts(
    x: Tensor,
    weights: Tensor,
    experts: Tensor,
    gate_up: Tensor,
    down: Tensor,
    kind: str,
    *,
    gate_up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
) -> Tensor:
    """sum over a token's k slots of weight * down_e(expert_activation(gate_e x, up_e x)) for
    its experts e (`dsc.ops.moe.expert_activation`: act(gate) * up, or GPT-OSS's clamped form).

    x [T, H]; weights [T, k] (float32) and experts [T, k] (int) from `route`; gate_up
    [E, 2F, H] (gate rows then up rows) and down [E, H, F]; optional biases [E, 2F] and [E, H].
    Returns [T, H] in x's dtype, each product accumulated in fp32.
    """
    _check_experts(x, gate_up, down, gate_up_bias, down_bias, kind)
    check_device(*(t for t in (x, weights, experts, gate_up, down, gate_up_bias, down_bias)
                   if t is not None))
    tokens, hidden = x.shape
    num_experts, two_f, _ = gate_up.shape
    ffn, top_k = two_f // 2, experts.shape[1]
    pairs = tokens * top_k
    if pairs == 0:
        return torch.zeros_like(x)
    block_m = 16 if pairs <= 64 else 64
    grouped, block_expert = align(experts, num_experts, block_m)
    blocks = block_expert.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = torch.empty(pairs, ffn, dtype=x.dtype, device=x.device)
    block_n, block_k = 64, 64
    _gate_up_kernel[(blocks, triton.cdiv(ffn, block_n))](
        x, gate_up, gate_up_bias if gate_up_bias is not None else gate_up, h, grouped,
        block_expert, pairs, ffn, hidden, x.stride(0), gate_up.stride(0), gate_up.stride(1),
        gate_up_bias.stride(0) if gate_up_bias is not None else 0, h.stride(0),
        TOP_K=top_k, HAS_BIAS=gate_up_bias is not None, ACTIVATION=kind,
        DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    y = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(blocks, triton.cdiv(hidden, block_n))](
        h, down, down_bias if down_bias is not None else down, weights.reshape(-1), y, grouped,
        block_expert, pairs, ffn, hidden, h.stride(0), down.stride(0), down.stride(1),
        down_bias.stride(0) if down_bias is not None else 0, y.stride(0),
        HAS_BIAS=down_bias is not None, DOT_PRECISION=precision, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.view(tokens, top_k, hidden).sum(1)
