"""Tensor-parallel decode benchmark: one process per GPU under torchrun.

Random weights at real shapes, bf16; prompt 128 tokens, 64 new tokens, greedy; decode time per
token = (time for N new tokens - time for 1) / (N - 1), median of 3 (as bench/e2e.py). The floor
is this GPU's share of the weight bytes over the copy bandwidth measured in this run. Also times
the all-reduce of one decode activation ([batch, hidden] bf16) alone, replayed in a CUDA graph,
with the transport dsc picks for it, and all-reduce + residual add + RMSNorm as one op (checked
against the three ops), and each row-parallel projection shard with its all-reduce, the GEMM
pushing its tiles against the GEMM then the all-reduce. DSC_FUSED_ALLREDUCE=1 puts the fused
norm op into the compiled plan; DSC_GEMV_PUSH=1 the pushing GEMM. Rank 0 prints a
table and writes JSON lines.

    python bench/tp.py --model llama-7b                       # tp=1 baseline, same script
    torchrun --nproc-per-node 4 bench/tp.py --model llama-7b --batches 1,16
    torchrun --nproc-per-node 4 bench/tp.py --model llama-70b --layers 8

Compare tp=N with tp=1 only from runs on the same machine (same kind of card).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsc  # noqa: E402
from dsc import zoo  # noqa: E402
from bench.e2e import copy_bandwidth, held_environment, stream_per_token  # noqa: E402
from dsc.kernels import pdl  # noqa: E402
from dsc.ops.norms import rms_norm  # noqa: E402
from dsc.runtime import allreduce, distributed  # noqa: E402

PROMPT, NEW = 128, 64


def timed(fn) -> float:
    torch.cuda.synchronize()
    if distributed.is_parallel():
        dist.barrier()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def per_token(generate, reps: int = 3) -> float:
    """(t(NEW tokens) - t(1 token)) / (NEW - 1), median over reps, in seconds."""
    generate(2)  # warm: captures the decode graph for this batch
    full = statistics.median(timed(lambda: generate(NEW)) for _ in range(reps))
    one = statistics.median(timed(lambda: generate(1)) for _ in range(reps))
    return (full - one) / (NEW - 1)


def _graph_us(fn, calls: int = 64) -> float:
    """Per-call microseconds of fn replayed `calls` times in one CUDA graph (after eager calls,
    which set up the symmetric buffers)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    return statistics.median(timed(graph.replay) for _ in range(5)) / calls * 1e6


def all_reduce_us(batch: int, hidden: int) -> dict[str, float]:
    """Per-call time of dsc's all-reduce of a [batch, hidden] bf16 activation, in a CUDA graph,
    through each transport it can pick for it."""
    x = torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda")
    if not distributed.is_parallel():
        return {}
    times = {}
    for push in ("0", "1"):
        with held_environment({"DSC_PUSH_ALLREDUCE": push}):
            kind = allreduce.transport(x)
            if kind not in times:
                times[kind] = _graph_us(lambda: allreduce.all_reduce(x))
    return times


def row_gemm_all_reduce_us(batch: int, hidden: int, inner: int) -> dict[str, dict[str, float]]:
    """Per-call time, in a CUDA graph, of a row-parallel projection shard [hidden, inner / tp]
    with its all-reduce: the GEMM sending its tiles to the peers (`linear_all_reduce`), and the
    GEMM then the all-reduce; for the attention output (inner = hidden) and the MLP's down
    projection (inner = the intermediate size)."""
    tp = distributed.world_size()
    if tp == 1:
        return {}
    from dsc.runtime.cuda_impls import linear_small_batch

    gen = torch.Generator(device="cuda").manual_seed(2 + distributed.rank())
    times = {}
    for label, k in (("o", hidden // tp), ("down", inner // tp)):
        x = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda", generator=gen)
        w = torch.randn(hidden, k, dtype=torch.bfloat16, device="cuda", generator=gen) / k**0.5
        with held_environment({"DSC_GEMV_PUSH": "1"}):
            pushing = _graph_us(lambda: allreduce.linear_all_reduce(x, w))
        times[label] = {
            "gemm_push": pushing,
            "gemm_then_all_reduce": _graph_us(
                lambda: allreduce.all_reduce(linear_small_batch(x, w))),
        }
    return times


def fused_all_reduce_us(batch: int, hidden: int) -> tuple[float, float]:
    """Per-call time of all_reduce + residual add + RMSNorm as one op (the fused kernel where it
    applies), and its largest difference from the three ops run one after another."""
    if not distributed.is_parallel():
        return 0.0, 0.0
    gen = torch.Generator(device="cuda").manual_seed(1 + distributed.rank())
    x, res = (torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda", generator=gen)
              for _ in range(2))
    w = torch.rand(hidden, dtype=torch.bfloat16, device="cuda", generator=gen) + 0.5
    h, n = allreduce.all_reduce_residual_norm(x, res, w, 1e-5, torch.bfloat16)
    want_h = res + allreduce.all_reduce(x)
    want_n = rms_norm(want_h, w, 1e-5, torch.bfloat16)
    diff = max(float((h - want_h).abs().max()), float((n - want_n).abs().max()))
    us = _graph_us(lambda: allreduce.all_reduce_residual_norm(x, res, w, 1e-5, torch.bfloat16))
    return us, diff


def bench(name: str, layers: int | None, batches: list[int], bandwidth: float,
          ab_envs: list[dict[str, str]] = ()) -> list[dict]:
    tp = distributed.world_size()
    overrides = {"num_hidden_layers": layers} if layers else {}
    model = zoo.build(name, dtype=torch.bfloat16, device="cuda", **overrides)
    hidden = model.config.hidden_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    target = dsc.Target(
        device="cuda", dtype="bfloat16", tp=tp, max_batch=max(batches), max_seq_len=PROMPT + NEW + 8
    )
    t0 = time.perf_counter()
    compiled = dsc.compile(model, target)
    compile_s = time.perf_counter() - t0
    variants = []
    for ab_env in ab_envs:
        # The same model compiled with the variant's settings held (read at compile, capture
        # and launch time); every rank compiles and runs it at the same point.
        with held_environment(ab_env):
            variants.append(dsc.compile(model, target))
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)  # the same prompt on every rank
    rows = []
    with torch.no_grad():
        ref = model(torch.arange(32, device="cuda")[None] % vocab).logits[:, -1].float()
        mine = compiled(torch.arange(32, device="cuda")[None] % vocab).logits[:, -1].float()
        rel_err = float((mine - ref).norm() / ref.norm())
        for batch in batches:
            ids = torch.randint(0, vocab, (batch, PROMPT), device="cuda", generator=gen)

            def run(n, ids=ids):
                compiled.generate(ids, max_new_tokens=n, eos_token_id=[])

            ms = per_token(run) * 1e3
            stream_ms = stream_per_token(compiled, ids)
            variant_ms = []
            if variants:
                # Alternating with the default, so drift of card or host hits all alike.
                base, others = [stream_ms], [[] for _ in variants]
                for _ in range(2):
                    for ab_env, variant, times in zip(ab_envs, variants, others):
                        with held_environment(ab_env):
                            times.append(stream_per_token(variant, ids))
                    base.append(stream_per_token(compiled, ids))
                stream_ms = statistics.median(base)
                variant_ms = [statistics.median(times) for times in others]
            tokens = compiled.generate(ids[:1], max_new_tokens=16, eos_token_id=[])[0, PROMPT:]
            same = distributed.gather_to_first(tokens.tolist())
            transports = all_reduce_us(batch, hidden)
            row_gemms = row_gemm_all_reduce_us(batch, hidden, model.config.intermediate_size)
            fused_us, fused_diff = fused_all_reduce_us(batch, hidden)
            floor_ms = weight_bytes / tp / bandwidth * 1e3
            rows.append(
                {
                    "model": name,
                    "layers": layers or model.config.num_hidden_layers,
                    "tp": tp,
                    "batch": batch,
                    "dtype": "bfloat16",
                    "gpu": torch.cuda.get_device_name(),
                    "weight_gb": weight_bytes / 1e9,
                    "copy_gbps": bandwidth / 1e9,
                    "floor_ms_per_gpu": floor_ms,
                    "dsc_ms": ms,
                    "dsc_over_floor": ms / floor_ms,
                    "dsc_stream_ms": stream_ms,
                    "ab_envs": list(ab_envs),
                    "ab_stream_ms": variant_ms,
                    "pdl": pdl.enabled(torch.device("cuda")),
                    "all_reduce_us": transports,
                    "all_reduce_bytes": batch * hidden * 2,
                    "row_gemm_all_reduce_us": row_gemms,
                    "fused_all_reduce_norm_us": fused_us,
                    "fused_all_reduce_norm_max_diff": fused_diff,
                    "fused_all_reduce_in_plan": os.environ.get("DSC_FUSED_ALLREDUCE", "0") == "1",
                    "first_logits_rel_err": rel_err,
                    "ranks_agree_16_tokens": None
                    if same is None
                    else all(t == same[0] for t in same),
                    "compile_s": compile_s,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--layers", type=int, default=None, help="cut the model to K layers")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--out", default=None)
    parser.add_argument("--ab-env", action="append", default=[],
                        metavar="NAME=VALUE[,NAME=VALUE]",
                        help="also time a plan compiled with these settings held, in stream "
                        "alternating with the default (e.g. DSC_FUSED_ALLREDUCE=1); repeatable")
    args = parser.parse_args()
    ab_envs = [dict(item.split("=", 1) for item in spec.split(",")) for spec in args.ab_env]
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; 1 when run alone
    # Join first: it picks this process's GPU, so the model below lands on it.
    distributed.init("cuda", world)
    bandwidth = copy_bandwidth()
    rows = bench(args.model, args.layers, [int(b) for b in args.batches.split(",")], bandwidth,
                 ab_envs)
    if distributed.rank() != 0:
        return
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out or f"bench/results/tp-{gpu}-{time.strftime('%Y-%m-%d')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{rows[0]['gpu']} x{rows[0]['tp']}: copy {bandwidth / 1e9:.0f} GB/s; -> {out}")
    header = (
        f"{'model':<10} {'layers':>6} {'tp':>3} {'batch':>5} {'floor/GPU ms':>12} "
        f"{'dsc ms':>8} {'x floor':>8} {'stream ms':>9} {'AR us by transport':>26} "
        f"{'AR+norm us':>10} {'rel err':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['model']:<10} {r['layers']:>6} {r['tp']:>3} {r['batch']:>5} "
            f"{r['floor_ms_per_gpu']:>12.3f} {r['dsc_ms']:>8.3f} {r['dsc_over_floor']:>8.2f} "
            f"{r['dsc_stream_ms']:>9.3f} "
            f"{' '.join(f'{k} {v:.1f}' for k, v in r['all_reduce_us'].items()) or '-':>26} "
            f"{r['fused_all_reduce_norm_us']:>10.1f} {r['first_logits_rel_err']:>8.1e}"
        )
        for label, times in r["row_gemm_all_reduce_us"].items():
            print(f"{'':<10} {'':>6} {r['tp']:>3} {r['batch']:>5} {label} shard + all-reduce: "
                  + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))
        for ab_env, ms in zip(r["ab_envs"], r["ab_stream_ms"]):
            print(f"{'':<10} {'':>6} {r['tp']:>3} {r['batch']:>5} with {ab_env}: stream "
                  f"{ms:.3f} ms against {r['dsc_stream_ms']:.3f}")


if __name__ == "__main__":
    main()
