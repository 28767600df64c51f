"""Choosing the backend of the step op: by device, overridable per call or by ``SAFECODE_BACKEND``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

# Imported here, not per call (an import statement costs about half a microsecond on every
# step); none of them imports Triton itself.
from . import step_cpu, step_torch, step_triton

BACKENDS = ("torch", "cpu", "triton")

logger = logging.getLogger("safecode_kernels")
# (backend, reason) pairs already logged: each fallback is explained once per process.
_LOGGED_FALLBACKS: set[tuple[str, str]] = set()


def backend_status() -> dict[str, str | None]:
    """Each backend mapped to ``None`` when usable here, else the reason it is not."""
    return {"torch": None, "cpu": step_cpu.unavailable_reason(), "triton": step_triton.unavailable_reason()}


def resolve_backend(backend: str, device: torch.device) -> Callable:
    """The step implementation for ``backend`` on ``device``; ``"auto"`` picks the fastest."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = _env_backend()
    if backend == "auto":
        return _auto(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected 'auto' or one of {', '.join(BACKENDS)}")

    if backend == "torch":
        return step_torch.step_torch
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"the 'cpu' backend needs CPU tensors, got tensors on {device}")
        reason = step_cpu.unavailable_reason()
        if reason:
            raise RuntimeError(f"the 'cpu' backend is unavailable: {reason}")
        return step_cpu.step_cpu
    reason = step_triton.unavailable_reason(device)
    if reason:
        raise RuntimeError(f"the 'triton' backend is unavailable: {reason}")
    return step_triton.step_triton


# Under "auto", the devices whose Triton kernels ran once (from then on their errors are
# real errors) and those whose first build or launch failed (the torch backend runs there).
_TRITON_RAN: set[torch.device] = set()
_TRITON_BROKEN: dict[torch.device, str] = {}
# Bad input and CUDA running out of memory are not Triton's failures: they propagate.
_NOT_A_BUILD_FAILURE = (ValueError, TypeError, torch.cuda.OutOfMemoryError)


def _triton_else_torch(inputs, return_logits: bool, return_stats: bool, read_status: bool = True):
    """The Triton step, or, where its first kernel build or launch fails (no C compiler or
    Python headers for Triton's launcher in an image, say), the torch reference from then on,
    with the reason logged once. An explicit ``backend="triton"`` raises instead."""
    device = inputs.logits_real.device
    try:
        args = (inputs, return_logits, return_stats) if read_status else (inputs, return_logits, return_stats, False)
        out = step_triton.step_triton(*args)
    except _NOT_A_BUILD_FAILURE:
        raise
    except Exception as err:
        if device in _TRITON_RAN:
            raise
        first_line = (str(err).strip().splitlines() or [""])[0]
        reason = f"its first kernel build or launch failed: {type(err).__name__}: {first_line}"
        _TRITON_BROKEN[device] = reason
        _log_fallback("triton", device, reason)
        return step_torch.step_torch(*args)
    if device not in _TRITON_RAN:  # a set lookup per step; the add happens once
        _TRITON_RAN.add(device)
    return out


_ENV = "SAFECODE_BACKEND"
# os.environ.get costs about 2 us (it encodes the key, then decodes the value); the mapping
# behind CPython's os.environ answers the common "not set" in a dict lookup.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV) if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None


def _env_backend() -> str:
    """``SAFECODE_BACKEND``, read on every call (it may change at run time)."""
    if _ENV_KEY is not None and _ENV_KEY not in _ENV_DATA:
        return "auto"
    return os.environ.get(_ENV, "auto").strip().lower() or "auto"


def _auto(device: torch.device) -> Callable:
    """The fastest usable step on ``device``: the C++ kernel on the CPU, Triton on CUDA (the
    torch reference where Triton's kernels would not build), else the torch reference."""
    if device.type == "cpu":
        reason = step_cpu.unavailable_reason()
        if reason is None:
            return step_cpu.step_cpu
        _log_fallback("cpu", device, reason)
    elif device.type == "cuda":
        reason = step_triton.unavailable_reason(device) or _TRITON_BROKEN.get(device)
        if reason is None:
            return _triton_else_torch
        _log_fallback("triton", device, reason)
    return step_torch.step_torch


def _log_fallback(faster: str, device: torch.device, reason: str) -> None:
    """Say once per (backend, reason) why ``auto`` runs the slower torch reference."""
    key = (faster, reason)
    if key in _LOGGED_FALLBACKS:
        return
    _LOGGED_FALLBACKS.add(key)
    logger.warning(
        "safecode_step: backend 'auto' falls back to the slower 'torch' backend for %s tensors: "
        "the '%s' backend is unavailable: %s",
        device.type,
        faster,
        reason,
    )
