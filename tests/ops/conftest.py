"""Shared setup of the op tests: the Triton interpreter on machines without a GPU, and the
``gpu`` marker for tests that need one."""

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. triton.jit
    # reads this when a kernel is defined, so it must be set before the kernels are imported.
    # A GPU machine must not set it (the kernels would run interpreted).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped (with the reason) without one")
