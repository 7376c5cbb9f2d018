"""End-to-end decode benchmark on one GPU: dsc vs HF eager vs HF static cache + torch.compile.

Random weights at real shapes; prompt 128 tokens, 64 new tokens, greedy; decode time per token =
(time for N new tokens - time for 1) / (N - 1), median of 3. The floor is the model's weight bytes
over the device copy bandwidth measured in this run; for a mixture-of-experts model, the bytes a
step must read: every weight outside the experts, and per layer the experts a batch of random
tokens is expected to reach (k of E for one token; E (1 - (1 - k/E)^batch) for a batch). `stream` is the same per-token time taken
inside one generation (events as tokens 1 and 63 are handed out, median of 5); `graph` is the
GPU time of the model's decode step alone, its captured CUDA graph replayed back to back.
Prints a table; writes JSON lines.

    python bench/e2e.py --models llama-7b:1,llama-7b:16 --out bench/results/e2e.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsc  # noqa: E402
from dsc import zoo  # noqa: E402
from dsc.kernels import pdl  # noqa: E402

DTYPES = {
    "llama-7b": torch.bfloat16,
    "llama-1.1b": torch.bfloat16,
    "gpt2-xl": torch.float16,
    "opt-1.3b": torch.float16,
    "llama-70b": torch.bfloat16,
    "mixtral-8x7b": torch.bfloat16,
    "gpt-oss-20b": torch.bfloat16,
    "deepseek-v2-lite": torch.bfloat16,
    "qwen3.5": torch.bfloat16,
}
PROMPT, NEW = 128, 64


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    nbytes = src.numel()
    del src, dst
    torch.cuda.empty_cache()  # the 2 GiB go back before any model is built
    return 2 * nbytes / statistics.median(times)


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def per_token(generate, reps: int = 3) -> float:
    """(t(NEW tokens) - t(1 token)) / (NEW - 1), median over reps, in seconds."""
    generate(2)  # warm
    full = statistics.median(timed(lambda: generate(NEW)) for _ in range(reps))
    one = statistics.median(timed(lambda: generate(1)) for _ in range(reps))
    return (full - one) / (NEW - 1)


def graph_step_ms(graph: torch.cuda.CUDAGraph, reps: int = 200) -> float:
    """GPU time of one decode step: the captured step replayed back to back (no host work
    between steps), median of 3 batches of `reps`."""
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def stream_per_token(compiled, ids, reps: int = 5) -> float:
    """Decode time per token inside one generation: CUDA events recorded as tokens 1 and NEW-1
    are handed out (the host runs ahead, so they time the GPU's steps), median over reps, in
    milliseconds. Needs no subtraction of a prefill-only run."""
    times = []
    for _ in range(reps):
        events = []
        for _token in compiled.stream(ids, max_new_tokens=NEW, eos_token_id=[]):
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        events[-1].synchronize()
        times.append(events[1].elapsed_time(events[-1]) / (len(events) - 2))
    return statistics.median(times)


@contextlib.contextmanager
def held_environment(env: dict[str, str]):
    """Hold environment settings for the duration of the block."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def hf_generate(model, ids):
    def run(n):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return run


def step_weight_bytes(model: torch.nn.Module, batch: int) -> float:
    """Bytes of weight one decode step reads: all of a dense model; for an MoE model the weights
    outside its experts plus the expected share of each layer's experts (see the docstring)."""
    config = model.config
    # Mixtral and GPT-OSS call them local experts, DeepSeek routed ones, Qwen plain experts.
    experts = next((getattr(config, key) for key in ("num_local_experts", "n_routed_experts",
                                                     "num_experts")
                    if getattr(config, key, None)), 0)
    top_k = getattr(config, "num_experts_per_tok", 0) or 0
    total = in_experts = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        total += size
        if ".experts." in name:  # HF's expert tensors ([E, ...]) and their biases
            in_experts += size
    if not experts or not in_experts:
        return float(total)
    reached = experts * (1 - (1 - top_k / experts) ** batch)
    return total - in_experts + in_experts * reached / experts


def bench_model(
    name: str, batch: int, bandwidth: float, with_compile: bool, prefill: bool,
    ab_envs: list[str] = (), max_seq_len: int | None = None,
) -> dict:
    dtype = DTYPES[name]
    model = zoo.build(name, dtype=dtype, device="cuda")
    weight_bytes = step_weight_bytes(model, batch)
    floor = weight_bytes / bandwidth
    gen = torch.Generator(device="cuda").manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, PROMPT), device="cuda", generator=gen)
    row = {
        "model": name,
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(),
        "weight_gb": weight_bytes / 1e9,
        "copy_gbps": bandwidth / 1e9,
        "floor_ms": floor * 1e3,
        "dsc_pdl": pdl.enabled(torch.device("cuda")),
    }

    with torch.no_grad():
        row["hf_eager_ms"] = per_token(hf_generate(model, ids)) * 1e3

        t0 = time.perf_counter()
        # The cache's capacity: just the benchmark's tokens, the 2048-token prompt when prefill
        # is timed too, or --max-seq-len (decode kernels pick launch shapes from it).
        row["max_seq_len"] = (2048 + 8 if prefill else max_seq_len or PROMPT + NEW + 8)
        target = dsc.Target(
            device="cuda",
            dtype=row["dtype"],
            max_batch=max(batch, 1),
            max_seq_len=row["max_seq_len"],
        )
        compiled = dsc.compile(model, target)
        compiled.generate(ids, max_new_tokens=1, eos_token_id=[])
        torch.cuda.synchronize()
        row["dsc_compile_to_first_token_s"] = time.perf_counter() - t0

        def dsc_run(n):
            compiled.generate(ids, max_new_tokens=n, eos_token_id=[])

        row["dsc_ms"] = per_token(dsc_run) * 1e3
        row["dsc_over_floor"] = row["dsc_ms"] / row["floor_ms"]
        row["dsc_stream_ms"] = stream_per_token(compiled, ids)
        row["dsc_graph_step_ms"] = graph_step_ms(compiled.decode_graph(batch))
        # Variants in one process: each compiled and run with its own environment setting held
        # for every call that touches it (settings are read at compile, capture and launch
        # time), timed alternating with the default so drift of card or host hits all alike.
        variants = {"a": ({}, compiled)}
        for letter, spec in zip("bcd", ab_envs):
            env = dict(item.split("=", 1) for item in spec.split(","))
            with held_environment(env):
                variants[letter] = (env, dsc.compile(model, target))
        if len(variants) > 1:
            runs = {letter: {"ms": [], "stream": [], "graph": []} for letter in variants}
            runs["a"] = {"ms": [row["dsc_ms"]], "stream": [row["dsc_stream_ms"]],
                         "graph": [row["dsc_graph_step_ms"]]}
            for rep in range(2):
                for letter, (env, model_v) in variants.items():
                    if letter == "a" and rep == 0:
                        continue  # the default's first run is the one above
                    with held_environment(env):
                        runs[letter]["ms"].append(per_token(
                            lambda n, m=model_v: m.generate(ids, max_new_tokens=n, eos_token_id=[])
                        ) * 1e3)
                        runs[letter]["stream"].append(stream_per_token(model_v, ids))
                        runs[letter]["graph"].append(graph_step_ms(model_v.decode_graph(batch)))
            for letter, (env, _) in variants.items():
                suffix = "" if letter == "a" else f"_{letter}"
                if env:
                    row[f"env{suffix}"] = env
                for key, values in runs[letter].items():
                    field = {"ms": "dsc_ms", "stream": "dsc_stream_ms",
                             "graph": "dsc_graph_step_ms"}[key]
                    row[f"{field}{suffix}_runs"] = values
                    row[f"{field}{suffix}"] = statistics.median(values)
            row["dsc_over_floor"] = row["dsc_ms"] / row["floor_ms"]
            del variants

        # Correctness on the GPU: first-step logits against HF in the same dtype.
        ref = model(ids[:1, :32]).logits[:, -1].float()
        mine = compiled(ids[:1, :32]).logits[:, -1].float()
        row["first_logits_rel_err"] = float((mine - ref).norm() / ref.norm())
        hf_tokens = model.generate(ids[:1], max_new_tokens=16, do_sample=False, pad_token_id=0)
        row["greedy_agree_16"] = int(
            (compiled.generate(ids[:1], max_new_tokens=16, eos_token_id=[]) == hf_tokens)
            .all(0)
            .long()
            .cumprod(0)
            .sum()
            - PROMPT
        )

        if prefill:
            long_ids = torch.randint(0, vocab, (1, 2048), device="cuda", generator=gen)
            compiled.generate(long_ids, max_new_tokens=1, eos_token_id=[])
            row["dsc_prefill_2048_ms"] = (
                statistics.median(
                    timed(lambda: compiled.generate(long_ids, max_new_tokens=1, eos_token_id=[]))
                    for _ in range(3)
                )
                * 1e3
            )
            model(long_ids)
            row["hf_eager_prefill_2048_ms"] = (
                statistics.median(timed(lambda: model(long_ids, use_cache=False)) for _ in range(3))
                * 1e3
            )
        del compiled
        torch.cuda.empty_cache()

        if with_compile:
            try:
                hf_compiled(model, ids, row, prefill)
            except Exception as exc:  # record the baseline's failure, keep dsc's numbers
                row["hf_compile_error"] = str(exc).strip().splitlines()[-1][:300]
    del model
    torch.cuda.empty_cache()
    return row


def hf_compiled(model, ids, row: dict, prefill: bool) -> None:
    """HF static cache + torch.compile(mode='reduce-overhead'), timed like the others."""
    with torch.no_grad():
        if True:  # noqa: SIM108  (one block, mirrors bench_model's layout)
            # With a static cache, HF generate compiles the decode step itself
            # (torch.compile, mode="reduce-overhead": CUDA graphs); wrapping forward by hand
            # as well breaks its graph replays.
            model.generation_config.cache_implementation = "static"
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            row["hf_compile_warmup_s"] = time.perf_counter() - t0
            row["hf_compile_ms"] = per_token(hf_generate(model, ids)) * 1e3
            if prefill:
                long_ids = torch.randint(0, model.config.vocab_size, (1, 2048), device="cuda")
                model.generate(long_ids, max_new_tokens=1, pad_token_id=0)
                row["hf_compile_prefill_2048_ms"] = (
                    statistics.median(
                        timed(lambda: model.generate(long_ids, max_new_tokens=1, pad_token_id=0))
                        for _ in range(3)
                    )
                    * 1e3
                )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--models", default="llama-7b:1,llama-7b:16,llama-1.1b:1,gpt2-xl:1,opt-1.3b:1"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip HF + torch.compile")
    parser.add_argument(
        "--prefill", default="llama-7b", help="models that also time 2048-token prefill"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="cache slots for the decode runs (default: prompt + new tokens + 8)")
    parser.add_argument(
        "--ab-env", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
        help="a variant: dsc compiled and run with these environment settings, timed "
        "alternating with the default (e.g. DSC_PDL=0); repeat for more variants, reported "
        "as dsc_*_b, dsc_*_c, ...",
    )
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out or f"bench/results/e2e-{gpu}-{time.strftime('%Y-%m-%d')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.models.split(","):
        name, batch = spec.split(":")
        first_of_model = name in args.prefill.split(",") and int(batch) == 1
        row = bench_model(
            name, int(batch), bandwidth, not args.no_compile, first_of_model, args.ab_env,
            args.max_seq_len,
        )
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(
        f"\n{'model':<12}{'b':>3}{'floor':>8}{'dsc':>8}{'x floor':>8}{'stream':>8}{'x floor':>8}"
        f"{'graph':>8}{'HF eager':>10}"
        f"{'HF compile':>11}{'compile s':>10}{'logit err':>10}"
    )
    for r in rows:
        print(
            f"{r['model']:<12}{r['batch']:>3}{r['floor_ms']:>8.2f}{r['dsc_ms']:>8.2f}"
            f"{r['dsc_over_floor']:>8.2f}{r['dsc_stream_ms']:>8.2f}"
            f"{r['dsc_stream_ms'] / r['floor_ms']:>8.2f}"
            f"{r['dsc_graph_step_ms']:>8.2f}{r['hf_eager_ms']:>10.2f}"
            f"{r.get('hf_compile_ms', float('nan')):>11.2f}"
            f"{r['dsc_compile_to_first_token_s']:>10.1f}{r['first_logits_rel_err']:>10.4f}"
        )
    for r in rows:
        for letter in "abcd":
            suffix = "" if letter == "a" else f"_{letter}"
            if f"dsc_stream_ms{suffix}_runs" in r:
                print(f"{r['model']:<12}{r['batch']:>3} {letter} {r.get('env' + suffix, 'default')}: "
                      f"per token {r['dsc_ms' + suffix]:.3f} ms, stream "
                      f"{r['dsc_stream_ms' + suffix]:.3f} ms, graph {r['dsc_graph_step_ms' + suffix]:.3f} ms")


if __name__ == "__main__":
    main()
