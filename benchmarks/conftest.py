"""pytest-benchmark glue: collect each case's mean time per backend and print, at the end of
the session, the ratio torch / fused kernel computed from the means measured in that same run."""

from __future__ import annotations

import pytest

_RESULTS = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_RESULTS] = {}


@pytest.fixture
def bench_results(request):
    """``{case: {backend: mean seconds}}``, shared by the whole session."""
    return request.config.stash[_RESULTS]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(_RESULTS, {})
    import torch
    from bench_step import BACKENDS, machine_description

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast = BACKENDS[device][1]
    rows = [(case, times) for case, times in results.items() if "torch" in times and fast in times]
    if not rows:
        return
    tr = terminalreporter
    tr.section(f"SafeCoDe step: torch / {fast} (means of this run)")
    tr.write_line(f"Machine: {machine_description(device)}")
    tr.write_line(f"| case | torch ms | {fast} ms | ratio torch/{fast} | {fast} GB/s |")
    tr.write_line("|---|---:|---:|---:|---:|")
    for case, times in rows:
        tr.write_line(
            f"| {case.name} | {times['torch'] * 1e3:.3f} | {times[fast] * 1e3:.3f} | "
            f"{times['torch'] / times[fast]:.1f}x | {case.input_bytes / times[fast] / 1e9:.1f} |"
        )
