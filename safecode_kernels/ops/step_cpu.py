"""The ``cpu`` backend: launcher for the C++ kernel in csrc/ (bound in python/)."""
from __future__ import annotations

def unavailable_reason():
    return "not built yet"

def step_cpu(inp, return_logits, return_stats):
    raise RuntimeError("not built")
