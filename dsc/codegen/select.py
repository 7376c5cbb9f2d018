"""Kernel selection: each dsc/aten op has candidate implementations, each with a checker.

The first candidate whose checker accepts the node (dtype, shapes, device, entry point) is chosen;
when none applies the op runs as itself (torch). The choice per node is kept in the Program and
shown by `report()` and `dsc inspect`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

import dsc.ops.fused  # noqa: F401  (registers dsc::fused_region)
from dsc.codegen import triton_codegen
from dsc.target import Target

__all__ = ["Candidate", "CANDIDATES", "choose_kernels"]

aten = torch.ops.aten
_GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Candidate:
    impl: str | Callable[[fx.Node], str]  # the step op the runtime calls (or its name per node)
    op: object  # the op overload it implements
    applies: Callable[[fx.Node, str, Target], bool]  # (node, entry point, target)


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _on_gpu(node: fx.Node, target: Target) -> bool:
    val = _val(node)
    return target.device == "cuda" and val is not None and val.dtype in _GPU_DTYPES


def _small_batch_linear(node: fx.Node, program: str, target: Target) -> bool:
    # Decode steps multiply a few rows by each weight: a bandwidth-bound GEMV the small-batch
    # kernel streams at copy speed; prefill rows go to cuBLAS.
    x, weight = _val(node.args[0]), _val(node.args[1])
    return (
        program == "decode" and _on_gpu(node, target) and weight is not None and x is not None
        and weight.dim() == 2 and x.dtype == weight.dtype
    )


def _norm(node: fx.Node, program: str, target: Target) -> bool:
    x = _val(node.args[0])
    out = _val(node)
    weight = _val(node.args[1])
    return _on_gpu(node, target) and x is not None and out is not None and x.dtype == out.dtype and (
        weight is None or weight.dtype == x.dtype
    )


def _attention(node: fx.Node, program: str, target: Target) -> bool:
    # The kernels take queries and keys of one head size (past 256 lanes by chunks, up to
    # 1024: absorbed latent attention's 576) and values of their own, up to 512.
    q, k, v = (_val(a) for a in node.args[:3])
    return _on_gpu(node, target) and None not in (q, k, v) and (
        q.shape[-1] == k.shape[-1] <= 1024 and v.shape[-1] <= 512
    )


def _rotary_attention(node: fx.Node, program: str, target: Target) -> bool:
    # The decode kernel rotates whole rows only: keys a single product takes.
    q = _val(node.args[0])
    return _attention(node, program, target) and q.shape[-1] <= 256


def _qkv_attention(node: fx.Node, program: str, target: Target) -> bool:
    x, weight, cache = _val(node.args[0]), _val(node.args[1]), _val(node.args[7])
    return (_on_gpu(node, target) and x is not None and weight is not None and cache is not None
            and x.dtype == weight.dtype and cache.shape[-1] <= 256)


def _rotary(node: fx.Node, program: str, target: Target) -> bool:
    x, cos = _val(node.args[0]), _val(node.args[1])
    return _on_gpu(node, target) and x is not None and x.dim() == 4 and cos is not None and (
        cos.dim() == 4 and x.shape[-1] % 2 == 0
    )


def _gated(node: fx.Node, program: str, target: Target) -> bool:
    gate, up = _val(node.args[0]), _val(node.args[1])
    return _on_gpu(node, target) and gate is not None and up is not None and (
        gate.shape == up.shape and gate.dtype == up.dtype
    )


def _moe(node: fx.Node, program: str, target: Target) -> bool:
    # The kernels read x, gate_up and down in one dtype; the op's activations are all theirs;
    # the routing kernel splits the experts into a power-of-two number of groups.
    x, gate_up, down = _val(node.args[0]), _val(node.args[2]), _val(node.args[3])
    groups = node.kwargs.get("groups", 1)
    return _on_gpu(node, target) and None not in (x, gate_up, down) and (
        x.dtype == gate_up.dtype == down.dtype and groups & (groups - 1) == 0
    )


def _recurrent(node: fx.Node, program: str, target: Target) -> bool:
    # The step kernels take one token of any head sizes; a prompt runs the op's torch form.
    return _on_gpu(node, target)


def _generated_region(node: fx.Node, program: str, target: Target) -> bool:
    # Generated Triton kernels are for GPUs; elsewhere the region runs as its reference op.
    return target.device == "cuda" and triton_codegen.supports(node.args[1])


def _region_kernel(node: fx.Node) -> str:
    return "kernel::" + triton_codegen.kernel_name(node.args[1])


CANDIDATES: list[Candidate] = [
    Candidate("cuda::rotary", torch.ops.dsc.rotary.default, _rotary),
    Candidate("cuda::gated_activation", torch.ops.dsc.gated_activation.default, _gated),
    Candidate("cuda::linear_small_batch", aten.linear.default, _small_batch_linear),
    Candidate("cuda::rms_norm", torch.ops.dsc.rms_norm.default, _norm),
    Candidate("cuda::layer_norm", torch.ops.dsc.layer_norm.default, _norm),
    Candidate("cuda::cached_attention", torch.ops.dsc.cached_attention.default, _attention),
    Candidate("cuda::rotary_cached_attention", torch.ops.dsc.rotary_cached_attention.default,
              _rotary_attention),
    Candidate("cuda::attention", torch.ops.dsc.attention.default, _attention),
    Candidate("cuda::qkv_cached_attention", torch.ops.dsc.qkv_cached_attention.default,
              _qkv_attention),
    Candidate("cuda::moe", torch.ops.dsc.moe.default, _moe),
    Candidate("cuda::cached_causal_conv1d", torch.ops.dsc.cached_causal_conv1d.default,
              _recurrent),
    Candidate("cuda::cached_gated_delta_rule", torch.ops.dsc.cached_gated_delta_rule.default,
              _recurrent),
    Candidate("cuda::cached_ssm_scan", torch.ops.dsc.cached_ssm_scan.default, _recurrent),
    Candidate(_region_kernel, torch.ops.dsc.fused_region.default, _generated_region),
]


def choose_kernels(gm: fx.GraphModule, program: str, target: Target) -> dict[str, str]:
    """node name -> implementation, for every node a candidate accepts."""
    chosen: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for cand in CANDIDATES:
            if node.target is cand.op and cand.applies(node, program, target):
                chosen[node.name] = cand.impl(node) if callable(cand.impl) else cand.impl
                break
    return chosen
