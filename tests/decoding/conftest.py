"""Fixtures of the decoding tests; the tiny models and request batches live in tiny_models.py."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import BUILDERS, FAMILIES, refusal_ids  # noqa: E402

from safecode_kernels.refusal import RefusalVocabulary  # noqa: E402


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
