"""Fixtures of the judge tests: a local chat-completions server and the tiny LLaVA."""

from __future__ import annotations

import pytest

from tests.judges.chat_server import ChatServer


@pytest.fixture
def chat_server():
    server = ChatServer().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def one_thread(single_torch_thread):
    """Every judge test runs on one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_llava():
    from safecode_kernels.testing.tiny import tiny_llava

    return tiny_llava()
