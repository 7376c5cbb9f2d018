"""When programmatic dependent launch is used (dsc.kernels.pdl); its ordering is checked on the
GPU in tests/gpu/test_kernels_gpu.py."""

import pytest
import torch

from dsc.kernels import pdl


def test_pdl_is_off_on_the_cpu_and_under_the_interpreter(monkeypatch):
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_options(torch.device("cpu")) == {"USE_PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # The interpreter cannot run griddepcontrol, whatever device the tensors claim.
    assert not pdl.enabled(torch.device("cuda", 0))


def test_dsc_pdl_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("DSC_PDL", "0")
    assert pdl.launch_options(torch.device("cuda", 0)) == {"USE_PDL": False}


def test_dsc_pdl_gemv_picks_the_gemv_variant_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("DSC_PDL_GEMV", "0")
    gpu = torch.device("cuda", 0)
    assert pdl.gemv_options(gpu) == {"USE_PDL": False} and not pdl.gemv_release_late()
    monkeypatch.setattr(pdl, "enabled", lambda device: True)  # a Hopper GPU, for the others
    assert pdl.launch_options(gpu)["USE_PDL"] is True
    monkeypatch.setenv("DSC_PDL_GEMV", "late")
    assert pdl.gemv_options(gpu) == {"USE_PDL": True, "launch_pdl": True}
    assert pdl.gemv_release_late()
    monkeypatch.delenv("DSC_PDL_GEMV")  # the default: late
    assert pdl.gemv_options(gpu) == {"USE_PDL": True, "launch_pdl": True}
    assert pdl.gemv_release_late()
    monkeypatch.setenv("DSC_PDL_GEMV", "early")
    assert pdl.gemv_options(gpu) == {"USE_PDL": True, "launch_pdl": True}
    assert not pdl.gemv_release_late()
    monkeypatch.setenv("DSC_PDL_GEMV", "soon")
    with pytest.raises(ValueError, match="DSC_PDL_GEMV='soon'"):
        pdl.gemv_release_late()
    monkeypatch.setenv("DSC_PDL_GEMV", "late")
    assert pdl.prefetch_weights()
    monkeypatch.setenv("DSC_PDL_PREFETCH", "0")
    assert not pdl.prefetch_weights()
