"""The fused all-reduce + residual + RMSNorm kernel, in one process: the peers' partials are
already in their buffers and their arrival flags already raised, so this rank's programs run
straight through the barrier (the interpreter runs one program at a time)."""

import pytest
import torch

from dsc.kernels.all_reduce_norm import (
    MAX_ROWS,
    all_reduce_residual_rms_norm,
    flag_elements,
)
from dsc.ops.norms import rms_norm


class SimulatedPeers:
    """Every rank's symmetric buffer and flag array in this process; `call` plays `rank`."""

    def __init__(self, world: int, h_dim: int, dtype: torch.dtype, rank: int = 0):
        self.world, self.h_dim, self.dtype, self.rank = world, h_dim, dtype, rank
        self.elements = 2 * MAX_ROWS * h_dim
        self.buffers = [torch.zeros(self.elements, dtype=dtype) for _ in range(world)]
        self.flags = [torch.zeros(flag_elements(world), dtype=torch.int32) for _ in range(world)]
        table = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa
        self.buffer_ptrs, self.flag_ptrs = table(self.buffers), table(self.flags)

    def call(self, parts, residual, weight):
        rows = parts[0].numel() // self.h_dim
        for row in range(rows):
            half = int(self.flags[self.rank][MAX_ROWS * self.world + row]) & 1
            at = (half * MAX_ROWS + row) * self.h_dim
            for peer in range(self.world):
                if peer != self.rank:
                    # The peer took down our last arrival, stored its row, raised its flag here.
                    self.flags[peer][row * self.world + self.rank] = 0
                    self.buffers[peer][at:at + self.h_dim] = parts[peer].reshape(rows, -1)[row]
                    self.flags[self.rank][row * self.world + peer] = 1
        return all_reduce_residual_rms_norm(
            parts[self.rank], residual, weight, 1e-5, self.dtype, rank=self.rank,
            world=self.world, buffer_ptrs=self.buffer_ptrs, flag_ptrs=self.flag_ptrs,
            buffer_elements=self.elements)


def _inputs(world, shape, dtype, weight, seed):
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(shape, generator=gen).to(dtype) for _ in range(world)]
    residual = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(shape[-1], generator=gen).to(dtype) if weight else None
    want_h = residual + sum(p.float() for p in parts).to(dtype)
    return parts, residual, w, want_h, rms_norm(want_h, w, 1e-5, dtype)


@pytest.mark.parametrize("world,shape,dtype,weight", [
    (2, (1, 1, 40), torch.float32, True),
    (4, (3, 1, 33), torch.float32, True),
    (2, (2, 50), torch.float32, False),
    (4, (1, 1, 64), torch.bfloat16, True),
])
def test_sum_residual_and_norm_equal_the_three_ops(world, shape, dtype, weight):
    peers = SimulatedPeers(world, shape[-1], dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for seed in range(3):  # consecutive calls alternate the buffer halves
        parts, residual, w, want_h, want_n = _inputs(world, shape, dtype, weight, seed)
        h, normed = peers.call(parts, residual, w)
        torch.testing.assert_close(h, want_h, **tol)
        torch.testing.assert_close(normed, want_n, **tol)


def test_flags_consumed_here_raised_at_the_peers_and_calls_counted():
    world, rank, rows = 4, 2, 2
    peers = SimulatedPeers(world, 24, torch.float32, rank=rank)
    parts, residual, w, *_ = _inputs(world, (rows, 1, 24), torch.float32, True, 0)
    peers.call(parts, residual, w)
    mine = peers.flags[rank]
    assert int(mine[: MAX_ROWS * world].abs().sum()) == 0  # every arrival consumed
    assert mine[MAX_ROWS * world:][:rows].tolist() == [1] * rows  # one call for each row
    for peer in range(world):
        if peer != rank:  # our arrival waits there for the peer to take it down
            assert [int(peers.flags[peer][row * world + rank]) for row in range(rows)] == [1, 1]


def test_too_many_rows_are_refused():
    x = torch.zeros(MAX_ROWS + 1, 8)
    table = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="do not fit"):
        all_reduce_residual_rms_norm(x, x, None, 1e-5, x.dtype, rank=0, world=2,
                                     buffer_ptrs=table, flag_ptrs=table, buffer_elements=10**6)
