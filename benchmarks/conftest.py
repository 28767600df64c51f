"""pytest-benchmark glue: collect each case's mean time per backend and print, at the end of
the session, the ratio torch / cpu computed from the means measured in that same run."""

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
    rows = [(case, times) for case, times in results.items() if "torch" in times and "cpu" in times]
    if not rows:
        return
    from bench_step import machine_description

    tr = terminalreporter
    tr.section("SafeCoDe step: torch / cpu (means of this run)")
    tr.write_line(f"Machine: {machine_description()}")
    tr.write_line("| case | torch ms | cpu ms | ratio torch/cpu | cpu GB/s |")
    tr.write_line("|---|---:|---:|---:|---:|")
    for case, times in rows:
        tr.write_line(f"| {case.name} | {times['torch'] * 1e3:.3f} | {times['cpu'] * 1e3:.3f} | "
                      f"{times['torch'] / times['cpu']:.1f}x | {case.input_bytes / times['cpu'] / 1e9:.1f} |")
