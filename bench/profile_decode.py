"""Where a decode step's time goes, kernel by kernel, and how far bf16 logits are from fp32.

For each model: compile with dsc, generate once to capture the decode CUDA graph, then trace
`--steps` decode steps with the torch profiler. Prints, per kernel name, launches per token and
microseconds per token, plus the GPU-busy time per token against the wall time per token (the
difference is the GPU waiting on the host). Then the accuracy check: the first-step logits of
dsc (bf16) and of HF (bf16) each against HF on an fp32 copy of the same weights. Runs with
DSC_PDL=0 unless --keep-pdl: kernels placed early would count their waiting as their own time.

    python bench/profile_decode.py --models llama-1.1b:1,llama-7b:1 --out bench/results/x.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsc  # noqa: E402
from bench.e2e import per_token  # noqa: E402
from dsc import zoo  # noqa: E402

DTYPES = {"llama-7b": torch.bfloat16, "llama-1.1b": torch.bfloat16, "gpt2-xl": torch.float16,
          "opt-1.3b": torch.float16, "llama-70b": torch.bfloat16}
PROMPT = 128


def kernel_table(prof, tokens: int) -> tuple[list[dict], float]:
    """Per kernel name: launches and microseconds per token; and total GPU-busy us per token."""
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name].append(event.device_time)  # microseconds
    rows = [
        {"kernel": name[:90], "launches_per_token": len(times) / tokens,
         "us_per_token": sum(times) / tokens, "us_median": sorted(times)[len(times) // 2]}
        for name, times in by_name.items()
    ]
    rows.sort(key=lambda r: -r["us_per_token"])
    return rows, sum(r["us_per_token"] for r in rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def profile_model(name: str, batch: int, steps: int, accuracy: bool) -> dict:
    dtype = DTYPES[name]
    model = zoo.build(name, dtype=dtype, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda", generator=gen)
    target = dsc.Target(device="cuda", dtype=str(dtype).removeprefix("torch."),
                        max_batch=batch, max_seq_len=PROMPT + max(steps, 64) + 16)
    compiled = dsc.compile(model, target)
    row: dict = {"model": name, "batch": batch, "gpu": torch.cuda.get_device_name()}
    with torch.no_grad():
        compiled.generate(ids, max_new_tokens=4, eos_token_id=[])  # capture the decode graph
        row["wall_us_per_token"] = per_token(
            lambda n: compiled.generate(ids, max_new_tokens=n, eos_token_id=[])) * 1e6
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            compiled.generate(ids, max_new_tokens=steps + 1, eos_token_id=[])
            torch.cuda.synchronize()
        # The profiled run holds the prefill too: subtract a profile of prefill alone.
        with profile(activities=[ProfilerActivity.CUDA]) as prof_prefill:
            compiled.generate(ids, max_new_tokens=1, eos_token_id=[])
            torch.cuda.synchronize()
        rows, busy = kernel_table(prof, steps)
        pre_rows, pre_busy = kernel_table(prof_prefill, steps)
        pre = {r["kernel"]: r for r in pre_rows}
        for r in rows:
            p = pre.get(r["kernel"])
            if p:
                r["launches_per_token"] -= p["launches_per_token"]
                r["us_per_token"] -= p["us_per_token"]
        rows = [r for r in rows if r["launches_per_token"] > 0.5]
        rows.sort(key=lambda r: -r["us_per_token"])
        row["gpu_busy_us_per_token"] = busy - pre_busy
        row["launches_per_token"] = sum(r["launches_per_token"] for r in rows)
        row["kernels"] = rows
        # The decode program's GPU steps, regions spelled out: which kernel is which.
        row["decode_steps"] = [
            step["op"] + (" " + ",".join(o["op"].split("::")[1].split(".")[0]
                                         for o in json.loads(step["args"][1])["ops"])
                          if step["op"].startswith("kernel::") else "")
            for step in compiled.plan.programs["decode"].steps
            if step["op"].startswith(("kernel::", "cuda::", "aten::embedding", "aten::linear"))
        ]
        if accuracy:
            probe = ids[:1, :32]
            mine = compiled(probe).logits[:, -1].float()
        del compiled
        torch.cuda.empty_cache()
        if accuracy:
            hf_low = model(probe).logits[:, -1].float()
            model.float()
            ref = model(probe).logits[:, -1].float()
            row["dsc_vs_fp32_rel_err"] = rel_err(mine, ref)
            row["hf_vs_fp32_rel_err"] = rel_err(hf_low, ref)
            row["dsc_vs_hf_rel_err"] = rel_err(mine, hf_low)
            row["argmax_dsc_eq_fp32"] = bool((mine.argmax(-1) == ref.argmax(-1)).all())
            row["argmax_hf_eq_fp32"] = bool((hf_low.argmax(-1) == ref.argmax(-1)).all())
    del model
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="llama-1.1b:1,llama-7b:1")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--keep-pdl", action="store_true",
        help="profile with programmatic dependent launch on; by default it is turned off "
        "(DSC_PDL=0) because a kernel placed early counts its wait for the previous kernel as "
        "its own time, so per-kernel durations would overlap",
    )
    args = parser.parse_args()
    if not args.keep_pdl:
        os.environ["DSC_PDL"] = "0"
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out or f"bench/results/profile-{gpu}-{time.strftime('%Y-%m-%d')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.models.split(","):
        name, batch = spec.split(":")
        row = profile_model(name, int(batch), args.steps, not args.no_accuracy and batch == "1")
        row["pdl"] = args.keep_pdl
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"\n== {name} b={batch}: wall {row['wall_us_per_token']:.0f} us/token, GPU busy "
              f"{row['gpu_busy_us_per_token']:.0f} us/token, "
              f"{row['launches_per_token']:.0f} launches/token")
        for r in row["kernels"][:25]:
            print(f"  {r['us_per_token']:8.1f} us  {r['launches_per_token']:6.1f}x  "
                  f"{r['us_median']:6.1f} us med  {r['kernel']}")
        for key in ("dsc_vs_fp32_rel_err", "hf_vs_fp32_rel_err", "dsc_vs_hf_rel_err",
                    "argmax_dsc_eq_fp32", "argmax_hf_eq_fp32"):
            if key in row:
                print(f"  {key}: {row[key]}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
