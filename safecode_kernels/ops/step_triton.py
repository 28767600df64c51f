"""The ``triton`` backend of the step op (GPU). Not implemented yet."""

from __future__ import annotations


def unavailable_reason(device=None) -> str | None:
    return "the Triton kernel is not implemented yet"


def step_triton(inp, return_logits, return_stats):  # pragma: no cover - guarded by dispatch
    raise RuntimeError(unavailable_reason())
