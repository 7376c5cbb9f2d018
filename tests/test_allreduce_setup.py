"""Setting up the symmetric buffers (dsc/runtime/allreduce.py) without GPUs: an allocation that
fails leaves the device to the other transports instead of half-joining a rendezvous."""

import torch

from dsc.runtime import allreduce


def test_a_failed_allocation_marks_the_device_unavailable(monkeypatch):
    device = torch.device("cuda", 7)  # only a key here: nothing touches it
    monkeypatch.setattr(allreduce, "_unavailable", set())

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert allreduce._allocate_everywhere(out_of_memory, device) is None
    assert device in allreduce._unavailable


def test_a_successful_allocation_is_returned(monkeypatch):
    device = torch.device("cuda", 7)
    monkeypatch.setattr(allreduce, "_unavailable", set())
    buffer = torch.zeros(4)
    assert allreduce._allocate_everywhere(lambda: buffer, device) is buffer
    assert device not in allreduce._unavailable
