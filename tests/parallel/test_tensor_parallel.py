"""Tensor parallelism end to end on CPU (gloo): 2 and 4 processes under torchrun.

Each run compiles tiny models with random weights for Target(tp=N) on every rank and compares with
the HF model in eager mode (fp32): logits within 1e-4, greedy tokens identical (dsc at tp=1 equals
HF exactly, tests/e2e); plus the structural counts, the per-rank plan files, and a dead peer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsc import zoo
from dsc.plan import load_plan

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
TP2_MODELS = ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-mixtral", "tiny-mistral-sliding",
              "tiny-bloom", "tiny-gpt-oss", "tiny-glm4-moe", "tiny-deepseek-v3", "tiny-qwen3.5"]
TP4_MODELS = ["tiny-llama"]  # 2 KV heads over 4 ranks: each rank keeps a replicated KV head
LAYERS = 2  # every tiny model


def torchrun(nproc: int, scenario: str, out: Path, *models: str, env: dict | None = None):
    environ = dict(os.environ)
    # Eight ranks compiling on two shared cores can reach their first collective minutes apart;
    # the production default (60 s) would call that a dead peer.
    environ.setdefault("DSC_COLLECTIVE_TIMEOUT", "300")
    environ.update(env or {})
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    environ["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKER),
        scenario,
        str(out),
        *models,
    ]
    return subprocess.run(
        command, env=environ, capture_output=True, text=True, timeout=300, check=False
    )


def _run(tmp_path_factory, nproc: int, models: list[str]) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp(f"tp{nproc}")
    proc = torchrun(nproc, "check", out, *models)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, nproc


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    return _run(tmp_path_factory, 2, TP2_MODELS)


@pytest.fixture(scope="module")
def tp4(tmp_path_factory):
    return _run(tmp_path_factory, 4, TP4_MODELS)


def _results(run: tuple[Path, int], name: str) -> list[dict]:
    out, nproc = run
    found = [json.loads((out / f"{name}-check-rank{r}.json").read_text()) for r in range(nproc)]
    if "skipped" in found[0] or (name == "tiny-mixtral" and not found[0]["moe"]):
        pytest.skip(f"{name} does not compile to dsc.moe yet: {found[0].get('skipped', '')[:200]}")
    return found


CASES = [("tp2", name) for name in TP2_MODELS] + [("tp4", name) for name in TP4_MODELS]


@pytest.mark.parametrize("run_name,name", CASES)
def test_logits_and_greedy_tokens_equal_eager(run_name, name, request):
    for rank in _results(request.getfixturevalue(run_name), name):
        assert rank["logits_shape"] == [2, 7, 211]  # the full vocabulary on every rank
        assert rank["max_diff"] < 1e-4
        assert len(set(rank["tokens"][7:])) > 2, "tokens must vary for the comparison to matter"
        assert rank["tokens"] == rank["hf_tokens"]


@pytest.mark.parametrize("run_name,name", CASES)
def test_one_all_reduce_per_block_and_one_gather(run_name, name, request):
    # attention + MLP (or MoE) per layer, and the vocab-parallel embedding. With the norm
    # prologues on (the default) a sum added straight to the residual stream takes the add
    # (fuse_all_reduce_residual) — GPT-2's and OPT's too, their row biases riding in rank 0's
    # product; the MoE block's sum and the embedding's stay plain all_reduces.
    # GLM4-MoE's second layer adds its routed and shared experts' partial sums before one
    # all-reduce (merge_all_reduces); its first layer is dense, so three take the residual add.
    # DeepSeek-V3's latent attention is cut by heads (its latent replicated) like any attention;
    # its MoE block's sum stays a plain all_reduce.
    # Qwen3.5's gated attention (query and output gate interleaved by head in one projection,
    # a norm within each head) is cut like any attention; its linear-attention block stays
    # whole on every rank (no all-reduce), its MLP is cut.
    with_residual, with_product, total = {
        "tiny-qwen3.5": (3, 0, 4),
        "tiny-mixtral": (LAYERS, 0, 2 * LAYERS + 1), "tiny-gpt-oss": (LAYERS, 0, 2 * LAYERS + 1),
        "tiny-glm4-moe": (3, 0, 2 * LAYERS + 1), "tiny-deepseek-v3": (3, 0, 2 * LAYERS + 1),
    }.get(name, (2 * LAYERS, 0, 2 * LAYERS + 1))
    for rank in _results(request.getfixturevalue(run_name), name):
        assert rank["all_reduce_residual"] == with_residual
        assert rank["linear_all_reduce"] == with_product
        assert rank["all_reduce"] + with_residual + with_product == total
        assert rank["all_gather"] == 1  # the logits


@pytest.mark.parametrize("nproc", [2])
def test_without_norm_prologues_row_products_take_their_sums(tmp_path, nproc):
    """DSC_NORM_PROLOGUE=0: the adds stay apart, and the row-parallel projections' sums go with
    their products (fuse_linear_all_reduce); results unchanged."""
    proc = torchrun(nproc, "check", tmp_path, "tiny-llama", env={"DSC_NORM_PROLOGUE": "0"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    for r in range(nproc):
        rank = json.loads((tmp_path / f"tiny-llama-check-rank{r}.json").read_text())
        assert rank["linear_all_reduce"] == 2 * LAYERS and rank["all_reduce"] == 1
        assert rank["all_reduce_residual"] == 0
        assert rank["max_diff"] < 1e-4 and rank["tokens"] == rank["hf_tokens"]


@pytest.mark.parametrize("run_name,name", CASES)
def test_sampling_without_seed_agrees_across_ranks(run_name, name, request):
    ranks = _results(request.getfixturevalue(run_name), name)
    assert all(r["sampled"] == ranks[0]["sampled"] for r in ranks)


def test_kv_heads_replicated_when_fewer_than_ranks(tp4):
    # tiny-llama: 4 query heads, 2 KV heads; at tp=4 each rank caches the one KV head it reads.
    for rank in _results(tp4, "tiny-llama"):
        assert rank["cache"] == [4, 1, 64, 16]


def test_kv_cache_holds_local_heads(tp2):
    assert _results(tp2, "tiny-llama")[0]["cache"] == [4, 1, 64, 16]  # 2 KV heads / 2 ranks
    assert _results(tp2, "tiny-glm4-moe")[0]["cache"] == [4, 1, 64, 16]  # partial rotary too
    assert _results(tp2, "tiny-gpt2")[0]["cache"] == [4, 2, 64, 16]  # 4 heads / 2 ranks


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_saved_plan_has_one_shard_file_per_rank(tp2, name):
    out, nproc = tp2
    assert all(r["loaded_diff"] == 0.0 for r in _results(tp2, name))
    plan = out / f"{name}-plan"
    doc = json.loads((plan / "plan.json").read_text())
    assert doc["world_size"] == nproc and sorted(doc["ranks"]) == ["0", "1"]
    full = dict(zoo.build(name, init_std=0.3, seed=1).named_parameters())
    # The row projection of layer 0's MLP: rank r holds input features [r*F/2, (r+1)*F/2).
    # GPT-2's Conv1D weight is [in, out]: its shard is stored transposed (addmm_to_linear).
    row, dim, prefix = {
        "tiny-llama": ("model.layers.0.mlp.down_proj.weight", 1, ""),
        "tiny-gpt2": ("transformer.h.0.mlp.c_proj.weight", 0, "transposed:"),
    }[name]
    for r in range(nproc):
        with safe_open(plan / f"weights-rank{r}.safetensors", "pt") as f:
            names = set(f.keys())
            assert row not in names  # no whole weight of a split projection
            shard = f.get_tensor(f"{prefix}{row}.tp{r}of{nproc}")
            if prefix:
                shard = shard.t()
            total = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
        whole = full[row].detach()
        assert torch.equal(shard, whole.chunk(nproc, dim)[r])
        assert total < 0.7 * sum(p.numel() for p in full.values())


def test_load_in_fresh_processes_reads_own_rank(tp2, tmp_path):
    out, nproc = tp2
    plan = out / "tiny-llama-plan"
    # A rank needs only its own part: rank 0 loads with rank 1's weights file gone.
    alone = tmp_path / "rank0-only"
    shutil.copytree(plan, alone)
    (alone / "weights-rank1.safetensors").unlink()
    assert load_plan(alone, rank=0).weights
    proc = torchrun(nproc, "load", out, "tiny-llama")
    assert proc.returncode == 0, proc.stderr[-6000:]
    for r in range(nproc):
        found = json.loads((out / f"tiny-llama-load-rank{r}.json").read_text())
        assert found["loaded_diff"] == 0.0


def test_dead_rank_fails_fast_with_clear_error(tmp_path):
    start = time.perf_counter()
    proc = torchrun(2, "dead", tmp_path, env={"DSC_COLLECTIVE_TIMEOUT": "5"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((tmp_path / "dead-rank0.json").read_text())
    assert result["error"] is not None, "the call must fail, not return"
    assert "rank 0 of 2: all_reduce failed" in result["error"]
    assert "DSC_COLLECTIVE_TIMEOUT" in result["error"]
    assert result["seconds"] < 5 + 2
    # Start-up and compile included: generous, as a loaded test machine (several torchrun jobs
    # at once) has taken over a minute for them; a hang would take the subprocess's timeout.
    assert time.perf_counter() - start < 150


def test_a_step_failed_on_one_rank_is_skipped_on_all(tmp_path):
    """distributed.all_agree, which guards the symmetric buffers' allocation: one rank out of
    memory must not leave the others waiting in the rendezvous that follows."""
    proc = torchrun(2, "agree", tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for r in range(2):
        found = json.loads((tmp_path / f"agree-rank{r}.json").read_text())
        assert found == {"all_ok": True, "one_failed": False}


def test_tp8_on_small_config_equals_eager(tmp_path_factory):
    """Eight ranks (gloo): a Mistral-shaped config with 8 query heads and 2 KV heads, so each KV
    head is replicated over 4 ranks — the 70B layout (64 heads, 8 KV heads at tp=8) in small."""
    run = _run(tmp_path_factory, 8, ["tiny-mistral"])
    for rank in _results(run, "tiny-mistral"):
        assert rank["logits_shape"] == [2, 7, 211]
        assert rank["max_diff"] < 1e-4
        assert rank["tokens"] == rank["hf_tokens"]
        assert rank["cache"] == [4, 1, 64, 8]  # one replicated KV head of dim 8 per rank


@pytest.mark.parametrize("nproc", [2, 4])
def test_fused_all_reduce_residual_norm_equals_eager(tmp_path, nproc):
    """DSC_FUSED_ALLREDUCE=1: every block's all_reduce joins the residual add and the next
    RMSNorm (the embedding's sum has no residual add and stays); results unchanged."""
    proc = torchrun(nproc, "check", tmp_path, "tiny-llama", env={"DSC_FUSED_ALLREDUCE": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    for r in range(nproc):
        rank = json.loads((tmp_path / f"tiny-llama-check-rank{r}.json").read_text())
        assert rank["fused_all_reduce"] == 2 * LAYERS and rank["all_reduce"] == 1
        assert rank["max_diff"] < 1e-4 and rank["loaded_diff"] == 0.0
        assert rank["tokens"] == rank["hf_tokens"]
