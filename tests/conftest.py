"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_torch_thread():
    """One torch thread for the test, restored afterwards. Tiny models gain nothing from
    threads, and on a busy 2-core machine two spinning intra-op threads make them several
    times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
