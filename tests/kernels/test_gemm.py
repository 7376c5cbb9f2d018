"""linear_fused and gated_linear against the reference, on the Triton interpreter."""

import pytest
import torch

from dsc.kernels.gemm import ACTIVATIONS, GemmConfig, gated_linear, linear_fused
from dsc.kernels.reference import gated_linear_reference, linear_reference

SMALL = GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias,with_residual", [(False, False), (True, True)])
def test_linear_fused(activation, with_bias, with_residual, assert_close, poisoned):
    torch.manual_seed(7)
    m, k, n = 35, 37, 19
    x, w = torch.randn(m, k), torch.randn(n, k)
    bias = torch.randn(n) if with_bias else None
    residual = torch.randn(m, n) if with_residual else None
    out = linear_fused(x, w, bias, activation, residual, out=poisoned((m, n)), config=SMALL)
    assert_close(out, linear_reference(x, w, bias, activation, residual))


def test_linear_fused_bias_only_and_strided(assert_close):
    torch.manual_seed(8)
    x = torch.randn(37, 20).t()  # [20, 37], column-major
    w = torch.randn(19, 37)
    bias, residual = torch.randn(19), torch.randn(19, 20).t()
    out = linear_fused(x, w, bias, "silu", residual, config=SMALL)
    assert_close(out, linear_reference(x, w, bias, "silu", residual))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_linear(activation, assert_close, poisoned):
    torch.manual_seed(9)
    m, k, n = 20, 37, 19
    x, w = torch.randn(m, k), torch.randn(2 * n, k)
    out = gated_linear(x, w, activation, out=poisoned((m, n)), config=SMALL)
    assert_close(out, gated_linear_reference(x, w, activation))


def test_default_configs(assert_close):
    torch.manual_seed(10)
    x, w = torch.randn(5, 24), torch.randn(34, 24)
    assert_close(linear_fused(x, w), linear_reference(x, w))
    assert_close(gated_linear(x, w), gated_linear_reference(x, w))


def test_bad_inputs_raise():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="unknown activation"):
        linear_fused(x, w, activation="swish")
    with pytest.raises(ValueError, match="K mismatch"):
        linear_fused(x, torch.randn(6, 9))
    with pytest.raises(ValueError, match="x must be 2-D"):
        linear_fused(x[None], w)
    with pytest.raises(ValueError, match="residual must be"):
        linear_fused(x, w, residual=torch.randn(6, 4))
    with pytest.raises(ValueError, match="bias must be"):
        linear_fused(x, w, bias=torch.randn(8))
    with pytest.raises(ValueError, match="odd row count"):
        gated_linear(x, torch.randn(7, 8))


def test_cpu_tensors_need_cuda(no_interpreter):
    with pytest.raises(ValueError, match="needs CUDA"):
        linear_fused(torch.randn(4, 8), torch.randn(6, 8))
    with pytest.raises(ValueError, match="needs CUDA"):
        gated_linear(torch.randn(4, 8), torch.randn(6, 8))
