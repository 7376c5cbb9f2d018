"""When programmatic dependent launch is used (dsc.kernels.pdl); its ordering is checked on the
GPU in tests/gpu/test_kernels_gpu.py."""

import torch

from dsc.kernels import pdl


def test_pdl_is_off_on_the_cpu_and_under_the_interpreter(monkeypatch):
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_options(torch.device("cpu")) == {"USE_PDL": 0}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # The interpreter cannot run griddepcontrol, whatever device the tensors claim.
    assert not pdl.enabled(torch.device("cuda", 0))


def test_dsc_pdl_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("DSC_PDL", "0")
    assert pdl.launch_options(torch.device("cuda", 0)) == {"USE_PDL": 0}


def test_dsc_pdl_picks_the_order(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(pdl, "_hopper_or_newer", lambda index: True)
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("DSC_PDL", raising=False)
    assert pdl.launch_options(cuda) == {"USE_PDL": 2, "launch_pdl": True}
    monkeypatch.setenv("DSC_PDL", "1")
    assert pdl.launch_options(cuda) == {"USE_PDL": 1, "launch_pdl": True}
    monkeypatch.setattr(pdl, "_hopper_or_newer", lambda index: False)
    assert pdl.mode(cuda) == 0
