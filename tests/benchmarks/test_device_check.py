"""benchmarks/device_check.py's dry run: every part runs its code on the CPU with tiny sizes and
the report is written, so the script cannot rot between the rare runs on a GPU; and a part that
runs out of time loses nothing of the others'."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks import BENCHMARKS

SCRIPT = BENCHMARKS / "device_check.py"


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args],
        capture_output=True,
        text=True,
        cwd=BENCHMARKS.parent,
        timeout=900,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    proc = _run(out)
    return proc, out, json.loads((out / "device_check.json").read_text())


def test_every_part_runs(dry_run):
    proc, out, report = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["dry_run"] is True and list(report["parts"]) == ["grid", "step", "decoder", "e2e"]
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), (out / part["log"]).read_text()[-3000:])
        assert 0 < part["seconds"] <= part["timeout_s"]


def test_the_triton_tests_ran_or_say_why_not(dry_run):
    grid = dry_run[2]["parts"]["grid"]["result"]
    assert grid["files"] == ["tests/ops/test_step_triton.py"] or "tests/ops/test_step_triton.py" in grid["files"]
    assert grid["finished"] and not grid["failing"]
    assert grid["counts"].get("passed", 0) > 0 or grid["skip_reasons"]


def test_step_benchmark_rows(dry_run):
    step = dry_run[2]["parts"]["step"]["result"]
    assert step["exit_status"] == 0 and step["rows"]
    assert all(row["ratio"] > 0 and row["torch_ms"] > 0 for row in step["rows"])


def test_decoder_batched_against_alone(dry_run):
    rows = dry_run[2]["parts"]["decoder"]["result"]["rows"]
    assert {row["attention"] for row in rows} == {"sdpa", "eager"}
    assert {row["model"] for row in rows} == {"llava", "qwen2_vl", "llava, benchmark size (4 image tokens)"}
    for row in rows:
        assert "error" not in row and not row["nan"], row
        assert row["requests"] == (4 if "benchmark" in row["model"] else 3) and 0 <= row["agreement"] <= 1


def test_end_to_end_cases_and_files(dry_run):
    _, out, report = dry_run
    e2e = report["parts"]["e2e"]["result"]
    cases = [c["case"] for c in e2e["cases"]]
    assert cases == [f"{phase} B={b} no system prompt" for b in (1, 2) for phase in ("steered", "answer")]
    for case in e2e["cases"]:
        assert all(case["seconds"][name] > 0 for name in ("naive", "two_cache", "fused", "plain"))
    assert (out / "e2e" / "decode_bench.json").exists()
    text = (out / "device_check.md").read_text()
    assert "dry run" in text and all(f"## {name}" in text for name in report["parts"])


def test_a_part_out_of_time_keeps_the_others(tmp_path):
    """A part stopped at its limit is recorded as such, the next is skipped for want of time,
    and the report is still written."""
    proc = _run(tmp_path, "--parts", "grid", "step", "--total", "6")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["parts"]["grid"]["status"] == "timed out"
    assert report["parts"]["step"] == dict(status="skipped", reason="no time left", seconds=0.0)
    assert "timed out" in (tmp_path / "device_check.md").read_text()
