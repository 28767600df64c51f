"""benchmarks/device_check.py's dry run: every part runs its code on the CPU with tiny sizes and
the report is written, so the script cannot rot between the rare runs on a GPU; and a part that
runs out of time loses nothing of the others'. The decoder part's host-sync count runs in this
process too: its reads and steps against the test's own count, and its sync bookkeeping on
warnings of the same text as torch's (no CUDA here to raise real ones)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from safecode_kernels.decoding import SafeCoDeDecoder
from safecode_kernels.decoding import decoder as decoder_module
from safecode_kernels.refusal import RefusalVocabulary
from safecode_kernels.testing.tiny_models import BUILDERS, PARAMS, batch, refusal_ids
from tests.benchmarks import BENCHMARKS, load_script

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
    assert "tests/ops/test_step_triton.py" in grid["files"]
    # The other CUDA-only tests come after the Triton files, and each of them exists.
    device_check = load_script("device_check")
    assert grid["files"][-len(device_check.GPU_TESTS) :] == list(device_check.GPU_TESTS)
    for test in device_check.GPU_TESTS:
        path, _, name = test.partition("::")
        assert os.path.isfile(os.path.join(device_check.REPO, path)), test
        assert not name or f"def {name}(" in open(os.path.join(device_check.REPO, path)).read(), test
    assert grid["finished"] and not grid["failing"]
    assert grid["counts"].get("passed", 0) > 0 or grid["skip_reasons"]


def test_step_benchmark_rows(dry_run):
    step = dry_run[2]["parts"]["step"]["result"]
    assert step["exit_status"] == 0 and step["rows"]
    assert all(row["ratio"] > 0 and row["torch_ms"] > 0 for row in step["rows"])
    # The dry run takes the GPU path: the Triton op and its launches alone (the kernel column).
    assert "--device cuda" in step["command"] and "--dry-run" in step["command"]
    assert all(row["fast_backend"] == "triton" and row["kernel_ms"] > 0 for row in step["rows"])


def test_decoder_batched_against_alone(dry_run):
    rows = dry_run[2]["parts"]["decoder"]["result"]["rows"]
    assert {row["attention"] for row in rows} == {"sdpa", "eager"}
    assert {row["model"] for row in rows} == {"llava", "qwen2_vl", "llava, benchmark size (4 image tokens)"}
    for row in rows:
        assert "error" not in row and not row["nan"], row
        assert row["requests"] == (4 if "benchmark" in row["model"] else 3) and 0 <= row["agreement"] <= 1


def test_decoder_host_syncs_recorded(dry_run):
    """The dry run records the host-sync cases without CUDA figures, and says why."""
    _, out, report = dry_run
    syncs = report["parts"]["decoder"]["result"]["host_syncs"]
    assert syncs["cuda_syncs_reason"] == "no CUDA device"
    assert [(c["recipe"], c["sampling"]) for c in syncs["cases"]] == [
        ("paper", "greedy"),
        ("paper", "sampled"),
        ("released", "greedy"),
        ("released", "sampled"),
    ]
    for case in syncs["cases"]:
        assert "error" not in case and case["cuda_syncs"] is None and case["steps"] > 0, case
    text = (out / "device_check.md").read_text()
    assert "### Host syncs per decoding step" in text and "CUDA syncs not measured: no CUDA device." in text


def test_host_syncs_reads_and_steps_on_the_cpu(monkeypatch, single_torch_thread):
    """Every case's steps and ``_read_step`` calls equal the test's own count of the same runs
    (each case runs twice: a warm-up and the counted run, identical with the same seed); the
    recipes read once a step; the wrapped functions are restored afterwards."""
    device_check = load_script("device_check")
    counted = dict(reads=0, steps=0)
    real_read, real_choose = decoder_module._read_step, decoder_module._Run.choose

    def read_step(values):
        counted["reads"] += 1
        return real_read(values)

    def choose(run, logits):
        counted["steps"] += 1
        return real_choose(run, logits)

    monkeypatch.setattr(decoder_module, "_read_step", read_step)
    monkeypatch.setattr(decoder_module._Run, "choose", choose)
    methods = {name: vars(decoder_module._Run)[name] for name in device_check.STEP_METHODS}
    record = device_check.host_syncs("cpu")
    assert decoder_module._read_step is read_step
    assert {name: vars(decoder_module._Run)[name] for name in device_check.STEP_METHODS} == methods

    cases = record["cases"]
    assert record["cuda_syncs_reason"] == "no CUDA device" and len(cases) == len(device_check.SYNC_CASES)
    for case in cases:
        assert "error" not in case, case
        assert case["cuda_syncs"] is None and case["cuda_syncs_per_step"] is None and case["sites"] == []
        assert case["decoder_reads_by_place"].get("outside", 0) == 0
        assert case["decoder_reads"] >= case["steps"]  # every step reads its tokens
    assert counted == dict(reads=2 * sum(c["decoder_reads"] for c in cases), steps=2 * sum(c["steps"] for c in cases))
    tokens = device_check.SYNC_TOKENS
    for case in cases:
        if case["recipe"] == "paper":  # no end-of-sequence token: every answer takes every step
            assert (case["steps"], case["decode_steps"], case["tokens"]) == (tokens, tokens - 1, 3 * tokens)
        # Both recipes read once a step (the released one's guard cut no prefix of these answers).
        assert case["decoder_reads"] == case["steps"] and case["reads_per_step"] == 1.0

    text = "\n".join(device_check._md_decoder(dict(rows=[], host_syncs=record)))
    assert "CUDA syncs not measured: no CUDA device." in text
    assert f"| paper | greedy | {tokens} | {tokens} | 1.00 | - | - | - | - |  |" in text


#: What torch warns in sync debug mode, from the Python frame that called the op (stacklevel 1).
SYNC_TEXT = "called a synchronizing CUDA operation"


def test_sync_warnings_counted_by_place(monkeypatch, single_torch_thread):
    """With a sync debug context (here one that does nothing), every warning of torch's sync
    text counts where it was raised: one per read in ``choose``, one per ``decode_step`` and one
    before the run (outside the steps), each with its place and the decoder's frames to it;
    other warnings are listed apart."""
    device_check = load_script("device_check")
    real_read, real_step, real_decode = (
        decoder_module._read_step,
        decoder_module._Run.decode_step,
        decoder_module._decode,
    )

    def read_step(values):
        warnings.warn(SYNC_TEXT, stacklevel=1)
        return real_read(values)

    def decode_step(run, tokens, small_batch):
        warnings.warn(SYNC_TEXT, stacklevel=1)
        return real_step(run, tokens, small_batch)

    def decode(*args, **kwargs):
        warnings.warn(SYNC_TEXT, stacklevel=1)
        warnings.warn("not a sync", stacklevel=1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(decoder_module, "_read_step", read_step)
    monkeypatch.setattr(decoder_module._Run, "decode_step", decode_step)
    monkeypatch.setattr(decoder_module, "_decode", decode)
    model, processor = BUILDERS["llava"]()
    refusal = RefusalVocabulary(refusal_ids(processor.tokenizer))
    decoder = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=2, refusal=refusal)
    images, prompts, verdicts, kwargs = batch(processor, "shared")
    call = functools.partial(decoder.generate, images, prompts, verdicts, max_new_tokens=4, eos_token_id=[], **kwargs)
    case = device_check._count_syncs(call, contextlib.nullcontext)

    assert (case["steps"], case["decoder_reads"]) == (4, 4)
    assert case["cuda_syncs_by_place"] == dict(choose=4, drop_rows=0, decode_step=3, outside=1)
    assert case["cuda_syncs"] == 8 and case["cuda_syncs_per_step"] == 7 / 4
    assert case["other_warnings"] == ["UserWarning: not a sync"]
    here = "tests/benchmarks/test_device_check.py:"
    assert len(case["sites"]) == 3 and all(site["site"].startswith(here) for site in case["sites"])
    by_place = {tuple(site["where"]): site for site in case["sites"]}
    assert {place: site["count"] for place, site in by_place.items()} == {
        ("outside",): 1,
        ("choose",): 4,
        ("decode_step",): 3,
    }
    read = by_place[("choose",)]
    assert read["stack"].startswith(f"{read['site']} read_step < safecode_kernels/decoding/decoder.py:")
    assert " choose" in read["stack"] and "benchmarks/device_check.py" not in read["stack"]
    record = dict(model="llava", device="cpu", requests=3, tokens=4, steer_steps=2, cuda_syncs_reason=None)
    record["cases"] = [dict(case, recipe="paper", sampling="greedy")]
    text = "\n".join(device_check._md_decoder(dict(rows=[], host_syncs=record)))
    assert "| paper | greedy | 4 | 4 | 1.00 | 8 | 4 / 0 / 3 | 1 | 1.75 |  |" in text
    assert f"- paper, greedy: `{read['site']}` x4 (4 in choose): {read['stack']}" in text


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
