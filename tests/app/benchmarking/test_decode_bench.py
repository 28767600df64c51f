"""Smoke test of the end-to-end decoding benchmark on the tiny LLaVA (seconds, not minutes):
every decoder runs, the steered decoders agree token for token, the decoder without steering
agrees with the model's own ``generate``, and the report files name the machine."""

from __future__ import annotations

import json

import pytest
import torch

from safecode_kernels.app.benchmarking import decode as bench
from safecode_kernels.app.benchmarking.models import (
    BENCH,
    TINY,
    bench_requests,
    build_llava,
    build_tokenizer,
    system_prompt,
)


@pytest.fixture(scope="module")
def report():
    settings = bench.Settings(spec=TINY, batches=(1, 3), reps=1, steer_steps=3, answer_tokens=8, system_tokens=60)
    threads = torch.get_num_threads()
    result = bench.run(settings, log=lambda line: None)
    assert torch.get_num_threads() == threads  # restored
    return result


def test_every_case_and_decoder_is_measured(report):
    cases = {(r["phase"], r["batch"], r["system_prompt"]) for r in report["results"]}
    assert cases == {(p, b, s) for p in bench.PHASES for b in (1, 3) for s in (False, True)}
    for r in report["results"]:
        for name in (*bench.TIMED, "lower_bound", "lower_bound_unsteered"):
            assert r["seconds"][name] > 0 and r["cpu_seconds"][name] > 0
        assert r["seconds"]["lower_bound"] == pytest.approx(r["seconds"]["plain"] + r["seconds"]["noised_prefill"])
        assert r["ratios"]["naive_speedup_vs_naive"] == pytest.approx(1.0)
        assert r["ratios"]["plain_vs_plain"] == pytest.approx(1.0)


def test_decoders_agree(report):
    for r in report["results"]:
        # naive, two-cache and fused decoders: the same greedy ids.
        assert r["steered_ids_agree"], r["case"]
        # The decoder without steering gives what HF generate gives.
        assert r["plain_ids_agree"], r["case"]


def test_report_files(report, tmp_path):
    paths = bench.write_report(report, str(tmp_path))
    machine = report["machine"]
    assert "logical CPUs" in machine and "threads: 1" in machine
    saved = json.loads(open(paths["json"]).read())
    assert saved["machine"] == machine and len(saved["results"]) == len(report["results"])
    text = open(paths["md"]).read()
    assert machine in text and "vs naive" in text and "vs plain" in text and "lower bound" in text
    # Measured ratios only: no pass/fail table of internal targets, no tracker references.
    for report_text in (text, open(paths["json"]).read()):
        assert "goal" not in report_text.lower() and "issue" not in report_text.lower()
    if "png" in paths:
        with open(paths["png"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    else:
        pytest.importorskip("matplotlib")  # the plot is only skipped without matplotlib


def test_script_mode(tmp_path, capsys):
    out = tmp_path / "out"
    assert bench.main(["--tiny", "--quick", "--phases", "steered", "--no-system", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Machine:" in printed and "fused decoder" in printed
    assert "goal" not in printed.lower() and "issue" not in printed.lower()
    assert (out / "decode_bench.json").exists() and (out / "decode_bench.md").exists()


def test_benchmark_model_shapes():
    """The benchmark model's sizes (built without running it) and its tokenizer."""
    assert BENCH.image_tokens == 576 and BENCH.hidden_size == 512 and BENCH.num_layers == 4
    tokenizer = build_tokenizer(BENCH.vocab_size)
    assert len(tokenizer) == BENCH.vocab_size == 32000
    text = system_prompt(tokenizer, 300)
    assert 300 <= len(tokenizer.encode(text, add_special_tokens=False)) < 340
    ids = tokenizer.encode("I'm sorry, but I cannot help with that.", add_special_tokens=False)
    assert tokenizer.decode(ids) == "I'm sorry, but I cannot help with that."
    model, processor = build_llava(TINY)
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == TINY.vocab_size
    images, prompts, verdicts = bench_requests(4)
    assert len({im.size for im in images}) == 4 and verdicts == ["unsafe", "safe", "none", "unsafe"]
    encoded = processor(images=images[:1], text=["<s>USER: <image>\nHi ASSISTANT:"], return_tensors="pt")
    assert int((encoded["input_ids"] == model.config.image_token_id).sum()) == TINY.image_tokens


def test_committed_results_report_ratios_only():
    """The committed CPU results read as measurements: no table of internal targets."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
    saved = json.loads((results / "decode_bench_cpu.json").read_text())
    assert "goals" not in saved and saved["results"]
    text = (results / "decode_bench_cpu.md").read_text()
    assert text == bench.markdown(saved)  # the markdown is the JSON's, rendered by this code
    assert "goal" not in text.lower() and "issue" not in text.lower()
