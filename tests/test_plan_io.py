"""Saving and loading plans: a round trip changes nothing; damage of any kind is a PlanError that
says what is wrong; a fresh process loads a plan without transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsc
from dsc import zoo

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    compiled = dsc.compile(
        zoo.build("tiny-llama", init_std=0.3), target=dsc.Target(max_batch=2, max_seq_len=32)
    )
    path = compiled.save(tmp_path_factory.mktemp("plans") / "tiny-llama")
    return compiled, path


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of the saved plan, free to damage."""
    return Path(shutil.copytree(saved[1], tmp_path / "plan"))


def test_round_trip_gives_identical_logits_and_tokens(saved):
    compiled, path = saved
    loaded = dsc.load(path)
    assert torch.equal(loaded(IDS).logits, compiled(IDS).logits)
    kw = {"max_new_tokens": 12, "eos_token_id": []}
    assert torch.equal(loaded.generate(IDS, **kw), compiled.generate(IDS, **kw))
    assert loaded.target == compiled.target


def test_round_trip_keeps_history_and_report(saved):
    compiled, path = saved
    loaded = dsc.load(path)
    assert [(r.program, r.name) for r in loaded.history] == [
        (r.program, r.name) for r in compiled.history
    ]
    assert loaded.report() == compiled.report()
    assert "recognize_attention" in loaded.report()


def test_round_trip_latent_attention_and_grouped_routing(tmp_path):
    # DeepSeek-V3's plan: absorbed weights, a value cache that is a view of the key cache, and
    # dsc.moe's routing keywords all come back.
    compiled = dsc.compile(zoo.build("tiny-deepseek-v3", init_std=0.3),
                           target=dsc.Target(max_batch=2, max_seq_len=32))
    loaded = dsc.load(compiled.save(tmp_path / "deepseek"))
    assert loaded.plan.model["cache"] == compiled.plan.model["cache"]
    assert loaded.plan.model["cache"][1]["view_of"] == "cache.0.k"
    kw = {"max_new_tokens": 8, "eos_token_id": []}
    assert torch.equal(loaded.generate(IDS, **kw), compiled.generate(IDS, **kw))


def test_round_trip_encoder(tmp_path):
    compiled = dsc.compile(zoo.build("tiny-bert"), target=dsc.Target(max_batch=1, max_seq_len=16))
    loaded = dsc.load(compiled.save(tmp_path / "bert"))
    assert torch.equal(loaded(IDS).last_hidden_state, compiled(IDS).last_hidden_state)


def test_plan_holds_only_json_safetensors_and_sources(saved):
    suffixes = {p.suffix for p in saved[1].rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".py"}, suffixes


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rewrite_manifest(path: Path, change) -> None:
    doc = json.loads((path / "plan.json").read_text())
    change(doc)
    (path / "plan.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: _flip_byte(p / "weights-rank0.safetensors"),
            r"weights-rank0\.safetensors does not match its checksum",
        ),
        (
            lambda p: _truncate(p / "weights-rank0.safetensors"),
            r"weights-rank0\.safetensors does not match its checksum \(truncated or modified\)",
        ),
        (lambda p: _truncate(p / "plan.json"), r"plan\.json is corrupted \(not valid JSON"),
        (lambda p: _flip_byte(p / "history.json"), r"history\.json does not match its checksum"),
        (
            lambda p: (p / "weights-rank0.safetensors").unlink(),
            r"weights-rank0\.safetensors is missing; the plan is incomplete",
        ),
        (lambda p: (p / "history.json").unlink(), r"history\.json is missing"),
        (lambda p: (p / "plan.json").unlink(), r"is not a dsc plan: plan\.json is missing"),
        (
            lambda p: _rewrite_manifest(p, lambda d: d.update(schema_version=999)),
            r"plan schema version 999, this dsc reads version \d+; compile the model again",
        ),
        (
            lambda p: _rewrite_manifest(p, lambda d: d.update(format="something-else")),
            r"is not a dsc plan manifest",
        ),
    ],
    ids=[
        "corrupted-weights",
        "truncated-weights",
        "truncated-manifest",
        "corrupted-history",
        "missing-weights",
        "missing-history",
        "missing-manifest",
        "other-schema-version",
        "other-format",
    ],
)
def test_damaged_plan_is_refused_with_a_clear_message(copy, damage, message):
    damage(copy)
    with pytest.raises(dsc.PlanError, match=message):
        dsc.load(copy)


def test_missing_rank_is_refused(copy):
    with pytest.raises(dsc.PlanError, match=r"no part for rank 1"):
        dsc.load(copy, rank=1)


def test_fresh_process_loads_without_transformers(saved):
    compiled, path = saved
    code = (
        "import sys, torch, dsc\n"
        f"model = dsc.load({str(path)!r})\n"
        f"tokens = model.generate(torch.tensor({IDS.tolist()}), max_new_tokens=6, eos_token_id=[])\n"
        "print(tokens[0].tolist())\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'transformers'"
        " or m.startswith(('dsc.passes', 'dsc.codegen', 'dsc.frontend'))]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = compiled.generate(IDS, max_new_tokens=6, eos_token_id=[])
    assert result.stdout.strip() == str(expected[0].tolist())
