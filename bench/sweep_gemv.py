"""Launch configurations of the small-batch GEMM at one row on the small models' projections.

The 7B shapes behind `pick_config` keep every SM busy with 8-row blocks; GPT-2 XL (1600 wide) and
Llama-1.1B (2048 wide) give only 200-320 such blocks for 132 SMs. This times block widths and
K splits on those shapes, in one run with the copy bandwidth, and prints the best per shape.

    PYTHONPATH=. python bench/sweep_gemv.py --out bench/results/sweep-gemv.jsonl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from functools import partial

import torch

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


def candidates() -> list[SmallBatchConfig]:
    out = []
    for block_n in (4, 8, 16):
        for block_k in (256, 512):
            for split in (1, 2, 3, 4):
                out.append(SmallBatchConfig(1, block_n, block_k, split, 4, 4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    copy_bw = measure_copy_bandwidth()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    lines = []
    for name, (n, k, gated) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
              for _ in range(copies_for(n * k * 2))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        half = n // 2
        ref = (torch.nn.functional.silu(linear_reference(x, ws[0][:half])) *
               linear_reference(x, ws[0][half:])) if gated else linear_reference(x, ws[0])
        default = pick_config(1, n, k, sm)
        for cfg in dict.fromkeys([default, *candidates()]):
            kw = dict(activation="silu", gated=True) if gated else {}
            err = rel_err(linear_small_batch(x, ws[0], config=cfg, **kw), ref)
            t, _ = time_calls([partial(linear_small_batch, x, w, config=cfg, **kw) for w in ws],
                              rep_ms=20)
            pct = 100 * (n * k * 2 / t / 1e6) / copy_bw  # GB/s over GB/s
            lines.append({"shape": name, "cfg": asdict(cfg), "default": cfg == default,
                          "us": t * 1e3, "pct_copy": pct, "err": err})
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
