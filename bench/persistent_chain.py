"""Would a persistent decode kernel beat one kernel per GEMV? A measurement, before building one.

A batch-1 decode step of a small model is a chain of short weight streams (Llama-1.1B: 4 GEMVs a
layer, 88 a step), and each kernel costs ~2.5-3 µs over its bytes (bench/NOTES.md). This times
the same chain of GEMVs (Llama-1.1B's shapes, 22 layers: qkv 2560x2048, o 2048x2048, gate/up
11264x2048, down 2048x5632, bf16) two ways, each as one CUDA graph:

* `kernels`: dsc's small-batch GEMM once per weight, PDL between them (what a step runs now,
  without the norms, activation and attention);
* `persistent`: one launch of one program per SM that walks every phase, each program taking
  whole BLOCK_N-row tiles of the phase's weight, a grid barrier (an arrival counter) between
  phases; optionally each program asks L2 for its first tile of the next phase before it waits.

Both are checked against torch on every phase's output, and the floor (the weights' bytes at the
copy bandwidth measured in the same run) is printed with them. The kernel here is a prototype:
it needs every program resident at once (grid = SM count, one program each), which holds for
this launch but is not a runtime guarantee.

    python bench/persistent_chain.py [--layers 22] [--out results/persistent-chain.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsc.kernels import pdl  # noqa: E402
from dsc.kernels.small_batch_gemm import linear_small_batch  # noqa: E402
from kernels import measure_copy_bandwidth  # noqa: E402  (bench/kernels.py)

# (N, K) of one Llama-1.1B layer's projections, in step order.
LAYER = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]
FIELDS = 5  # per phase in the table: weight offset, N, K, input offset, output offset


@triton.jit
def _load_acquire(ptr):
    """The counter, with acquire order: loads after it see what was released before it."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.u32 $0, [$1];", "=r,l", [ptr],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _chain_kernel(w_ptr, act_ptr, table_ptr, bar_ptr, phases,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                  PREFETCH: tl.constexpr, FLAT: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for ph in range(0, phases):
        row = table_ptr + ph * 5
        # Offsets and K are multiples of 16 (build() makes them so): vector loads.
        w_off = tl.multiple_of(tl.load(row), 16)
        n = tl.load(row + 1).to(tl.int32)
        k = tl.multiple_of(tl.load(row + 2).to(tl.int32), 16)
        in_off = tl.multiple_of(tl.load(row + 3), 16)
        out_off = tl.multiple_of(tl.load(row + 4), 16)
        if FLAT:
            # All of this program's tiles as one pipelined loop over (tile, K step): the next
            # tile's first loads are in flight while the last one finishes.
            steps = k // BLOCK_K
            mine = (n // BLOCK_N - pid + programs - 1) // programs
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for it in tl.range(0, mine * steps, num_stages=NUM_STAGES):
                t_local = it // steps
                kk = it - t_local * steps
                rows = ((pid + t_local * programs) * BLOCK_N + offs_n).to(tl.int64)
                w = tl.load(w_ptr + w_off + rows[:, None] * k + (kk * BLOCK_K + offs_k)[None, :],
                            eviction_policy="evict_first")
                x = tl.load(act_ptr + in_off + kk * BLOCK_K + offs_k, cache_modifier=".cg")
                acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
                last = kk == steps - 1
                tl.store(act_ptr + out_off + rows, tl.sum(acc, axis=1).to(act_ptr.dtype.element_ty),
                         mask=(offs_n < BLOCK_N) & last)
                acc = tl.where(last, 0.0, acc)
        else:
            for tile in range(pid, n // BLOCK_N, programs):
                rows = (tile * BLOCK_N + offs_n).to(tl.int64)
                w_ptrs = w_ptr + w_off + rows[:, None] * k + offs_k[None, :]
                x_ptrs = act_ptr + in_off + offs_k
                acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
                for _ in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
                    w = tl.load(w_ptrs, eviction_policy="evict_first")
                    x = tl.load(x_ptrs, cache_modifier=".cg")  # written by other SMs: skip L1
                    acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
                    w_ptrs += BLOCK_K
                    x_ptrs += BLOCK_K
                tl.store(act_ptr + out_off + rows, tl.sum(acc, axis=1).to(act_ptr.dtype.element_ty))
        if PREFETCH:
            if ph + 1 < phases:
                # The next phase's weight depends on nothing: ask L2 for this program's first
                # tile of it (whole rows, one request per 128-byte line) before waiting.
                nxt = row + 5
                nw_off = tl.load(nxt)
                nk = tl.load(nxt + 2).to(tl.int32)
                if pid < tl.load(nxt + 1).to(tl.int32) // BLOCK_N:
                    lines = tl.arange(0, 64) * 64
                    for r in range(0, BLOCK_N):
                        base = w_ptr + nw_off + (pid * BLOCK_N + r).to(tl.int64) * nk
                        for c in range(0, nk, 64 * 64):
                            pdl.prefetch_l2(base + tl.minimum(c + lines, nk - 1))
        # Grid barrier: every program's outputs of this phase are visible before any reads them.
        tl.debug_barrier()
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
        target = (ph + 1) * programs
        count = _load_acquire(bar_ptr)
        while count < target:
            count = _load_acquire(bar_ptr)


def build(layers: int, device: str = "cuda"):
    shapes = LAYER * layers
    width = max(max(n, k) for n, k in shapes)
    offsets, total = [], 0
    for n, k in shapes:
        offsets.append(total)
        total += n * k
    g = torch.Generator(device).manual_seed(0)
    weights = torch.randn(total, device=device, dtype=torch.bfloat16, generator=g)
    weights /= 2048 ** 0.5  # keeps every phase's outputs near unit scale
    act = torch.zeros((len(shapes) + 1) * width, device=device, dtype=torch.bfloat16)
    act[:2048] = torch.randn(2048, device=device, dtype=torch.bfloat16, generator=g)
    table = torch.tensor([[off, n, k, i * width, (i + 1) * width]
                          for i, (off, (n, k)) in enumerate(zip(offsets, shapes))],
                         device=device, dtype=torch.int64)
    views = [weights[off:off + n * k].view(n, k) for off, (n, k) in zip(offsets, shapes)]
    return shapes, width, weights, views, act, table


def check(shapes, width, views, act) -> float:
    """Worst relative error of any phase's output against torch on that phase's own input."""
    worst = 0.0
    for i, ((n, k), w) in enumerate(zip(shapes, views)):
        x = act[i * width:i * width + k].float()
        want = w.float() @ x
        got = act[(i + 1) * width:(i + 1) * width + n].float()
        worst = max(worst, ((got - want).norm() / want.norm()).item())
    return worst


def time_graph(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def capture(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    shapes, width, weights, views, act, table = build(args.layers)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gbps = measure_copy_bandwidth()  # bench/kernels.py's, as e2e.py's floor
    floor_ms = weights.numel() * 2 / gbps / 1e6
    rows = [{"variant": "floor", "ms": floor_ms, "copy_gbps": gbps}]

    # One kernel per GEMV, as the decode step runs them, each writing into the chain's buffer.
    def kernels():
        for i, ((n, k), w) in enumerate(zip(shapes, views)):
            linear_small_batch(act[i * width:i * width + k].view(1, k), w,
                               out=act[(i + 1) * width:(i + 1) * width + n].view(1, n))

    graph = capture(kernels)
    graph.replay()
    torch.cuda.synchronize()
    rows.append({"variant": "kernels", "ms": time_graph(graph),
                 "err": check(shapes, width, views, act)})

    barrier = torch.zeros(1, device="cuda", dtype=torch.int32)
    # (K of every phase must be a multiple of BLOCK_K: the loops are unmasked.)
    for block_n, block_k, stages, prefetch, per_sm, flat in (
        (8, 512, 4, False, 1, False), (8, 512, 4, False, 2, False), (8, 512, 4, False, 4, False),
        (8, 512, 4, False, 1, True), (8, 512, 4, False, 2, True), (8, 256, 4, False, 4, True),
        (8, 512, 4, True, 2, True),
    ):
        programs = per_sm * sms
        act[width:].zero_()

        def persistent(programs=programs, options=dict(  # noqa: B006  (bound per variant)
                BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=stages, PREFETCH=prefetch,
                FLAT=flat)):
            barrier.zero_()
            _chain_kernel[(programs,)](weights, act, table, barrier, len(shapes), **options,
                                       num_warps=4)

        graph = capture(persistent)
        graph.replay()
        torch.cuda.synchronize()
        rows.append({"variant": f"persistent {block_n}x{block_k} s{stages} P={programs}"
                                f"{' flat' if flat else ''}{' prefetch' if prefetch else ''}",
                     "ms": time_graph(graph), "err": check(shapes, width, views, act)})

    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: {len(shapes)} GEMVs, {weights.numel() * 2 / 1e9:.2f} GB, copy {gbps:.0f} GB/s")
    for r in rows:
        over = r["ms"] / floor_ms
        err = f"  err {r['err']:.1e}" if "err" in r else ""
        print(f"{r['variant']:<40} {r['ms']:8.3f} ms  {over:5.2f}x floor"
              f"  {1e3 * (r['ms'] - floor_ms) / len(shapes):5.2f} us/GEMV over{err}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "gpu": gpu, "date": stamp, "gemvs": len(shapes)}) + "\n")


if __name__ == "__main__":
    main()
