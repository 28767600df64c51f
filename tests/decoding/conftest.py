"""Fixtures of the decoding tests; the tiny models and request batches live in
safecode_kernels/testing/tiny_models.py."""

from __future__ import annotations

import pytest

from safecode_kernels.refusal import RefusalVocabulary
from safecode_kernels.testing.tiny_models import BUILDERS, FAMILIES, refusal_ids


@pytest.fixture(autouse=True)
def one_thread(single_torch_thread):
    """Every decoding test runs on one torch thread (see tests/conftest.py)."""


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    """``(model, processor, refusal)`` of one family."""
    model, processor = BUILDERS[family]()
    return model, processor, RefusalVocabulary(refusal_ids(processor.tokenizer))
