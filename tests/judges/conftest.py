"""Fixtures of the judge tests: a local chat-completions server and the tiny LLaVA."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from chat_server import ChatServer  # noqa: E402


@pytest.fixture
def chat_server():
    server = ChatServer().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from threads; on a busy 2-core machine they cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llava():
    from safecode_kernels.tiny import tiny_llava

    return tiny_llava()
