"""One rank of a tensor-parallel test run, started by torchrun from test_tensor_parallel.py.

    torchrun --standalone --nproc-per-node N tests/parallel/worker.py SCENARIO OUT_DIR [MODEL ...]

Scenarios (each rank writes OUT_DIR/<model>-rank<r>.json; the test compares them):
    check  compile each model for tp=N; logits and greedy tokens against the HF model, sampled
           tokens (no seed: only the broadcast makes ranks agree), save then load the plan.
    load   in fresh processes: dsc.load(OUT_DIR/<model>-plan) (each rank reads its own weights
           file and joins the group from torchrun's environment); logits as saved by `check`.
    dead   rank 1 leaves right after joining; rank 0 compiles and calls the model, which must
           fail with CollectiveError within DSC_COLLECTIVE_TIMEOUT.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import dsc
from dsc import zoo
from dsc.runtime import distributed

PROMPT = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
TARGET = {"device": "cpu", "max_batch": 4, "max_seq_len": 64}


def check(name: str, tp: int, out: Path) -> dict:
    model = zoo.build(name, init_std=0.3, seed=1)
    try:
        compiled = dsc.compile(model, dsc.Target(tp=tp, **TARGET))
    except dsc.UnsupportedOpError as exc:
        return {"skipped": str(exc)}
    graph = compiled.history[-1].counts
    with torch.no_grad():
        ref = model(PROMPT).logits
        logits = compiled(PROMPT).logits
        hf_tokens = model.generate(
            PROMPT[:1], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    tokens = compiled.generate(PROMPT[:1], max_new_tokens=12, eos_token_id=[])
    sampled = compiled.generate(PROMPT, max_new_tokens=6, do_sample=True, eos_token_id=[])
    plan_dir = out / f"{name}-plan"
    compiled.save(plan_dir)
    if dist.get_rank() == 0:
        save_file({"logits": logits.contiguous()}, str(out / f"{name}-logits.safetensors"))
    loaded = dsc.load(plan_dir)
    return {
        "rank": dist.get_rank(),
        "moe": graph.get("dsc.moe", 0),
        "all_reduce": graph.get("dsc.all_reduce", 0),
        "linear_all_reduce": graph.get("dsc.linear_all_reduce", 0),
        "all_reduce_residual": graph.get("dsc.all_reduce_residual", 0),
        "fused_all_reduce": graph.get("dsc.all_reduce_residual_norm", 0),
        "all_gather": graph.get("dsc.all_gather", 0),
        "logits_shape": list(logits.shape),
        "max_diff": float((logits - ref).abs().max()),
        "tokens": tokens[0].tolist(),
        "hf_tokens": hf_tokens[0].tolist(),
        "sampled": sampled.tolist(),
        "loaded_diff": float((loaded(PROMPT).logits - logits).abs().max()),
        "cache": compiled.plan.model["cache"][0]["shape"],
    }


def load(name: str, out: Path) -> dict:
    assert not dist.is_initialized()
    loaded = dsc.load(out / f"{name}-plan")
    with torch.no_grad():
        logits = loaded(PROMPT).logits
    saved = load_file(str(out / f"{name}-logits.safetensors"))["logits"]
    return {"rank": dist.get_rank(), "loaded_diff": float((logits - saved).abs().max())}


def dead(out: Path) -> dict:
    distributed.init("cpu", 2)
    if dist.get_rank() == 1:
        sys.exit(0)  # leaves without a word: rank 0 must not hang
    compiled = dsc.compile(zoo.build("tiny-gpt2"), dsc.Target(tp=2, **TARGET))
    start = time.perf_counter()
    try:
        compiled(PROMPT)
    except distributed.CollectiveError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - start}
    return {"error": None, "seconds": time.perf_counter() - start}


def agree(out: Path) -> dict:
    """distributed.all_agree: every rank ok, then all but the last."""
    world = int(__import__("os").environ["WORLD_SIZE"])
    rank = distributed.init("cpu", world)
    return {"all_ok": distributed.all_agree(True),
            "one_failed": distributed.all_agree(rank != world - 1)}


def main() -> None:
    scenario, out, models = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    tp = int(__import__("os").environ["WORLD_SIZE"])
    if scenario == "agree":
        result = agree(out)
        (out / f"agree-rank{dist.get_rank()}.json").write_text(json.dumps(result))
        return
    if scenario == "dead":
        result = dead(out)
        (out / "dead-rank0.json").write_text(json.dumps(result))
        return
    for name in models:
        result = check(name, tp, out) if scenario == "check" else load(name, out)
        (out / f"{name}-{scenario}-rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
