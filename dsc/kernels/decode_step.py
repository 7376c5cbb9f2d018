"""The token choice and bookkeeping between two greedy decode steps, in two launches.

After a decode step has chosen each row's token (argmax of its logits), the next step needs that
token as its input id, the position one further, the cache slot one further and marked valid,
and the token recorded; rows that produced an end-of-sequence token earlier emit the pad id.
Written as torch ops that is about ten launches of a few microseconds each, per token; here one
program does all of it for every row (a batch is at most a few dozen rows, so the program holds
them all, and no two programs race on the shared slot and column counters).

The argmax itself is split in two: `_argmax_blocks_kernel` reduces blocks of each logits row on
many programs at once (torch.argmax took 16 µs per token on OPT-1.3B's 50k vocabulary,
bench/results/profile-H100-2026-11-27-run3-opt.jsonl), and the advance kernel finishes the
reduction over the blocks' winners. A NaN logit wins, as it does in torch.argmax.

State, all in device memory (a CUDA graph replays these kernels unchanged step after step):
  logits [B, V]  this step's last-position logits;
  finished [B]   rows already past their eos (uint8);
  eos [E]        end-of-sequence ids, unused entries -1;
  pad [1]        the id finished rows emit;
  tokens [B, C]  every chosen token; this step's goes to column col[0], then col advances;
  ids [B], pos [B]  the next step's input id and position (pos advances by one);
  start [1]      the next step's cache slot (advances by one; that slot is marked in valid [B, T]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["advance_greedy"]

_ARGMAX_BLOCK = 2048  # logits per program of the first argmax stage


@triton.jit
def _argmax_blocks_kernel(logits_ptr, best_ptr, where_ptr, V, P, stride_row,
                          BLOCK: tl.constexpr):
    """Program (row, p): the largest logit of block p of the row and its first position."""
    row = tl.program_id(0)
    p = tl.program_id(1)
    cols = p * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=cols < V,
                other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN counts as the largest value
    best = tl.max(x, axis=0)
    # First position holding the maximum, as torch.argmax picks.
    where = tl.min(tl.where(x == best, cols, V), axis=0)
    tl.store(best_ptr + row * P + p, best)
    tl.store(where_ptr + row * P + p, where)


@triton.jit
def _advance_kernel(
    best_ptr, where_ptr, finished_ptr, eos_ptr, pad_ptr, tokens_ptr, col_ptr, ids_ptr, pos_ptr,
    start_ptr, valid_ptr,
    B, P, E, C, T,
    stride_tok, stride_ids, stride_pos, stride_valid,
    HAS_EOS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    r = tl.arange(0, BLOCK_B)
    ok = r < B
    # The blocks' winners: the largest value, the first position among equal ones.
    p = tl.arange(0, BLOCK_P)
    at = r[:, None] * P + p[None, :]
    in_range = ok[:, None] & (p[None, :] < P)
    best = tl.load(best_ptr + at, mask=in_range, other=float("-inf"))
    where = tl.load(where_ptr + at, mask=in_range, other=2**31 - 1)
    top = tl.max(best, axis=1)
    token = tl.min(tl.where(best == top[:, None], where, 2**31 - 1), axis=1).to(tl.int64)
    if HAS_EOS:
        done = tl.load(finished_ptr + r, mask=ok, other=0) != 0
        pad = tl.load(pad_ptr).to(tl.int64)
        token = tl.where(done, pad, token)
        e = tl.arange(0, BLOCK_E)
        eos = tl.load(eos_ptr + e, mask=e < E, other=-1).to(tl.int64)
        hit = tl.max((token[:, None] == eos[None, :]).to(tl.int32), axis=1) != 0
        tl.store(finished_ptr + r, (done | hit).to(tl.uint8), mask=ok)
    col = tl.load(col_ptr)
    tl.store(tokens_ptr + r * stride_tok + col, token, mask=ok & (col < C))
    tl.store(col_ptr, col + 1)
    tl.store(ids_ptr + r * stride_ids, token, mask=ok)
    pos = tl.load(pos_ptr + r * stride_pos, mask=ok, other=0)
    tl.store(pos_ptr + r * stride_pos, pos + 1, mask=ok)
    start = tl.load(start_ptr) + 1
    tl.store(start_ptr, start)
    tl.store(valid_ptr + r * stride_valid + start, 1, mask=ok & (start < T))


def advance_greedy(
    logits: Tensor, finished: Tensor, eos: Tensor, pad: Tensor, tokens: Tensor, col: Tensor,
    ids: Tensor, pos: Tensor, start: Tensor, valid: Tensor, has_eos: bool,
) -> None:
    """Choose each row's token (argmax of `logits`), record it (pad for finished rows) and set
    up the next step, in place.

    logits [B, V] (unit stride along V); finished [B] bool; eos [E] int64; pad, col, start [1]
    int64;
    tokens [B, C] int64 (unit stride along C); ids, pos [B] or [B, 1] int64; valid [B, T] bool.
    With has_eos False, finished, eos and pad are not read.
    """
    batch, vocab = logits.shape
    for name, t in (("logits", logits), ("tokens", tokens), ("valid", valid)):
        if t.dim() != 2 or t.shape[0] != batch or t.stride(1) != 1:
            raise ValueError(f"{name} must be [{batch}, n] with unit stride along n; got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    if finished.dtype != torch.bool or valid.dtype != torch.bool:
        raise ValueError("finished and valid must be bool tensors")
    blocks = triton.cdiv(vocab, _ARGMAX_BLOCK)
    best = torch.empty(batch, blocks, dtype=torch.float32, device=logits.device)
    where = torch.empty(batch, blocks, dtype=torch.int32, device=logits.device)
    _argmax_blocks_kernel[(batch, blocks)](
        logits, best, where, vocab, blocks, logits.stride(0), BLOCK=_ARGMAX_BLOCK, num_warps=8,
    )
    _advance_kernel[(1,)](
        best, where, finished.view(torch.uint8), eos, pad, tokens, col, ids, pos, start,
        valid.view(torch.uint8),
        batch, blocks, eos.numel(), tokens.shape[1], valid.shape[1],
        tokens.stride(0), ids.stride(0), pos.stride(0), valid.stride(0),
        HAS_EOS=has_eos, BLOCK_B=triton.next_power_of_2(batch),
        BLOCK_P=triton.next_power_of_2(blocks),
        BLOCK_E=triton.next_power_of_2(max(eos.numel(), 1)), num_warps=4,
    )
