"""Test-session setup shared by every folder.

Without a GPU, Triton kernels run through the interpreter. TRITON_INTERPRET must be set before
any module imports triton (`triton.jit` decides at decoration time), and collection of
tests/gpu imports kernel modules early — so it is set here, at the root, before collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
