"""rms_norm and layer_norm (with and without the fused residual add) on the Triton interpreter."""

import pytest
import torch

from dsc.kernels.norms import layer_norm, rms_norm
from dsc.kernels.reference import layer_norm_reference, rms_norm_reference

SHAPES = [(3, 37), (2, 5, 19), (1, 300)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(shape, with_weight, assert_close, poisoned):
    torch.manual_seed(len(shape) + shape[-1])
    x = torch.randn(shape)
    w = torch.randn(shape[-1]) if with_weight else None
    out = rms_norm(x, w, 1e-6, out=poisoned(shape))
    assert_close(out, rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_residual(shape, assert_close, poisoned):
    torch.manual_seed(shape[-1])
    x, r, w = torch.randn(shape), torch.randn(shape), torch.randn(shape[-1])
    out, h = rms_norm(x, w, 1e-5, r, out=poisoned(shape), residual_out=poisoned(shape))
    ref_out, ref_h = rms_norm_reference(x, w, 1e-5, r)
    assert_close(out, ref_out)
    assert_close(h, ref_h)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(shape, affine, assert_close, poisoned):
    torch.manual_seed(shape[0] + shape[-1])
    x = torch.randn(shape) * 3 + 1
    w, b = (torch.randn(shape[-1]), torch.randn(shape[-1])) if affine else (None, None)
    out = layer_norm(x, w, b, 1e-5, out=poisoned(shape))
    assert_close(out, layer_norm_reference(x, w, b, 1e-5))


def test_layer_norm_residual(assert_close, poisoned):
    torch.manual_seed(3)
    shape = (4, 37)
    x, r = torch.randn(shape), torch.randn(shape)
    w, b = torch.randn(37), torch.randn(37)
    out, h = layer_norm(x, w, b, 1e-5, r, out=poisoned(shape), residual_out=poisoned(shape))
    ref_out, ref_h = layer_norm_reference(x, w, b, 1e-5, r)
    assert_close(out, ref_out)
    assert_close(h, ref_h)


def test_strided_rows(assert_close):
    torch.manual_seed(4)
    x = torch.randn(6, 50)[:, :37]  # row stride 50, last dim contiguous
    w = torch.randn(37)
    assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_bad_inputs_raise():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.randn(9), 1e-6)
    with pytest.raises(ValueError, match="bias must be"):
        layer_norm(x, torch.randn(8), torch.randn(3), 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, None, 1e-6, residual=torch.randn(3, 9))
    with pytest.raises(ValueError, match="floating-point"):
        rms_norm(torch.ones(3, 8, dtype=torch.int64), None, 1e-6)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm(x, None, 1e-6, out=torch.empty(3, 9))


def test_cpu_tensors_need_cuda(no_interpreter):
    with pytest.raises(ValueError, match="needs CUDA"):
        rms_norm(torch.randn(3, 8), None, 1e-6)
