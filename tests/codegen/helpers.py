"""Build fused regions from small torch functions and run them through generated kernels."""

from __future__ import annotations

import torch
from torch import fx

from dsc.codegen.lower import lower
from dsc.codegen.select import choose_kernels
from dsc.codegen.triton_codegen import region_sources
from dsc.passes.fuse import fuse  # noqa: F401  (registers the pass)
from dsc.passes.manager import PassManager
from dsc.plan import Program
from dsc.runtime import generated
from dsc.runtime.executor import Executor
from dsc.target import Target
from tests.passes.helpers import context, export_fn

CUDA = Target(device="cuda")  # code generation is for CUDA targets; the kernels run interpreted


def fused(fn, *inputs: torch.Tensor, weights: dict[str, torch.Tensor] | None = None):
    """Export `fn(*inputs, *weights)` and run the fuse pass: (graph, weights)."""
    gm, weights = export_fn(fn, *inputs, weights=weights)
    ctx = context(weights, device="cuda")
    return PassManager(ctx).run(gm, ["fuse"]), ctx.weights


def generated_program(gm: fx.GraphModule, entry: str = "forward") -> Program:
    """The graph lowered with a generated kernel for every region (sources registered)."""
    kernels = {
        node: impl
        for node, impl in choose_kernels(gm, entry, CUDA).items()
        if impl.startswith("kernel::")
    }
    program = lower(gm, entry, kernels)
    generated.register_sources(region_sources([program]))
    return program


def run_generated(fn, *inputs: torch.Tensor, weights: dict[str, torch.Tensor] | None = None):
    """(outputs through generated kernels, outputs of fn itself, the program)."""
    gm, weights = fused(fn, *inputs, weights=weights)
    program = generated_program(gm)
    feeds = dict(zip(program.inputs, inputs))
    outputs = Executor(program, weights, torch.device("cpu"))(**feeds)
    expected = fn(*inputs, *weights.values())
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    return outputs, expected, program


def kernel_steps(program: Program) -> list[str]:
    return [s["op"] for s in program.steps if s["op"].startswith("kernel::")]


_TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def compile_for_gpu(region_json: str, arch: int = 90) -> int:
    """Compile every kernel of the region's generated module for a CUDA GPU of compute capability
    `arch` with Triton's NVIDIA backend (no GPU needed; not under the interpreter). Returns how
    many kernels compiled."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsc.codegen import triton_codegen

    region = triton_codegen.normalize(region_json)
    name = triton_codegen.kernel_name(region_json)
    module = generated._load(name, triton_codegen.generate(region_json))
    compiled = 0
    for attr, kernel in vars(module).items():
        if not isinstance(kernel, triton.runtime.jit.JITFunction) or attr == "_tanh":
            continue
        sub = region
        if attr.endswith("_epilogue"):
            parts = triton_codegen._gemm_parts(region)
            sub, _ = triton_codegen._epilogue_region(region, parts)
        signature = {}
        for param in inspect.signature(kernel.fn).parameters:
            if param == "BLOCK":
                signature[param] = "constexpr"
            elif param.startswith("in") and param.endswith("_ptr"):
                signature[param] = "*" + _TRITON_TYPES[sub["values"][int(param[2:-4])]["dtype"]]
            elif param.startswith("out") and param.endswith("_ptr"):
                ref = sub["outputs"][int(param[3:-4])]["ref"]
                signature[param] = "*" + _TRITON_TYPES[sub["values"][ref]["dtype"]]
            else:
                signature[param] = "i32"
        for block, warps in ((128, 1), (4096, 16)):
            source = ASTSource(kernel, signature, constexprs={"BLOCK": block})
            binary = triton.compile(
                source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}
            )
            assert binary.asm.get("cubin"), f"{attr}: no cubin"
        compiled += 1
    return compiled
