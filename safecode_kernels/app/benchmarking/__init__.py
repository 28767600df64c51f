"""Benchmarks that must run from an installed package (the CLI's ``bench`` command).

- :mod:`.models`: the randomly initialised LLaVA-1.5 benchmark model, tokenizer, processor and
  requests, built offline from a config.
- :mod:`.decode`: the end-to-end decoding benchmark (naive loop, two-cache loop, fused
  decoder, plain generation, the lower bound), its JSON / markdown / PNG report, and
  ``main(argv)`` for script mode (``python -m safecode_kernels.app.benchmarking.decode --quick``).

Example::

    from safecode_kernels.app.benchmarking import decode
    decode.main(["--quick", "--out", "bench-results"])
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BENCH": "models",
    "TINY": "models",
    "LlavaSpec": "models",
    "bench_requests": "models",
    "build_llava": "models",
    "build_tokenizer": "models",
    "system_prompt": "models",
    "Settings": "decode",
    "main": "decode",
    "make_report": "decode",
    "markdown": "decode",
    "run": "decode",
    "write_report": "decode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that ``python -m safecode_kernels.app.benchmarking.decode`` does not import the
    # module twice (once through the package, once as __main__).
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
