"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. Triton reads
    # this when it defines a kernel, its own library functions included (at `import triton`), so
    # it is set here, before any test module is collected: some import triton on the way (a
    # backend status query). A GPU machine must not set it (the kernels would run interpreted).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def single_torch_thread():
    """One torch thread for the test, restored afterwards. Tiny models gain nothing from
    threads, and on a busy 2-core machine two spinning intra-op threads make them several
    times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def saved_llava(tmp_path_factory):
    """A folder holding ``llava/``, the tiny LLaVA of ``testing.tiny.tiny_llava()`` written once
    per session with ``save_pretrained`` (model and processor), and ``image.png``
    (``random_image(7, 64)``). Shared by the command-line tests: read it, never write into it (a
    module that needs other files beside the model links ``llava/`` into a folder of its own)."""
    from safecode_kernels.testing.tiny import random_image, tiny_llava

    root = tmp_path_factory.mktemp("saved_llava")
    model, processor = tiny_llava()
    model.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    random_image(7, 64).save(root / "image.png")
    return root
