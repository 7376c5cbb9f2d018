"""On two and four GPUs (NCCL, symmetric memory): the push all-reduce gives the bits of a
rank-order sum, the fused all-reduce + residual + RMSNorm kernel equals the three ops, the
row-parallel GEMM that pushes its tiles gives the bits of the GEMM then the sum, eagerly and
under CUDA-graph replay, and tp=N plans using them generate HF's tokens. Skipped without the
GPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)

WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.mark.parametrize("world", [2, 4])
def test_push_all_reduce_on_gpus(tmp_path, world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1", DSC_COLLECTIVE_TIMEOUT="120")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
         str(WORKER), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=400, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    for rank in range(world):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found["fusable_1x4096"] and found["fusable_16x4096"]  # the kernel, not the ops
        assert all(value for key, value in found.items() if key.startswith("push_exact_"))
        for key, value in found.items():
            if key.startswith(("eager_", "graph_")):
                assert value <= 1e-2, (key, value)  # a bf16 rounding at most
        assert all(value for key, value in found.items() if key.startswith("gemv_push"))
        # 2 layers x (attention, MLP): the fused norm takes them all when asked for; by
        # default each sum takes the residual add (the norm goes to the next GEMM); without
        # norm prologues the row-parallel GEMMs push their tiles.
        assert found["fused_norm_fused_in_plan"] == 4
        assert found["default_residual_in_plan"] == 4
        assert found["no_prologue_gemv_push_in_plan"] == 4
        assert found["gpt2_residual_in_plan"] == 4
        assert all(found[f"{tag}_tokens_equal_hf"]
                   for tag in ("fused_norm", "default", "no_prologue", "gpt2"))
