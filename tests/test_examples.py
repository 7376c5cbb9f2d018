"""Every script in examples/ runs to the end (tiny zoo models; the SmolLM2 demo is marked slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, cwd: Path, timeout: float = 600) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


def test_compile_and_run(tmp_path):
    out = run_example("compile_and_run.py", cwd=tmp_path)
    assert "dsc matches eager" in out


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert"])
def test_compile_and_run_other_models(tmp_path, model):
    out = run_example("compile_and_run.py", "--model", model, cwd=tmp_path)
    assert "dsc matches eager" in out


def test_inspect_passes(tmp_path):
    out = run_example("inspect_passes.py", "--html", "report.html", cwd=tmp_path)
    assert "nodes made by recognize_attention" in out
    assert "dsc.attention.default" in out
    assert "recognize_attention" in (tmp_path / "report.html").read_text()


def test_save_and_load(tmp_path):
    out = run_example("save_and_load.py", "--plan", str(tmp_path / "plan"), cwd=tmp_path)
    assert "without transformers" in out and "identical logits and tokens" in out
    assert (tmp_path / "plan" / "plan.json").is_file()


def test_generate(tmp_path):
    out = run_example("generate.py", "--max-new-tokens", "6", cwd=tmp_path)
    assert "row 1 equals HF generate" in out and "same twice with seed=7" in out


@pytest.mark.slow
def test_demo(tmp_path):
    pytest.importorskip("gguf")
    import dsc
    from dsc import hub

    try:
        hub.smollm2_gguf_path()
    except dsc.DscError as exc:  # the package is optional outside CI
        pytest.skip(str(exc))
    out = run_example("demo.py", "--max-new-tokens", "4", "--html", "demo.html", cwd=tmp_path)
    assert "recognize_attention" in out  # the pass pipeline
    assert "assistant: The capital" in out  # the streamed answer
    assert "tokens/s" in out and "greedy tokens agree: yes" in out
    assert (tmp_path / "demo.html").is_file()


def test_tensor_parallel_under_torchrun(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", DSC_COLLECTIVE_TIMEOUT="300")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(EXAMPLES / "tensor_parallel.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "equal to the unsharded model's" in out
    holds = [line for line in out.splitlines() if line.startswith("rank ")]
    assert len(holds) == 2
    assert holds[0].split("tokens")[1].split(";")[0] == holds[1].split("tokens")[1].split(";")[0]
