"""The push all-reduce kernel (plain and fused with residual + RMSNorm), in one process: the
peers' flagged words are already in this rank's receive buffer, as if they had pushed them.
The interpreter runs one program at a time, so a fused row of several programs cannot meet at
its barrier: there the other programs' partial sums of squares are in place beforehand too,
and the waiting programs give up after a few tries and read them (on the GPU they meet;
tests/gpu/tp_worker.py checks that path)."""

import pytest
import torch

from dsc.kernels.push_all_reduce import (
    MAX_CHUNKS,
    MAX_ROW_WORDS,
    MAX_ROWS,
    buffer_words,
    fits,
    push_all_gather,
    push_all_reduce,
    push_all_reduce_residual,
    push_all_reduce_residual_norm,
    state_elements,
)
from dsc.ops.norms import rms_norm


def _flagged(x: torch.Tensor, seq: int) -> torch.Tensor:
    """x's rows as 64-bit words: 32 data bits, seq above them."""
    words = x.reshape(x.shape[0], -1).contiguous().view(torch.int32).to(torch.int64)
    return (seq << 32) | (words & 0xFFFFFFFF)


class SimulatedPeers:
    """Every rank's receive buffer in this process, plus `rank`'s state; `call` plays `rank`."""

    def __init__(self, world: int, rank: int = 0, chunk_words: int | None = None):
        self.world, self.rank, self.chunk_words = world, rank, chunk_words
        self.buffers = [torch.zeros(buffer_words(world), dtype=torch.int64) for _ in range(world)]
        self.ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64)
        self.state = torch.zeros(state_elements(), dtype=torch.int32)

    def slot(self, half: int, row: int, src: int) -> int:
        return ((half * MAX_ROWS + row) * self.world + src) * MAX_ROW_WORDS

    def deliver(self, parts):
        """Put every rank's row into our buffer with the sequence number of the row's call."""
        h_dim = parts[0].shape[-1]
        for src, part in enumerate(parts):
            rows = part.reshape(-1, h_dim)
            for row in range(rows.shape[0]):
                count = int(self.state[row])
                seq = (count & 0x3FFFFFFF) | 0x40000000
                words = _flagged(rows[row:row + 1], seq)[0]
                at = self.slot(count & 1, row, src)
                self.buffers[self.rank][at:at + words.numel()] = words

    def arrive(self, h: torch.Tensor):
        """Put the partial sums of squares of h's rows, a chunk each, where the row's programs
        leave them."""
        pack = 4 // h.element_size()
        per = self.chunk_words * pack
        rows = h.reshape(-1, h.shape[-1]).float()
        partials = self.state.view(torch.float32)
        for row in range(rows.shape[0]):
            for c, start in enumerate(range(0, rows.shape[1], per)):
                part = rows[row, start:start + per]
                partials[2 * MAX_ROWS + row * MAX_CHUNKS + c] = (part * part).sum()

    def kwargs(self):
        return dict(rank=self.rank, world=self.world, buffer_ptrs=self.ptrs, state=self.state,
                    chunk_words=self.chunk_words)


def _inputs(world, shape, dtype, weight, seed):
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(shape, generator=gen).to(dtype) for _ in range(world)]
    residual = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(shape[-1], generator=gen).to(dtype) if weight else None
    total = sum(p.float() for p in parts).to(dtype)
    return parts, residual, w, total


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("world,shape,dtype,weight,chunk", [
    (2, (1, 1, 40), torch.float32, True, None),
    (4, (3, 1, 34), torch.float32, True, 8),     # several programs a row
    (2, (2, 50), torch.float32, False, None),
    (4, (1, 1, 66), torch.bfloat16, True, 4),    # two elements a word, 33 words in 9 chunks
    (2, (2, 1, 36), torch.float16, True, None),
])
def test_fused_equals_the_three_ops(world, shape, dtype, weight, chunk):
    peers = SimulatedPeers(world, rank=world - 1, chunk_words=chunk)
    for seed in range(3):  # consecutive calls alternate the halves and the sequence numbers
        parts, residual, w, total = _inputs(world, shape, dtype, weight, seed)
        peers.deliver(parts)
        if chunk is not None:
            peers.arrive(residual + total)
        h, normed = push_all_reduce_residual_norm(parts[peers.rank], residual, w, 1e-5, dtype,
                                                  **peers.kwargs())
        want_h = residual + total
        torch.testing.assert_close(h, want_h, **_tol(dtype))
        torch.testing.assert_close(normed, rms_norm(want_h, w, 1e-5, dtype), **_tol(dtype))
    assert int(peers.state[0]) == 3 and int(peers.state[MAX_ROWS]) == 0  # counted; ticket reset


@pytest.mark.parametrize("world,shape,dtype,chunk", [
    (2, (1, 1, 40), torch.float32, None),
    (4, (3, 1, 34), torch.float32, 8),     # several programs a row
    (4, (1, 66), torch.bfloat16, 4),
    (2, (2, 1, 36), torch.float16, None),
])
def test_residual_add_equals_the_two_ops(world, shape, dtype, chunk):
    peers = SimulatedPeers(world, rank=1, chunk_words=chunk)
    for seed in range(3):
        parts, residual, _, total = _inputs(world, shape, dtype, False, seed)
        peers.deliver(parts)
        h = push_all_reduce_residual(parts[peers.rank], residual, **peers.kwargs())
        assert h.shape == residual.shape and h.dtype == dtype
        torch.testing.assert_close(h, residual + total, **_tol(dtype))
    assert int(peers.state[0]) == 3 and int(peers.state[MAX_ROWS]) == 0
    with pytest.raises(ValueError, match="residual .* must match"):
        push_all_reduce_residual(parts[0], residual[..., :-2], **peers.kwargs())


@pytest.mark.parametrize("world,shape,dtype,chunk", [
    (2, (1, 48), torch.float32, None),
    (4, (5, 3, 20), torch.float32, 4),
    (4, (2, 70), torch.bfloat16, 8),
])
def test_plain_sum_is_exact_and_alike_on_every_rank(world, shape, dtype, chunk):
    results = []
    for rank in range(world):
        peers = SimulatedPeers(world, rank=rank, chunk_words=chunk)
        parts, _, _, total = _inputs(world, shape, dtype, False, 0)
        peers.deliver(parts)
        results.append(push_all_reduce(parts[rank], **peers.kwargs()))
    # Summed in rank order in fp32 and rounded once: the same bits on every rank, and in fp32
    # the reference's bits (the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest).
    for got in results:
        assert torch.equal(got, results[0])
        if dtype == torch.float32:
            assert torch.equal(got, total)
        torch.testing.assert_close(got, total, **_tol(dtype))


@pytest.mark.parametrize("world,shape,dtype,chunk", [
    (2, (1, 1, 40), torch.float32, None),
    (4, (3, 1, 18), torch.bfloat16, 4),   # several programs a row
    (4, (2, 6), torch.float16, None),
])
def test_gather_places_every_rank_side_by_side(world, shape, dtype, chunk):
    peers = SimulatedPeers(world, rank=1, chunk_words=chunk)
    for seed in range(2):
        parts, *_ = _inputs(world, shape, dtype, False, seed)
        peers.deliver(parts)
        got = push_all_gather(parts[1], **peers.kwargs())
        assert torch.equal(got, torch.cat(parts, dim=-1))  # copied, bit for bit


def test_words_pushed_to_every_rank_and_counts_advanced():
    world, rank, rows = 4, 2, 3
    peers = SimulatedPeers(world, rank=rank, chunk_words=4)
    parts, *_ = _inputs(world, (rows, 24), torch.float32, False, 0)
    peers.deliver(parts)
    push_all_reduce(parts[rank], **peers.kwargs())
    for dst in range(world):
        for row in range(rows):
            at = peers.slot(0, row, rank)
            sent = peers.buffers[dst][at:at + 24]
            assert torch.equal(sent, _flagged(parts[rank][row:row + 1], 0x40000000)[0])
    assert peers.state[:rows].tolist() == [1] * rows  # one call for each row
    assert peers.state[MAX_ROWS:].abs().sum() == 0  # tickets back to zero for the next call
    # The next call uses the other half with the next sequence number.
    parts2, *_ = _inputs(world, (rows, 24), torch.float32, False, 1)
    peers.deliver(parts2)
    push_all_reduce(parts2[rank], **peers.kwargs())
    at = peers.slot(1, 0, rank)
    assert int(peers.buffers[0][at]) >> 32 == 0x40000001


def test_stale_words_are_not_taken_for_new_ones():
    # The peers' words of the previous call sit in the other half; this call's never came.
    peers = SimulatedPeers(2, rank=0)
    parts, *_ = _inputs(2, (1, 16), torch.float32, False, 0)
    peers.deliver(parts)
    push_all_reduce(parts[0], **peers.kwargs())
    out = push_all_reduce(parts[0] * 2, **peers.kwargs())  # rank 1 never pushed call 2
    assert not torch.equal(out, parts[0] * 2 + parts[1] * 2)
    assert torch.equal(out, parts[0] * 2)  # rank 1's slot of half 1 still holds zeros


@pytest.mark.parametrize("shape,dtype", [
    ((MAX_ROWS + 1, 8), torch.float32),
    ((1, MAX_ROW_WORDS + 1), torch.float32),
    ((1, 7), torch.bfloat16),   # 14 bytes: not whole words
    ((1, 8), torch.int32),
])
def test_messages_that_do_not_fit_are_refused(shape, dtype):
    x = torch.zeros(shape, dtype=dtype)
    assert not fits(x)
    table = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="does not fit"):
        push_all_reduce(x, rank=0, world=2, buffer_ptrs=table,
                        state=torch.zeros(state_elements(), dtype=torch.int32))
