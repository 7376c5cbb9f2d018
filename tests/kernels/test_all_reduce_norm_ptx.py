"""The fused all-reduce kernel compiles for Hopper on any machine (Triton ships ptxas), and its
PTX has what its protocol needs: system-scope compare-and-swap done by one lane per peer,
volatile peer loads, the trap for a peer that never arrives, and the PDL wait. Compiled in a
child process: under TRITON_INTERPRET=1 the kernels are interpreter objects."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ptx() -> str:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsc.kernels import all_reduce_norm

    signature = {
        "x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16",
        "n_ptr": "*bf16", "buf_ptrs": "*i64", "flag_ptrs": "*i64", "rank": "i32", "H": "i32",
        "eps": "fp32", "stride_x": "i32", "stride_r": "i32", "stride_h": "i32", "stride_n": "i32",
        **{name: "constexpr" for name in ("WORLD", "HAS_WEIGHT", "PRODUCT", "BLOCK_H",
                                           "MAX_ROWS_", "MAX_SPINS", "CAN_TRAP", "USE_PDL")},
    }
    constexprs = {"WORLD": 4, "HAS_WEIGHT": True, "PRODUCT": tl.bfloat16, "BLOCK_H": 4096,
                  "MAX_ROWS_": all_reduce_norm.MAX_ROWS, "MAX_SPINS": all_reduce_norm.MAX_SPINS,
                  "CAN_TRAP": True, "USE_PDL": True}
    source = ASTSource(fn=all_reduce_norm._all_reduce_residual_norm_kernel, signature=signature,
                       constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4}).asm["ptx"]


def test_ptx_for_hopper_has_the_protocol():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    if proc.returncode == 3:
        pytest.skip(f"this Triton cannot compile for CUDA here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = json.loads(proc.stdout)["ptx"]
    cas = re.findall(r"atom\.global\.[a-z_.]*cas\.b32", ptx)
    assert cas and all(".acq_rel.sys." in op for op in cas)
    assert re.search(r"@%p\d+ atom\.global", ptx)  # predicated: one lane per peer
    assert "ld.volatile.global" in ptx and "trap;" in ptx and "griddepcontrol.wait" in ptx


if __name__ == "__main__":
    try:
        text = _ptx()
    except (FileNotFoundError, ImportError) as exc:  # no ptxas / no CUDA backend in this build
        print(exc, file=sys.stderr)
        sys.exit(3)
    print(json.dumps({"ptx": text}))
