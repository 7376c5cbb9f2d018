"""Benchmark dsc's Triton kernels against torch on one GPU, in one run.

    PYTHONPATH=. python bench/kernels.py [--out PATH] [--sweep]

First the two ceilings of this card, measured now: device copy bandwidth (a large `copy_`, bytes
read + written) and the bf16 GEMM rate (8192^3 `torch.matmul`). Then every kernel on its target
shapes, next to the torch op that does the same job. Each kernel is checked against an fp32
reference before it is timed.

Timing: the calls are captured in a CUDA graph, R of them over R different copies of the inputs
(weights, caches, activations), and `triton.testing.do_bench` takes the median time of a replay;
a call's time is that over R. Rotating copies keep the L2 cache from serving re-reads, the graph
removes Python launch overhead (dsc replays decode steps as graphs, so this is how the kernels run),
and R is chosen so that a replay moves about 1 GB: do_bench zeroes a 256 MB buffer before every
replay, which leaves L2 full of dirty lines whose write-back the first call pays for, and a large
replay dilutes that. A second, event-timed median of back-to-back replays without that flush is
kept in the JSON (`ms_no_flush`).

`--sweep` also times a grid of launch configurations per kernel (the data behind the launchers'
heuristic tables) and writes them as `"kind": "sweep"` lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from dsc.kernels.decode_attention import DecodeConfig, decode_attention, pick_decode_config
from dsc.kernels.flash_attention import FlashConfig, flash_attention
from dsc.kernels.flash_attention_tma import TmaFlashConfig, flash_attention_tma
from dsc.kernels.gemm import GemmConfig, gated_linear, linear_fused
from dsc.kernels.norms import layer_norm, rms_norm
from dsc.kernels.qkv_attention import qkv_attention
from dsc.kernels.reference import (
    attention_reference,
    gated_linear_reference,
    layer_norm_reference,
    linear_reference,
    rms_norm_reference,
)
from dsc.kernels.small_batch_gemm import SmallBatchConfig, linear_small_batch, pick_config

DTYPE = torch.bfloat16
REPLAY_BYTES = 1 << 30  # data one graph replay should move

# Llama-7B projections as (N, K) of an nn.Linear weight [N, K].
LLAMA7B_PROJECTIONS = {
    "q/k/v/o 4096x4096": (4096, 4096),
    "qkv fused 12288x4096": (12288, 4096),
    "up/gate 11008x4096": (11008, 4096),
    "gate+up fused 22016x4096": (22016, 4096),
    "down 4096x11008": (4096, 11008),
}


@dataclass
class Result:
    """One line of the table (and of the JSONL file)."""

    kernel: str
    shape: str
    ms: float
    rate: float  # GB/s or TFLOP/s, see unit
    unit: str
    pct_ceiling: float
    torch_ms: float | None
    target: str
    met: bool | None
    rel_err: float
    ms_no_flush: float | None = None
    torch_ms_no_flush: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return None if self.torch_ms is None else self.torch_ms / self.ms


# ----------------------------------------------------------------------------------- timing


def _capture(calls: list[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    for call in calls:  # compile / pick cuBLAS algorithms outside the capture
        call()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    torch.cuda.synchronize()
    return graph


def _events_median(fn: Callable[[], object], reps: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_calls(calls: list[Callable[[], object]], rep_ms: int = 60) -> tuple[float, float]:
    """Median ms per call of a graph replaying `calls` (do_bench; and without L2 flush)."""
    graph = _capture(calls)
    ms = do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median")
    ms_no_flush = _events_median(graph.replay)
    del graph
    return ms / len(calls), ms_no_flush / len(calls)


def copies_for(bytes_per_call: int, lo: int = 4, hi: int = 48) -> int:
    return max(lo, min(hi, math.ceil(REPLAY_BYTES / max(1, bytes_per_call))))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = ref.norm().item()
    return (out.double() - ref).norm().item() / (scale if scale > 0 else 1.0)


# --------------------------------------------------------------------------------- ceilings


def measure_copy_bandwidth() -> float:
    n = 1 << 30  # bytes per buffer
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(partial(dst.copy_, src), warmup=20, rep=200, return_mode="median")
    return 2 * n / ms / 1e6  # GB/s


def measure_gemm_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    ms = do_bench(partial(torch.matmul, a, b), warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / ms / 1e9  # TFLOP/s


# ---------------------------------------------------------------------------------- kernels


def _rms_mine(x, res, w):
    return rms_norm(x, w, 1e-6, res)


def _rms_torch(x, res, w):
    return F.rms_norm(x if res is None else x + res, (x.shape[-1],), w, 1e-6)


def _ln_mine(x, res, w, b):
    return layer_norm(x, w, b, 1e-5, res)


def _ln_torch(x, res, w, b):
    return F.layer_norm(x if res is None else x + res, (x.shape[-1],), w, b, 1e-5)


def _sdpa_decode(q, k, v, scale, gqa):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)


def _sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _torch_linear_silu_res(x, w, bias, res):
    return F.silu(F.linear(x, w, bias)) + res


def _torch_gated(x, w):
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    return F.silu(gate) * up


def bench_small_batch_gemm(copy_bw: float, sm: int, sizes: list[int]) -> list[Result]:
    results = []
    for name, (n, k) in LLAMA7B_PROJECTIONS.items():
        w_bytes = n * k * 2
        ws = [torch.randn(n, k, device="cuda", dtype=DTYPE) for _ in range(copies_for(w_bytes))]
        for m in sizes:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            err = rel_err(linear_small_batch(x, ws[0]), linear_reference(x, ws[0]))
            mine, mine_nf = time_calls([partial(linear_small_batch, x, w) for w in ws])
            ref, ref_nf = time_calls([partial(F.linear, x, w) for w in ws])
            gbps = (w_bytes + 2 * m * (k + n)) / mine / 1e6
            pct = 100 * gbps / copy_bw
            results.append(
                Result(
                    kernel="linear_small_batch",
                    shape=f"M={m} {name}",
                    ms=mine,
                    rate=gbps,
                    unit="GB/s",
                    pct_ceiling=pct,
                    torch_ms=ref,
                    target=">=85% copy BW, >= F.linear",
                    met=err <= 1e-2 and pct >= 85 and mine <= ref * 1.02,
                    rel_err=err,
                    ms_no_flush=mine_nf,
                    torch_ms_no_flush=ref_nf,
                    extra=asdict(pick_config(m, n, k, sm)),
                )
            )
        del ws
    return results


def bench_norms(copy_bw: float) -> list[Result]:
    results = []
    hidden = 4096
    w = torch.randn(hidden, device="cuda", dtype=DTYPE)
    b = torch.randn(hidden, device="cuda", dtype=DTYPE)
    cases = (
        ("rms_norm", False, partial(_rms_mine, w=w), partial(_rms_torch, w=w)),
        ("rms_norm +residual", True, partial(_rms_mine, w=w), partial(_rms_torch, w=w)),
        ("layer_norm +residual", True, partial(_ln_mine, w=w, b=b), partial(_ln_torch, w=w, b=b)),
    )
    for rows in (16, 128, 2048):
        for label, with_res, mine, theirs in cases:
            nbytes = rows * hidden * 2
            r = copies_for(nbytes * 4, hi=16)
            xs = [torch.randn(rows, hidden, device="cuda", dtype=DTYPE) for _ in range(r)]
            rs = [torch.randn_like(x) if with_res else None for x in xs]
            got = mine(xs[0], rs[0])
            if label.startswith("rms"):
                want = rms_norm_reference(xs[0], w, 1e-6, rs[0])
            else:
                want = layer_norm_reference(xs[0], w, b, 1e-5, rs[0])
            if with_res:
                err = max(rel_err(got[0], want[0]), rel_err(got[1], want[1]))
            else:
                err = rel_err(got, want)
            t_mine, t_mine_nf = time_calls([partial(mine, x, res) for x, res in zip(xs, rs)])
            t_ref, t_ref_nf = time_calls([partial(theirs, x, res) for x, res in zip(xs, rs)])
            gbps = (nbytes * (4 if with_res else 2) + hidden * 2) / t_mine / 1e6
            pct = 100 * gbps / copy_bw
            results.append(
                Result(
                    kernel=label,
                    shape=f"{rows}x{hidden}",
                    ms=t_mine,
                    rate=gbps,
                    unit="GB/s",
                    pct_ceiling=pct,
                    torch_ms=t_ref,
                    target=">=85% copy BW",
                    met=err <= 1e-2 and pct >= 85,
                    rel_err=err,
                    ms_no_flush=t_mine_nf,
                    torch_ms_no_flush=t_ref_nf,
                )
            )
            del xs, rs
    return results


def _cache(b, hq, hkv, t, d, live, dtype=DTYPE):
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype)
    valid = torch.ones(b, t, device="cuda", dtype=torch.bool)
    start = torch.tensor([live - 1], device="cuda", dtype=torch.int64)
    return q, k, v, valid, start


# (batch, query heads, kv heads, cache slots T, head dim, live keys): long caches, and the
# e2e models' decode caches (prompt 128 + 64 new tokens in 200 slots; 160 keys mid-generation).
DECODE_CASES = {
    "B=16 H=32 D=128 T=2048": (16, 32, 32, 2048, 128, 2048),
    "B=1 H=32 D=128 T=8192": (1, 32, 32, 8192, 128, 8192),
    "B=1 Hq=32 Hkv=8 D=128 T=8192": (1, 32, 8, 8192, 128, 8192),
    "B=16 H=32 D=128 T=200 live=160 (7B b16)": (16, 32, 32, 200, 128, 160),
    "B=16 H=32 D=128 T=2048 live=160": (16, 32, 32, 2048, 128, 160),
    "B=1 Hq=32 Hkv=4 D=64 T=200 live=160 (1.1B)": (1, 32, 4, 200, 64, 160),
    "B=1 H=25 D=64 T=200 live=160 (GPT-2 XL)": (1, 25, 25, 200, 64, 160),
}


def bench_decode(
    copy_bw: float,
    sm: int,
    configs_for: Callable[[int], dict[str, DecodeConfig | None]],
    cases: str = "",
    v_with_k: bool = False,
) -> list[Result]:
    """Every case of DECODE_CASES whose name contains `cases`; v_with_k: also the picked
    configuration with V loaded beside K (DSC_DECODE_V_WITH_K=1's)."""
    results = []
    for name, (b, hq, hkv, t, d, live) in DECODE_CASES.items():
        if cases not in name:
            continue
        cache_bytes = 2 * b * hkv * live * d * 2  # the live keys and values are read
        sets = [_cache(b, hq, hkv, t, d, live=live)
                for _ in range(copies_for(cache_bytes, 2, 8))]
        scale = 1 / math.sqrt(d)
        want = attention_reference(*sets[0], True, scale)
        t_ref, t_ref_nf = time_calls(
            [partial(_sdpa_decode, s[0], s[1], s[2], scale, hq != hkv) for s in sets]
        )
        configs = configs_for(b * hkv)
        if v_with_k:
            picked = pick_decode_config(b, hkv, t, sm)
            configs = {**configs, "v with k": dataclasses.replace(picked, v_with_k=True)}
        for label, cfg in configs.items():
            err = rel_err(decode_attention(*sets[0], True, scale, config=cfg), want)
            t_mine, t_mine_nf = time_calls(
                [partial(decode_attention, *s, True, scale, config=cfg) for s in sets]
            )
            gbps = (cache_bytes + 4 * sets[0][0].numel()) / t_mine / 1e6
            pct = 100 * gbps / copy_bw
            results.append(
                Result(
                    kernel="decode_attention" + ("" if cfg is None else f" [{label}]"),
                    shape=name,
                    ms=t_mine,
                    rate=gbps,
                    unit="GB/s",
                    pct_ceiling=pct,
                    torch_ms=t_ref,
                    target=">=75% copy BW",
                    met=err <= 1e-2 and pct >= 75,
                    rel_err=err,
                    ms_no_flush=t_mine_nf,
                    torch_ms_no_flush=t_ref_nf,
                    extra=asdict(cfg or pick_decode_config(b, hkv, t, sm)),
                )
            )
        del sets
    return results


# Sliding-window decode: (batch, query heads, kv heads, cache slots T, head dim, live, window),
# Mistral-7B's heads and window on a cache past it, and Gemma-3-like short windows.
# Absorbed latent attention (DeepSeek-V2-Lite: 16 heads over one latent of 512 + 64 lanes):
# (batch, query heads, cache slots T, live keys).
DECODE_LATENT_CASES = {
    "B=1 Hq=16 latent 576/512 T=4096": (1, 16, 4096, 4096),
    "B=16 Hq=16 latent 576/512 T=2048": (16, 16, 2048, 2048),
}


def bench_decode_latent(copy_bw: float) -> list[Result]:
    """The decode kernel over a latent cache: keys 576 wide scored by chunks, values the keys'
    first 512 lanes (one tensor, as the runtime lays it out). The floor reads the latent once;
    SDPA gets the same tensors with the one kv head expanded."""
    results = []
    for name, (b, hq, t, live) in DECODE_LATENT_CASES.items():
        cache_bytes = b * live * 576 * 2
        sets = []
        for _ in range(copies_for(cache_bytes, 2, 8)):
            q, k, _, valid, start = _cache(b, hq, 1, t, 576, live)
            sets.append((q, k, k[..., :512], valid, start))
        scale = 1 / math.sqrt(192)
        want = attention_reference(*sets[0], True, scale)
        err = rel_err(decode_attention(*sets[0], True, scale), want)
        t_ref, t_ref_nf = time_calls(
            [partial(_sdpa_decode, s[0], s[1][:, :, :live], s[2][:, :, :live], scale, True)
             for s in sets])
        t_mine, t_mine_nf = time_calls(
            [partial(decode_attention, *s, True, scale) for s in sets])
        gbps = cache_bytes / t_mine / 1e6
        results.append(Result(
            kernel="decode_attention [latent]", shape=name, ms=t_mine, rate=gbps, unit="GB/s",
            pct_ceiling=100 * gbps / copy_bw, torch_ms=t_ref, target=">=75% copy BW",
            met=err <= 1e-2 and gbps >= 0.75 * copy_bw, rel_err=err, ms_no_flush=t_mine_nf,
            torch_ms_no_flush=t_ref_nf))
        del sets
    return results


DECODE_WINDOW_CASES = {
    "B=1 Hq=32 Hkv=8 D=128 T=16384 live=16000 W=4096 (Mistral)": (1, 32, 8, 16384, 128, 16000,
                                                                  4096),
    "B=16 Hq=32 Hkv=8 D=128 T=8192 live=8000 W=4096": (16, 32, 8, 8192, 128, 8000, 4096),
    "B=1 Hq=16 Hkv=8 D=256 T=8192 live=8000 W=1024": (1, 16, 8, 8192, 256, 8000, 1024),
}


def _ring(cache_set, window: int, live: int):
    """The same inputs with K and V in a ring of `window` slots: the last `window` positions,
    position p in slot p % window."""
    q, k, v, valid, start = cache_set
    positions = torch.arange(live - window, live, device=k.device)
    ring_k = k.new_empty(*k.shape[:2], window, k.shape[3])
    ring_v = v.new_empty(*v.shape[:2], window, v.shape[3])
    ring_k[:, :, positions % window] = k[:, :, positions]
    ring_v[:, :, positions % window] = v[:, :, positions]
    return q, ring_k, ring_v, valid, start


def bench_decode_window(copy_bw: float) -> list[Result]:
    """The decode kernel within a sliding window, against SDPA over a slice of the window's keys
    (torch's way) and the same cache attended in full (extra.full_cache_ms): the window's
    programs read only its slots, so the time should follow window / live. Rates are of the
    bytes the window needs. extra.ring_ms: the same step over a ring cache of `window` slots
    (position p in slot p % window), as a windowed layer's cache is laid out now."""
    results = []
    for name, (b, hq, hkv, t, d, live, window) in DECODE_WINDOW_CASES.items():
        window_bytes = 2 * b * hkv * window * d * 2
        sets = [_cache(b, hq, hkv, t, d, live=live)
                for _ in range(copies_for(2 * b * hkv * live * d * 2, 2, 8))]
        scale = 1 / math.sqrt(d)
        want = attention_reference(*sets[0], True, scale, window=window)
        t_full, _ = time_calls([partial(decode_attention, *s, True, scale) for s in sets])
        lo = live - window  # torch's way: SDPA over a slice of the window's keys
        t_ref, t_ref_nf = time_calls([
            partial(_sdpa_decode, s[0], s[1][:, :, lo:live], s[2][:, :, lo:live], scale, hq != hkv)
            for s in sets])
        err = rel_err(decode_attention(*sets[0], True, scale, window=window), want)
        t_win, t_win_nf = time_calls(
            [partial(decode_attention, *s, True, scale, window=window) for s in sets])
        rings = [_ring(s, window, live) for s in sets]
        ring_err = rel_err(decode_attention(*rings[0], True, scale, window=window), want)
        t_ring, _ = time_calls(
            [partial(decode_attention, *r, True, scale, window=window) for r in rings])
        gbps = window_bytes / t_win / 1e6
        results.append(Result(
            kernel="decode_attention [window]", shape=name, ms=t_win, rate=gbps, unit="GB/s",
            pct_ceiling=100 * gbps / copy_bw, torch_ms=t_ref, target=">=75% copy BW",
            met=err <= 1e-2 and 100 * gbps / copy_bw >= 75, rel_err=err, ms_no_flush=t_win_nf,
            torch_ms_no_flush=t_ref_nf,
            extra={"full_cache_ms": t_full, "window": window, "live": live, "ring_ms": t_ring,
                   "ring_rel_err": ring_err},
        ))
        del rings
        del sets
    return results


# The small models' QKV projection + attention at one row: (heads, kv heads, D, K, norm, bias,
# rotary, dtype); caches of 200 slots holding 160 tokens, as in bench/e2e.py mid-generation.
QKV_ATTENTION_CASES = {
    "Llama-1.1B 32:4x64 K=2048 rms rotary": (32, 4, 64, 2048, "rms", False, True, torch.bfloat16),
    "GPT-2 XL 25x64 K=1600 layer bias": (25, 25, 64, 1600, "layer", True, False, torch.float16),
    "OPT-1.3B 32x64 K=2048 layer bias": (32, 32, 64, 2048, "layer", True, False, torch.float16),
}
QKV_ATTENTION_CONFIGS = {"16x256 s4": (16, 256, 4), "8x256 s4": (8, 256, 4),
                         "16x128 s4": (16, 128, 4), "32x256 s3": (32, 256, 3)}


def qkv_attention_pair(dims, x, w, bias, norm, kc, vc, valid, start, rotary):
    """What the decode step runs now: the one-row GEMV with its norm, then the split decode
    attention, which rotates q and the new key and writes the new key and value."""
    hq, hkv, d = dims
    qkv = linear_small_batch(x, w, bias, norm=norm).view(1, 1, hq + 2 * hkv, d)
    q = qkv[:, :, :hq].transpose(1, 2)
    new_k = qkv[:, :, hq:hq + hkv].transpose(1, 2)
    new_v = qkv[:, :, hq + hkv:].transpose(1, 2)
    rot = None if rotary is None else tuple(r.view(1, 1, 1, d) for r in rotary)
    out = decode_attention(q, kc, vc, valid, start, True, d**-0.5, new_k=new_k, new_v=new_v,
                           rotary=rot)
    return out.transpose(1, 2).reshape(1, hq * d)


def qkv_attention_fused(dims, cfg, x, w, bias, norm, kc, vc, valid, start, rotary):
    hq, hkv, d = dims
    block_n, block_k, stages = cfg
    return qkv_attention(x, w, bias, kc, vc, valid, start, d**-0.5, heads=hq, kv_heads=hkv,
                         norm=norm, rotary=rotary, block_n=block_n, block_k=block_k,
                         num_stages=stages)


def bench_qkv_attention(copy_bw: float) -> list[Result]:
    """The fused kernel against the pair the decode step runs now (the one-row GEMV with its
    norm, then the split decode attention that rotates and writes the new key): both as a layer
    of a CUDA graph, PDL on where the GPU has it. `torch_ms` holds the pair's time, so the
    speedup column is pair / fused; `extra.gemv_alone_ms` the projection's alone."""
    results = []
    t, live = 200, 160
    for name, (hq, hkv, d, k, kind, with_bias, with_rotary, dtype) in QKV_ATTENTION_CASES.items():
        n = (hq + 2 * hkv) * d
        weight_bytes = n * k * dtype.itemsize
        sets = []
        for _ in range(copies_for(weight_bytes, 4, 48)):
            x = torch.randn(1, k, device="cuda", dtype=dtype)
            w = (torch.randn(n, k, device="cuda") / math.sqrt(k)).to(dtype)
            bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
            nw = torch.rand(k, device="cuda", dtype=dtype) + 0.5
            nb = torch.randn(k, device="cuda", dtype=dtype) if kind == "layer" else None
            norm = (kind, nw, nb, 1e-5)
            kc = torch.randn(1, hkv, t, d, device="cuda", dtype=dtype)
            vc = torch.randn(1, hkv, t, d, device="cuda", dtype=dtype)
            valid = torch.ones(1, t, device="cuda", dtype=torch.bool)
            start = torch.tensor([live - 1], device="cuda", dtype=torch.int64)
            angle = torch.rand(d // 2, device="cuda") * 6
            rotary = ((torch.cat([angle.cos()] * 2).to(dtype), torch.cat([angle.sin()] * 2).to(dtype))
                      if with_rotary else None)
            sets.append((x, w, bias, norm, kc, vc, valid, start, rotary))

        dims = (hq, hkv, d)
        want = qkv_attention_pair(dims, *sets[0])
        t_pair, t_pair_nf = time_calls([partial(qkv_attention_pair, dims, *s_) for s_ in sets])
        # The projection alone: what the attention adds on top, either way.
        t_gemv, _ = time_calls([partial(linear_small_batch, s_[0], s_[1], s_[2], norm=s_[3])
                                for s_ in sets])
        for label, cfg in QKV_ATTENTION_CONFIGS.items():
            err = rel_err(qkv_attention_fused(dims, cfg, *sets[0]), want)
            t_mine, t_mine_nf = time_calls(
                [partial(qkv_attention_fused, dims, cfg, *s_) for s_ in sets])
            gbps = weight_bytes / t_mine / 1e6
            results.append(Result(
                kernel=f"qkv_attention [{label}]", shape=name, ms=t_mine, rate=gbps,
                unit="GB/s", pct_ceiling=100 * gbps / copy_bw, torch_ms=t_pair,
                target="faster than the pair", met=err <= 2e-2 and t_mine < t_pair,
                rel_err=err, ms_no_flush=t_mine_nf, torch_ms_no_flush=t_pair_nf,
                extra={"pair_pct_copy_bw": 100 * weight_bytes / t_pair / 1e6 / copy_bw,
                       "gemv_alone_ms": t_gemv}))
        del sets
    return results


def _flash_sets(b: int, h: int, s: int, d: int) -> list[tuple]:
    sets = []
    for _ in range(4):
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=DTYPE) for _ in range(3))
        valid = torch.ones(b, s, device="cuda", dtype=torch.bool)
        start = torch.zeros(1, device="cuda", dtype=torch.int64)
        sets.append((q, k, v, valid, start))
    return sets


def bench_flash(
    gemm_rate: float, configs: dict[str, FlashConfig | TmaFlashConfig | None],
    padded: bool = True,
) -> list[Result]:
    """Causal 2048-token prefill; padded=False times the kernel's no-padding fast path, and a
    TmaFlashConfig the descriptor kernel (always unpadded)."""
    results = []
    b, h, s, d = 1, 32, 2048, 128
    scale = 1 / math.sqrt(d)
    sets = _flash_sets(b, h, s, d)
    want = attention_reference(*sets[0], True, scale)
    flops = 4 * b * h * d * (s * (s + 1) // 2)  # causal: only the attended (i, j) pairs
    t_ref, t_ref_nf = time_calls([partial(_sdpa_causal, *x[:3]) for x in sets])
    for label, cfg in configs.items():
        tma = isinstance(cfg, TmaFlashConfig)
        if tma:
            def run(q, k, v, valid, start, causal, sc, cfg=cfg):
                return flash_attention_tma(q, k, v, start, causal, sc, torch.empty_like(q), cfg)
        else:
            run = partial(flash_attention, config=cfg, padded=padded)
        try:
            err = rel_err(run(*sets[0], True, scale), want)
        except Exception as exc:  # a tile shape over the SM's resources: report, go on
            print(f"  flash [{label}]: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        t_mine, t_mine_nf = time_calls([partial(run, *x, True, scale) for x in sets])
        tflops = flops / t_mine / 1e9
        pct = 100 * tflops / gemm_rate
        name = "flash_attention" + (" tma" if tma else "" if padded else " unpadded")
        results.append(
            Result(
                kernel=name + ("" if cfg is None else f" [{label}]"),
                shape=f"B={b} H={h} S={s} D={d} causal",
                ms=t_mine,
                rate=tflops,
                unit="TFLOP/s",
                pct_ceiling=pct,
                torch_ms=t_ref,
                target=">=60% GEMM rate",
                met=err <= 1e-2 and pct >= 60,
                rel_err=err,
                ms_no_flush=t_mine_nf,
                torch_ms_no_flush=t_ref_nf,
                extra={**asdict(cfg or FlashConfig()), "padded": padded and not tma, "tma": tma},
            )
        )
    return results


def bench_gemm(gemm_rate: float, configs: dict[str, GemmConfig | None]) -> list[Result]:
    results = []
    m, k = 2048, 4096
    x = torch.randn(m, k, device="cuda", dtype=DTYPE)
    for n, gated in ((4096, False), (11008, True)):
        w_rows = 2 * n if gated else n
        ws = [torch.randn(w_rows, k, device="cuda", dtype=DTYPE) / 64 for _ in range(4)]
        bias = torch.randn(n, device="cuda", dtype=DTYPE)
        res = torch.randn(m, n, device="cuda", dtype=DTYPE)
        if gated:
            want = gated_linear_reference(x, ws[0], "silu")
            theirs = [partial(_torch_gated, x, w) for w in ws]
        else:
            want = linear_reference(x, ws[0], bias, "silu", res)
            theirs = [partial(_torch_linear_silu_res, x, w, bias, res) for w in ws]
        t_ref, t_ref_nf = time_calls(theirs)
        for label, cfg in configs.items():
            if gated:
                calls = [partial(gated_linear, x, w, "silu", config=cfg) for w in ws]
            else:
                calls = [partial(linear_fused, x, w, bias, "silu", res, config=cfg) for w in ws]
            try:
                err = rel_err(calls[0](), want)
            except OutOfResources as exc:  # a sweep tile that does not fit this kernel
                print(f"  skipped {label}: {exc}")
                continue
            t_mine, t_mine_nf = time_calls(calls)
            tflops = 2 * m * k * w_rows / t_mine / 1e9
            kernel = "gated_linear silu" if gated else "linear_fused bias+silu+res"
            results.append(
                Result(
                    kernel=kernel + ("" if cfg is None else f" [{label}]"),
                    shape=f"M={m} N={n} K={k}",
                    ms=t_mine,
                    rate=tflops,
                    unit="TFLOP/s",
                    pct_ceiling=100 * tflops / gemm_rate,
                    torch_ms=t_ref,
                    target="(no target)",
                    met=None if err <= 1e-2 else False,
                    rel_err=err,
                    ms_no_flush=t_mine_nf,
                    torch_ms_no_flush=t_ref_nf,
                    extra=asdict(cfg) if cfg else {},
                )
            )
        del ws
    return results


# ------------------------------------------------------------------------------------ sweep


def _small_batch_candidates(n: int, k: int, m: int, sm: int) -> list[SmallBatchConfig]:
    """Multiply-add configurations up to 8 rows, tl.dot ones from 4 rows on."""
    fma = {
        1: ((4, 1024, 4, 4), (8, 512, 4, 4), (8, 512, 4, 6), (8, 1024, 4, 3), (16, 512, 4, 4),
            (16, 512, 8, 4), (4, 512, 4, 6), (8, 256, 4, 8), (16, 256, 4, 6)),
        4: ((4, 256, 4, 4), (8, 256, 4, 4), (4, 512, 4, 4), (8, 128, 4, 6), (4, 256, 8, 4)),
        8: ((4, 128, 4, 4), (4, 256, 4, 4), (8, 128, 4, 4), (2, 256, 4, 4)),
    }  # fmt: skip
    block_m = triton.next_power_of_2(m)
    candidates = [SmallBatchConfig(block_m, *c[:2], 1, *c[2:]) for c in fma.get(block_m, ())]
    if m >= 4:
        for bn, bk, stages in ((16, 128, 6), (16, 256, 4), (32, 128, 4), (64, 128, 4)):
            tiles = triton.cdiv(n, bn)
            for split in sorted({1, max(1, min(triton.cdiv(2 * sm, tiles), k // 512))}):
                candidates.append(SmallBatchConfig(16, bn, bk, split, 4, stages))
    return list(dict.fromkeys(candidates))


def sweep_small_batch_gemm(copy_bw: float, sm: int) -> list[dict]:
    """GB/s of each launch configuration on three projection shapes at M = 1 and 16."""
    lines = []
    for name in ("q/k/v/o 4096x4096", "up/gate 11008x4096", "down 4096x11008"):
        n, k = LLAMA7B_PROJECTIONS[name]
        ws = [torch.randn(n, k, device="cuda", dtype=DTYPE) for _ in range(copies_for(n * k * 2))]
        for m in (1, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            ref = linear_reference(x, ws[0])
            for cfg in _small_batch_candidates(n, k, m, sm):
                line = {"kernel": "sbgemm", "shape": name, "m": m, "cfg": asdict(cfg)}
                try:
                    err = rel_err(linear_small_batch(x, ws[0], config=cfg), ref)
                    calls = [partial(linear_small_batch, x, w, config=cfg) for w in ws]
                    t, t_nf = time_calls(calls, rep_ms=30)
                except (RuntimeError, ValueError, OutOfResources) as exc:  # compiler rejects it
                    lines.append({**line, "error": str(exc)[:200]})
                    continue
                gbps = n * k * 2 / t / 1e6
                pct = 100 * gbps / copy_bw
                lines.append({**line, "ms": t, "ms_no_flush": t_nf, "pct": pct, "err": err})
        del ws
    return lines


def decode_sweep_configs(pairs: int, sm: int) -> dict[str, DecodeConfig | None]:
    """Key-tile sizes, pipelining, and splits that put 1 to 8 programs on each SM."""
    configs: dict[str, DecodeConfig | None] = {}
    splits_options = sorted({1, 2, *(triton.cdiv(c * sm, pairs) for c in (1, 2, 4))})
    for bn in (32, 64, 128):
        for splits in splits_options:
            for warps, stages in ((4, 1), (4, 2), (4, 3), (2, 2), (8, 2)):
                label = f"bn{bn} s{splits} w{warps} st{stages}"
                configs[label] = DecodeConfig(bn, splits, warps, stages)
    return configs


FLASH_TMA = {  # the descriptor kernel (DSC_FLASH_TMA=1), opt-in until one of these wins
    "128x64 w8 s3": TmaFlashConfig(128, 64, 8, 3),
    "128x64 w8 s2": TmaFlashConfig(128, 64, 8, 2),
    "128x128 w8 s2": TmaFlashConfig(128, 128, 8, 2),
    "64x64 w4 s3": TmaFlashConfig(64, 64, 4, 3),
    "64x128 w4 s2": TmaFlashConfig(64, 128, 4, 2),
}

FLASH_SWEEP = {
    "128x64 w8 s3": FlashConfig(128, 64, 8, 3),
    "128x128 w8 s2": FlashConfig(128, 128, 8, 2),
    "64x64 w4 s3": FlashConfig(64, 64, 4, 3),
    "64x128 w4 s3": FlashConfig(64, 128, 4, 3),
    "128x64 w8 s4": FlashConfig(128, 64, 8, 4),
    "64x64 w4 s2": FlashConfig(64, 64, 4, 2),
    "128x64 w8 s2": FlashConfig(128, 64, 8, 2),
    "64x128 w4 s2": FlashConfig(64, 128, 4, 2),
    # ptxas -v for sm_90 (head dim 128, no padding): the default 64x64 w4 spills 0.9 KB a
    # thread; these two spill 8 bytes and none.
    "64x64 w8 s3": FlashConfig(64, 64, 8, 3),
    "128x32 w8 s3": FlashConfig(128, 32, 8, 3),
}

GEMM_SWEEP = {
    "128x128x64 w8 s4": GemmConfig(128, 128, 64, 8, 8, 4),
    "128x256x64 w8 s3": GemmConfig(128, 256, 64, 8, 8, 3),
    "128x128x64 w4 s4": GemmConfig(128, 128, 64, 8, 4, 4),
    "128x64x64 w4 s4": GemmConfig(128, 64, 64, 8, 4, 4),
    "128x128x32 w8 s5": GemmConfig(128, 128, 32, 8, 8, 5),
}


# ------------------------------------------------------------------------------------- main


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[Result], gpu: str, copy_bw: float, gemm_rate: float) -> None:
    print(f"\n{gpu}: copy {copy_bw:.0f} GB/s (read+write), bf16 GEMM {gemm_rate:.0f} TFLOP/s")
    header = (
        f"{'kernel':34} {'shape':32} {'ms':>9} {'rate':>15} {'%ceil':>6} {'torch ms':>9} "
        f"{'speedup':>7} {'rel err':>8}  target"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        met = {True: "MET", False: "missed", None: ""}[r.met]
        print(
            f"{r.kernel[:34]:34} {r.shape[:32]:32} {r.ms:9.4f} {r.rate:9.1f} {r.unit:>5} "
            f"{r.pct_ceiling:6.1f} {_fmt(r.torch_ms, '9.4f'):>9} {_fmt(r.speedup, '7.2f'):>7} "
            f"{r.rel_err:8.1e}  {r.target} {met}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSONL output path")
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    parser.add_argument("--only", default="",
                        help="comma list: sbgemm,norms,qkvattn,decode,decode_window,decode_latent,"
                             "flash,gemm")
    parser.add_argument("--decode-cases", default="",
                        help="only the decode-attention cases whose name contains this text")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2

    props = torch.cuda.get_device_properties(0)
    gpu = props.name
    sm = props.multi_processor_count
    out = args.out or Path(
        f"bench/results/kernels-{gpu.replace(' ', '_')}-{datetime.date.today():%Y-%m-%d}.jsonl"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))

    torch.manual_seed(0)
    copy_bw = measure_copy_bandwidth()
    gemm_rate = measure_gemm_rate()
    print(
        f"{gpu}: {sm} SMs, copy {copy_bw:.0f} GB/s, bf16 GEMM {gemm_rate:.0f} TFLOP/s", flush=True
    )
    meta = {
        "kind": "ceilings",
        "gpu": gpu,
        "sms": sm,
        "copy_gbps": copy_bw,
        "gemm_tflops": gemm_rate,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    with out.open("w") as f:
        f.write(json.dumps(meta) + "\n")

    results: list[Result] = []

    def record(batch: list[Result], kind: str = "result") -> None:
        with out.open("a") as f:
            for r in batch:
                f.write(json.dumps({"kind": kind, **asdict(r), "speedup": r.speedup}) + "\n")
        if kind == "result":
            results.extend(batch)
            print_table(batch, gpu, copy_bw, gemm_rate)
        else:
            # Sweeps: the three fastest configurations of each shape.
            for shape in dict.fromkeys(r.shape for r in batch):
                best = sorted((r for r in batch if r.shape == shape), key=lambda r: r.ms)[:3]
                for r in best:
                    print(f"  sweep {r.kernel:44} {shape:30} {r.ms:8.4f} ms {r.pct_ceiling:5.1f}%")
        sys.stdout.flush()

    def section(name: str, run: Callable[[], object]) -> None:
        if only and name.split(":")[0] not in only:
            return
        began = time.perf_counter()
        run()
        print(f"[{name}: {time.perf_counter() - began:.0f} s]", flush=True)

    def record_sweep(lines: list[dict]) -> None:
        with out.open("a") as f:
            for line in lines:
                f.write(json.dumps({"kind": "sweep", **line}) + "\n")
        _print_sweep_summary(lines)

    section("sbgemm", lambda: record(bench_small_batch_gemm(copy_bw, sm, sizes=[1, 4, 8, 16, 32])))
    section("norms", lambda: record(bench_norms(copy_bw)))
    section("qkvattn", lambda: record(bench_qkv_attention(copy_bw)))
    section("decode", lambda: record(bench_decode(copy_bw, sm, lambda _pairs: {"default": None},
                                                  args.decode_cases, v_with_k=True)))
    section("decode_window", lambda: record(bench_decode_window(copy_bw)))
    section("decode_latent", lambda: record(bench_decode_latent(copy_bw)))
    # As prefill runs it without padding (the runtime promises that once per prefill), and the
    # kernel that must allow for padding.
    section("flash", lambda: record(bench_flash(gemm_rate, {"default": None}, padded=False)))
    section("flash", lambda: record(bench_flash(gemm_rate, {"default": None})))
    section("flash:tma", lambda: record(bench_flash(gemm_rate, FLASH_TMA)))
    section("gemm", lambda: record(bench_gemm(gemm_rate, {"default": None})))
    if args.sweep:
        section("sbgemm:sweep", lambda: record_sweep(sweep_small_batch_gemm(copy_bw, sm)))
        sweep_decode = partial(decode_sweep_configs, sm=sm)
        section("decode:sweep", lambda: record(
            bench_decode(copy_bw, sm, sweep_decode, args.decode_cases), "sweep"))
        section("flash:sweep", lambda: record(bench_flash(gemm_rate, FLASH_SWEEP), "sweep"))
        section("flash:sweep", lambda: record(
            bench_flash(gemm_rate, {"default": None, **FLASH_SWEEP}, padded=False), "sweep"))
        section("gemm:sweep", lambda: record(bench_gemm(gemm_rate, GEMM_SWEEP), "sweep"))

    print_table(results, gpu, copy_bw, gemm_rate)
    print(f"\nwrote {out}")
    return 0


def _print_sweep_summary(lines: list[dict]) -> None:
    """Best configuration per (kernel, shape, m), and the spread, for the heuristic tables."""
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        if "ms" in line:
            groups.setdefault((line["kernel"], line["shape"], line.get("m")), []).append(line)
    print("\nsweep: best and worst configuration per case")
    for key, entries in groups.items():
        entries.sort(key=lambda e: e["ms"])
        best, worst = entries[0], entries[-1]
        cfg = best.get("cfg", best.get("warps"))
        print(
            f"  {key[0]:14} {key[1]:26} m={key[2]!s:4} best {best['pct']:5.1f}% {cfg}  "
            f"worst {worst['pct']:5.1f}%"
        )


if __name__ == "__main__":
    sys.exit(main())
