"""Launch configurations of the small-batch GEMM on the decode projections.

`--rows 1` (default): one row on the small models' projections.

The 7B shapes behind `pick_config` keep every SM busy with 8-row blocks; GPT-2 XL (1600 wide) and
Llama-1.1B (2048 wide) give only 200-320 such blocks for 132 SMs. This times block widths and
K splits on those shapes, in one run with the copy bandwidth, and prints the best per shape.
`--rows 16`: the 7B's projections at batch 16 (the `tl.dot` path), over block widths, K steps,
K splits and pipeline depths. `--tp`: the 7B's projections as one rank of tp=2 / tp=4 holds
them (narrower or shorter: the per-GPU weight of a tensor-parallel decode step).

    PYTHONPATH=. python bench/sweep_gemv.py --out bench/results/sweep-gemv.jsonl
    PYTHONPATH=. python bench/sweep_gemv.py --only "7b o" --block-n 2,4 --block-k 128,256 \
        --stages 4,8 --splits 1 --focus 0        # one shape, a grid of one-row tiles
    PYTHONPATH=. python bench/sweep_gemv.py --rows 16 --only "7b o,7b qkv"   # batch 16
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from functools import partial

import torch
import triton

from bench.kernels import copies_for, measure_copy_bandwidth, rel_err, time_calls
from dsc.kernels.reference import linear_reference
from dsc.kernels.small_batch_gemm import SmallBatchConfig, linear_small_batch, pick_config

SHAPES = {  # name: (N, K, gated)
    "gpt2-xl qkv 4800x1600": (4800, 1600, False),
    "gpt2-xl out 1600x1600": (1600, 1600, False),
    "gpt2-xl up 6400x1600": (6400, 1600, False),
    "gpt2-xl down 1600x6400": (1600, 6400, False),
    "1.1b qkv 2560x2048": (2560, 2048, False),
    "1.1b o 2048x2048": (2048, 2048, False),
    "1.1b gate/up gated 11264x2048": (11264, 2048, True),
    "1.1b down 2048x5632": (2048, 5632, False),
    "7b gate/up gated 22016x4096": (22016, 4096, True),
}

SHAPES_BATCHED = {  # the 7B's projections, several rows
    "7b qkv 12288x4096": (12288, 4096, False),
    "7b o 4096x4096": (4096, 4096, False),
    "7b gate/up gated 22016x4096": (22016, 4096, True),
    "7b down 4096x11008": (4096, 11008, False),
}


SHAPES_TP = {  # the 7B's projections as one rank of tp=2 / tp=4 holds them (batch 1)
    "7b tp2 qkv 6144x4096": (6144, 4096, False),
    "7b tp2 o 4096x2048": (4096, 2048, False),
    "7b tp2 gate/up gated 11008x4096": (11008, 4096, True),
    "7b tp2 down 4096x5504": (4096, 5504, False),
    "7b tp4 qkv 3072x4096": (3072, 4096, False),
    "7b tp4 o 4096x1024": (4096, 1024, False),
    "7b tp4 gate/up gated 5504x4096": (5504, 4096, True),
    "7b tp4 down 4096x2752": (4096, 2752, False),
}


SHAPES_7B = {  # the 7B's projections at batch 1 (one GPU)
    "7b qkv 12288x4096": (12288, 4096, False),
    "7b o 4096x4096": (4096, 4096, False),
    "7b down 4096x11008": (4096, 11008, False),
}

# A few one-row configurations timed in several rounds (medians), on every one-row shape: to
# choose between close candidates that one round's noise cannot separate.
FOCUS = [SmallBatchConfig(1, block_n, block_k, 1, 4, 4)
         for block_n, block_k in ((8, 512), (8, 256), (16, 256), (4, 256), (16, 512))]


def candidates(rows: int, block_ns=(4, 8, 16), block_ks=(256, 512), stages=(4,),
               splits=(1, 2, 3, 4)) -> list[SmallBatchConfig]:
    out = []
    if rows == 1:
        for block_n in block_ns:
            for block_k in block_ks:
                for split in splits:
                    for depth in stages:
                        out.append(SmallBatchConfig(1, block_n, block_k, split, 4, depth))
        return out
    block_m = max(16, triton.next_power_of_2(rows))
    for block_n in (16, 32, 64):
        for block_k in (64, 128, 256):
            for split in (1, 2, 4):
                for stages in (3, 5):
                    out.append(SmallBatchConfig(block_m, block_n, block_k, split, 4, stages))
    return out


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", type=int, default=1, help="rows of x (1, or a batch like 16)")
    parser.add_argument("--tp", action="store_true",
                        help="the 7B's projections as one rank of tp=2 and tp=4 holds them")
    parser.add_argument("--focus", type=int, default=0, metavar="ROUNDS",
                        help="time only FOCUS's configurations, in ROUNDS rounds, on every "
                        "one-row shape")
    parser.add_argument("--only", default="",
                        help="shapes whose name holds this text (or one of a comma list)")
    parser.add_argument("--block-n", default="4,8,16", help="one-row block widths")
    parser.add_argument("--block-k", default="256,512", help="one-row K steps")
    parser.add_argument("--stages", default="4", help="one-row pipeline depths")
    parser.add_argument("--splits", default="1,2,3,4", help="one-row K splits")
    args = parser.parse_args()
    shapes = SHAPES_TP if args.tp else SHAPES if args.rows == 1 else SHAPES_BATCHED
    if args.focus or args.only:
        shapes = {**SHAPES, **(SHAPES_7B if args.rows == 1 else SHAPES_BATCHED), **SHAPES_TP}
    if args.only:
        wanted = args.only.split(",")
        shapes = {name: shape for name, shape in shapes.items()
                  if any(part in name for part in wanted)}
    grid = dict(block_ns=_ints(args.block_n), block_ks=_ints(args.block_k),
                stages=_ints(args.stages), splits=_ints(args.splits))
    copy_bw = measure_copy_bandwidth()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    lines = []
    for name, (n, k, gated) in shapes.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
              for _ in range(copies_for(n * k * 2))]
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
        half = n // 2
        ref = (torch.nn.functional.silu(linear_reference(x, ws[0][:half])) *
               linear_reference(x, ws[0][half:])) if gated else linear_reference(x, ws[0])
        default = pick_config(args.rows, n, k, sm, gated=gated)
        configs = list(dict.fromkeys([default, *(FOCUS if args.focus else
                                                 candidates(args.rows, **grid))]))
        for cfg in configs * max(1, args.focus):
            kw = dict(activation="silu", gated=True) if gated else {}
            try:
                err = rel_err(linear_small_batch(x, ws[0], config=cfg, **kw), ref)
            except Exception as e:  # a configuration over the SM's resources: skip it
                print(f"  {cfg}: {type(e).__name__}", flush=True)
                continue
            t, _ = time_calls([partial(linear_small_batch, x, w, config=cfg, **kw) for w in ws],
                              rep_ms=20)
            pct = 100 * ((n * k + args.rows * k) * 2 / t / 1e6) / copy_bw  # GB/s over GB/s
            lines.append({"shape": name, "rows": args.rows, "cfg": asdict(cfg), "default": cfg == default,
                          "us": t * 1e3, "pct_copy": pct, "err": err})
        if args.focus:  # one line per configuration: the median of its rounds
            mine = [ln for ln in lines if ln["shape"] == name]
            lines = [ln for ln in lines if ln["shape"] != name]
            for cfg in configs:
                runs = sorted((ln for ln in mine if ln["cfg"] == asdict(cfg)),
                              key=lambda ln: ln["pct_copy"])
                if runs:
                    lines.append({**runs[len(runs) // 2],
                                  "rounds": [round(ln["pct_copy"], 1) for ln in runs]})
        best = max((ln for ln in lines if ln["shape"] == name), key=lambda ln: ln["pct_copy"])
        dflt = next(ln for ln in lines if ln["shape"] == name and ln["default"])
        print(f"{name:32} default {dflt['pct_copy']:5.1f}% {dflt['us']:7.2f} us   best "
              f"{best['pct_copy']:5.1f}% {best['us']:7.2f} us {best['cfg']}", flush=True)
        del ws
    if args.out:
        with open(args.out, "w") as f:
            for ln in lines:
                f.write(json.dumps({"gpu": torch.cuda.get_device_name(), **ln}) + "\n")


if __name__ == "__main__":
    main()
