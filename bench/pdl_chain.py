"""Does programmatic dependent launch shorten kernel boundaries inside a CUDA graph?

A chain of tiny dependent kernels (each adds one to a counter the previous one wrote) captured
in a graph, launched with and without PDL (dsc.kernels.pdl's wait-then-release protocol);
prints microseconds per kernel for both and checks the counter.

    python bench/pdl_chain.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsc.kernels import pdl  # noqa: E402


@triton.jit
def _bump(x_ptr, pad_ptr, N, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    # Programs > 0 stream a slice of pad (stand-in for a weight read) before the boundary.
    pid = tl.program_id(0)
    if USE_PDL:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        pdl.prefetch_l2(pad_ptr + offs)
    pdl.wait_and_release(USE_PDL)
    if pid == 0:
        tl.store(x_ptr, tl.load(x_ptr) + 1)


def per_kernel_us(use_pdl: bool, programs: int, links: int = 200) -> float:
    x = torch.zeros(1, device="cuda", dtype=torch.int64)
    pad = torch.zeros(programs * 256, device="cuda")
    opts = {"USE_PDL": True, "launch_pdl": True} if use_pdl else {"USE_PDL": False}

    def chain():
        for _ in range(links):
            _bump[(programs,)](x, pad, pad.numel(), BLOCK=256, **opts)

    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    x.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert int(x) == links, f"counter {int(x)} after {links} dependent kernels"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (10 * links))
    return sorted(times)[2]


def main() -> None:
    print(torch.cuda.get_device_name())
    for programs in (1, 132, 528):
        off, on = per_kernel_us(False, programs), per_kernel_us(True, programs)
        print(f"{programs:>4} programs: {off:.2f} us/kernel plain, {on:.2f} with PDL")


if __name__ == "__main__":
    main()
