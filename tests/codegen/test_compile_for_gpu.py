"""The generated kernels compile for an H100 (sm_90) with Triton's NVIDIA backend, without a GPU.

The interpreter runs a kernel as Python; only the compiler checks what a GPU build needs (one type
for a variable assigned in both branches of an `if`, constexpr arguments, supported intrinsics).
The compile runs in a subprocess: this directory's conftest turns the interpreter on for the
whole test process, and `triton.jit` reads it when a kernel is defined.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import torch
import torch.nn.functional as F
from tests.codegen.helpers import compile_for_gpu, fused

dsc = torch.ops.dsc
compiled = 0
for dtype in (torch.float32, torch.bfloat16):
    def randn(*shape):
        return torch.randn(*shape).to(dtype)

    def res_norm(x, r, w):
        h = dsc.residual_add(x, r)
        return h, dsc.rms_norm(h, w, 1e-6, x.dtype)

    def rotary(q, k, c, s):
        return torch.cat([dsc.rotary(q, c, s), dsc.rotary(k, c, s)], 1)

    def gated_up(x, w):
        up = F.linear(x, w)
        return dsc.gated_activation(up[..., :16], up[..., 16:], "silu")

    def casts_and_softmax(x, w, b):
        y = torch.softmax(x.float() * 0.5, -1).to(x.dtype)
        return dsc.layer_norm(y, w, b, 1e-5), dsc.activation(x, "gelu_tanh").float().exp()

    cases = [
        (res_norm, [randn(2, 3, 64), randn(2, 3, 64)], {"w": randn(64)}),
        (rotary, [randn(1, 4, 3, 8), randn(1, 2, 3, 8), randn(1, 1, 3, 8), randn(1, 1, 3, 8)], {}),
        (gated_up, [randn(3, 8)], {"w": randn(32, 8)}),
        (casts_and_softmax, [randn(3, 37)], {"w": randn(37), "b": randn(37)}),
    ]
    for fn, inputs, weights in cases:
        gm, _ = fused(fn, *inputs, weights=weights)
        for node in gm.graph.nodes:
            if node.target is dsc.fused_region.default:
                compiled += compile_for_gpu(node.args[1])
print("compiled", compiled)
"""


def _nvidia_toolchain() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or not spec.submodule_search_locations:
        return False
    return (Path(spec.submodule_search_locations[0]) / "bin" / "ptxas").is_file()


@pytest.mark.skipif(not _nvidia_toolchain(), reason="Triton's NVIDIA backend (ptxas) is missing")
def test_generated_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # fp32 and bf16, one kernel per case: res+norm, rotary (two groups), the gated epilogue, and
    # the two independent casting chains (they meet at the graph output: one launch).
    assert "compiled 8" in result.stdout, result.stdout + result.stderr[-2000:]
