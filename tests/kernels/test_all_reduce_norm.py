"""The fused all-reduce + residual + RMSNorm kernel, in one process: the peers' partials are
already in their buffers and their flags already raised, so rank 0's program runs straight
through both barriers (the interpreter runs one program at a time)."""

import pytest
import torch

from dsc.kernels.all_reduce_norm import MAX_ROWS, all_reduce_residual_rms_norm
from dsc.ops.norms import rms_norm


def _run(world: int, shape: tuple[int, ...], dtype: torch.dtype, weight: bool, rank: int = 0):
    gen = torch.Generator().manual_seed(world * 100 + shape[-1])
    h_dim = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    parts = [torch.randn(shape, generator=gen).to(dtype) for _ in range(world)]
    residual = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(h_dim, generator=gen).to(dtype) if weight else None
    elements = rows * h_dim + 7
    buffers = [torch.zeros(elements, dtype=dtype) for _ in range(world)]
    flags = [torch.zeros(2 * MAX_ROWS * world, dtype=torch.int32) for _ in range(world)]
    for peer in range(world):
        if peer != rank:
            buffers[peer][: rows * h_dim] = parts[peer].reshape(-1)
            for phase in range(2):  # the peer has arrived at both barriers of every row
                for row in range(rows):
                    flags[rank][(phase * MAX_ROWS + row) * world + peer] = 1
    table = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa: E731
    h, normed = all_reduce_residual_rms_norm(
        parts[rank], residual, w, 1e-5, dtype, rank=rank, world=world,
        buffer_ptrs=table(buffers), flag_ptrs=table(flags), buffer_elements=elements)
    total = sum(p.float() for p in parts).to(dtype)
    want_h = residual + total
    return h, normed, want_h, rms_norm(want_h, w, 1e-5, dtype), flags, rows


@pytest.mark.parametrize("world,shape,dtype,weight", [
    (2, (1, 1, 40), torch.float32, True),
    (4, (3, 1, 33), torch.float32, True),
    (2, (2, 50), torch.float32, False),
    (4, (1, 1, 64), torch.bfloat16, True),
])
def test_sum_residual_and_norm_equal_the_three_ops(world, shape, dtype, weight):
    h, normed, want_h, want_n, _, _ = _run(world, shape, dtype, weight)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h, want_h, **tol)
    torch.testing.assert_close(normed, want_n, **tol)


def test_flags_are_consumed_here_and_raised_at_the_peers():
    world, rank = 4, 2
    *_, flags, rows = _run(world, (2, 1, 24), torch.float32, True, rank=rank)
    assert int(flags[rank].abs().sum()) == 0  # every arrival consumed, ready for the next call
    for peer in range(world):
        if peer == rank:
            continue
        for phase in range(2):
            for row in range(rows):  # our signals wait there for the peer to consume them
                assert int(flags[peer][(phase * MAX_ROWS + row) * world + rank]) == 1


def test_too_many_rows_are_refused():
    x = torch.zeros(MAX_ROWS + 1, 8)
    table = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="do not fit"):
        all_reduce_residual_rms_norm(x, x, None, 1e-5, x.dtype, rank=0, world=2,
                                     buffer_ptrs=table, flag_ptrs=table, buffer_elements=10**6)
