"""Shared setup of the op tests: the ``gpu`` marker for tests that need one (the Triton
interpreter on machines without a GPU is switched on in tests/conftest.py)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped (with the reason) without one")
