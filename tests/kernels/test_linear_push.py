"""The small-batch GEMM's push epilogue with the receiving all-reduce, in one process: every
rank's buffer lives here (tests/kernels/test_push_all_reduce.SimulatedPeers), each rank's GEMM
sends its tiles into all of them, then each rank receives. The sum must equal the GEMMs' outputs
added in rank order in fp32 — the bits the unfused GEMM + push all-reduce give."""

import pytest
import torch

from dsc.kernels.push_all_reduce import MAX_ROWS, receive_sum
from dsc.kernels.small_batch_gemm import (
    SmallBatchConfig,
    linear_push_partial,
    linear_small_batch,
    push_config,
)
from tests.kernels.test_push_all_reduce import SimulatedPeers

CASES = [
    # world, rows, N, K, dtype, config (None: the heuristic's)
    (2, 1, 40, 24, torch.float32, None),
    (4, 1, 34, 40, torch.bfloat16, SmallBatchConfig(1, 4, 16)),     # 34 columns: a ragged tile
    (2, 3, 18, 20, torch.float16, SmallBatchConfig(16, 8, 16)),     # the tl.dot path
    (4, 2, 24, 33, torch.float32, SmallBatchConfig(1, 2, 16)),      # fp32: one element a word
]


def _operands(world, rows, n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(rows, k, generator=gen).to(dtype) for _ in range(world)]
    ws = [(torch.randn(n, k, generator=gen) / k**0.5).to(dtype) for _ in range(world)]
    return xs, ws


@pytest.mark.parametrize("world,rows,n,k,dtype,config", CASES)
def test_pushed_partials_sum_to_the_rank_order_sum(world, rows, n, k, dtype, config):
    # Every rank shares the same buffers here; each keeps its own state (call counts).
    peers = [SimulatedPeers(world, rank=r) for r in range(world)]
    for p in peers[1:]:
        p.buffers, p.ptrs = peers[0].buffers, peers[0].ptrs
    for seed in range(3):  # consecutive calls alternate the halves and the sequence numbers
        xs, ws = _operands(world, rows, n, k, dtype, seed)
        for r in range(world):
            linear_push_partial(xs[r], ws[r], rank=r, world=world, buffer_ptrs=peers[r].ptrs,
                                state=peers[r].state, config=config)
        got = [receive_sum((rows, n), dtype, rank=r, world=world, buffer_ptrs=peers[r].ptrs,
                           state=peers[r].state) for r in range(world)]
        parts = [linear_small_batch(xs[r], ws[r], config=config) for r in range(world)]
        want = sum(p.float() for p in parts).to(dtype)
        for r in range(world):
            assert torch.equal(got[r], got[0])  # the same bits on every rank
        if dtype == torch.float32:
            assert torch.equal(got[0], want)
        torch.testing.assert_close(got[0], want, atol=2e-2, rtol=2e-2)
    for p in peers:
        assert p.state[:rows].tolist() == [3] * rows


def test_a_rank_that_did_not_push_is_not_summed_as_zero_words():
    # Rank 1 never sent this call: rank 0 receives nothing from it (zeros in the interpreter,
    # where the spin gives up; on the GPU the kernel would trap) — never a stale earlier call.
    world, rows, n, k = 2, 1, 16, 16
    peers = SimulatedPeers(world, rank=0)
    other = SimulatedPeers(world, rank=1)
    other.buffers, other.ptrs = peers.buffers, peers.ptrs
    xs, ws = _operands(world, rows, n, k, torch.float32, 0)
    for r, p in enumerate((peers, other)):
        linear_push_partial(xs[r], ws[r], rank=r, world=world, buffer_ptrs=p.ptrs, state=p.state)
    receive_sum((rows, n), torch.float32, rank=0, world=world, buffer_ptrs=peers.ptrs,
                state=peers.state)
    xs2, ws2 = _operands(world, rows, n, k, torch.float32, 1)
    linear_push_partial(xs2[0], ws2[0], rank=0, world=world, buffer_ptrs=peers.ptrs,
                        state=peers.state)
    got = receive_sum((rows, n), torch.float32, rank=0, world=world, buffer_ptrs=peers.ptrs,
                      state=peers.state)
    assert torch.equal(got, linear_small_batch(xs2[0], ws2[0]))


@pytest.mark.parametrize("rows,n,k,dtype,config,why", [
    (MAX_ROWS + 1, 16, 16, torch.float32, None, "rows"),
    (1, 15, 16, torch.bfloat16, None, "odd 16-bit row"),
    (1, 16, 64, torch.bfloat16, SmallBatchConfig(1, 8, 16, split_k=2), "K split"),
    (1, 16, 16, torch.bfloat16, SmallBatchConfig(1, 1, 16), "half-word tiles"),
])
def test_products_it_cannot_push_are_refused(rows, n, k, dtype, config, why):
    x, w = torch.zeros(rows, k, dtype=dtype), torch.zeros(n, k, dtype=dtype)
    assert push_config(x, w, config) is None, why
    with pytest.raises(ValueError, match="cannot be pushed"):
        linear_push_partial(x, w, rank=0, world=2, buffer_ptrs=torch.zeros(2, dtype=torch.int64),
                            state=torch.zeros(8, dtype=torch.int32), config=config)
