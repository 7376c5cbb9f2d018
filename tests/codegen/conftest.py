"""Code generation tests run the generated Triton kernels on the CPU through the interpreter.

TRITON_INTERPRET must be set before triton is imported anywhere: `triton.jit` decides at decoration
time whether a kernel is compiled or interpreted (generated modules are imported when a plan step
first resolves them, after this file ran). Run these apart from tests/gpu.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (an all-zero reference compares absolutely)."""
    diff = (out.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


@pytest.fixture
def assert_close():
    """Check shape, dtype, finiteness and relative error of an output against a reference."""

    def check(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
        assert torch.isfinite(out).all(), "output holds NaN/inf (an element left unwritten?)"
        err = relative_error(out, ref)
        assert err <= tol, f"relative error {err:.3g} > {tol}"

    return check
