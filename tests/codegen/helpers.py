"""Build fused regions from small torch functions and run them through generated kernels."""

from __future__ import annotations

import torch
import torch.fx as fx

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
        node: impl for node, impl in choose_kernels(gm, entry, CUDA).items()
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
