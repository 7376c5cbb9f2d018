"""Kernel tests run on the CPU through the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported anywhere: `triton.jit` decides at decoration
time whether a kernel is compiled or interpreted. Run these apart from tests/gpu.
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
    """Check shape, dtype, finiteness and relative error of a kernel output against a reference."""

    def check(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
        assert torch.isfinite(out).all(), "output holds NaN/inf (an element left unwritten?)"
        err = relative_error(out, ref)
        assert err <= tol, f"relative error {err:.3g} > {tol}"

    return check


@pytest.fixture
def no_interpreter(monkeypatch):
    """Pretend the interpreter is off, so CPU tensors must be refused."""
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)


@pytest.fixture
def poisoned():
    """Make output buffers full of NaN: any element a kernel fails to write shows up."""

    def make(shape, dtype=torch.float32) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype)

    return make
