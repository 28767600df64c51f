"""report.json / report.md / report.png and the side-by-side comparison (scoring.report)."""

from __future__ import annotations

import json
import sys

import pytest

from safecode_kernels.evaluation.scoring.report import (
    compare,
    flatten_metrics,
    generation_summary,
    label_legend,
    model_name,
    read_report,
    render_markdown,
    write_report,
)


def report_of(run: str, attack: float, sd: float | None, unparsed=()) -> dict:
    return {
        "benchmark": "mm-safetybench",
        "run": run,
        "methods": ["base"],
        "scorer": "llm",
        "judge": "judge-model",
        "judge_template": None,
        "generations": 10,
        "n": 9,
        "unparsed": list(unparsed),
        "errors": 1,
        "label_counts": {"safe": 5, "unsafe": 4},
        "metrics": {"attack_rate": attack, "attack_rate_by_kind": {"SD": sd, "SD_TYPO": 0.5, "TYPO": 0.25}},
    }


def test_flatten_metrics():
    nested = {"accuracy": 0.5, "by_setting": {"chat": {"accuracy": 1.0}}, "r_by_kind": {"SD": None}}
    assert flatten_metrics(nested) == {"accuracy": 0.5, "by_setting.chat.accuracy": 1.0, "r_by_kind.SD": None}


def test_write_report(tmp_path):
    pytest.importorskip("matplotlib")
    report = report_of("run-base", 0.4, None, unparsed=["7", "9"])
    paths = write_report(tmp_path, report)
    assert json.loads(paths["json"].read_text()) == report == read_report(tmp_path)
    md = paths["md"].read_text()
    assert "# mm-safetybench: run-base" in md
    assert "| attack_rate | 0.400 |" in md and "| attack_rate_by_kind.SD | – |" in md
    assert "`7`, `9`" in md and "generation errors: 1" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]


def test_report_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        paths = write_report(tmp_path, report_of("r", 0.1, 0.2))
    assert paths["png"] is None and paths["json"].is_file() and paths["md"].is_file()
    assert not (tmp_path / "report.png").exists()


def test_markdown_truncates_long_unparsed_lists():
    md = render_markdown(report_of("r", 0.1, 0.2, unparsed=[str(i) for i in range(60)]), max_ids=5)
    assert "`4`" in md and "`5`" not in md and "and 55 more" in md


#: What run.json records (the fields generation_summary reads), per kind of run.
RUNS = {
    "base": {
        "model": "llava-hf/llava-1.5-7b-hf",
        "method": "base",
        "recipe": "paper",
        "verdict": "none",
        "judge": None,
        "max_new_tokens": 8,
        "steer_steps": 0,
        "noise_std": 0.1,
        "seed": 0,
        "split": None,
    },
    "safecode": {
        "model": "/models/llava-1.5-7b-hf",
        "method": "safecode",
        "recipe": "released",
        "verdict": "auto",
        "judge": {"kind": "self", "flow": "one-call", "on_unparseable": "safe"},
        "max_new_tokens": None,
        "steer_steps": 5,
        "noise_std": 0.1,
        "seed": 0,
        "split": "SD",
    },
    "fixed": {"model": "/models/llava", "method": "safecode", "recipe": "paper", "verdict": "unsafe", "judge": None},
    "openai": {
        "model": "m",
        "method": "safecode",
        "recipe": "paper",
        "verdict": "auto",
        "judge": {"kind": "openai", "url": None, "model": "gpt-4o-mini", "flow": "released"},
    },
    "python-judge": {"model": "m", "method": "safecode", "recipe": "paper", "verdict": "auto", "judge": "MyJudge"},
}


@pytest.mark.parametrize(
    "run, verdicts",
    [
        ("base", None),
        ("safecode", "judge: self (one-call)"),
        ("fixed", "fixed: unsafe"),
        ("openai", "judge: openai gpt-4o-mini (released)"),
        ("python-judge", "judge: MyJudge"),
    ],
)
def test_generation_summary(run, verdicts):
    summary = generation_summary(RUNS[run])
    assert summary["verdicts"] == verdicts and summary["method"] == RUNS[run]["method"]
    assert summary["recipe"] == (None if run == "base" else RUNS[run]["recipe"])
    assert generation_summary(None) is None
    line = render_markdown({**report_of(run, 0.5, 0.5), "generation": summary})
    assert f"Generation: method `{RUNS[run]['method']}`" in line and f"model `{RUNS[run]['model']}`" in line
    assert "Generation: unknown (no run.json)." in render_markdown(report_of(run, 0.5, 0.5))


def test_generation_summary_settings():
    """The settings that change answers, as run.json records them; `–` where it lacks one or the
    method uses none (base: no steering, no noise)."""
    base, safecode = generation_summary(RUNS["base"]), generation_summary(RUNS["safecode"])
    assert [base[k] for k in ("max_new_tokens", "steer_steps", "noise_std", "seed", "split")] == [
        8,
        None,
        None,
        None,
        "default",
    ]
    assert [safecode[k] for k in ("max_new_tokens", "steer_steps", "noise_std", "seed", "split")] == [
        "default",
        5,
        0.1,
        0,
        "SD",
    ]
    vcd = generation_summary({**RUNS["base"], "method": "vcd", "steer_steps": 3, "noise_std": 0.5, "seed": 7})
    assert (vcd["recipe"], vcd["steer_steps"], vcd["noise_std"], vcd["seed"]) == (None, 3, 0.5, 7)
    old = generation_summary(RUNS["fixed"])  # a run.json without the fields
    assert all(old[k] is None for k in ("max_new_tokens", "steer_steps", "noise_std", "seed", "split"))
    line = render_markdown({**report_of("s", 0.5, 0.5), "generation": safecode})
    assert "max_new_tokens default, steer_steps 5, noise_std 0.1, seed 0, split SD" in line
    line = render_markdown({**report_of("b", 0.5, 0.5), "generation": base})
    assert "max_new_tokens 8, steer_steps –, noise_std –, seed –, split default" in line


def test_model_name(tmp_path):
    assert model_name("/models/llava-1.5-7b-hf") == "llava-1.5-7b-hf"
    assert model_name("/models/llava-1.5-7b-hf/") == "llava-1.5-7b-hf"
    assert model_name("./llava") == "llava"
    assert model_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert model_name(None) is None


@pytest.mark.parametrize(
    "bench, scorer, counts, legend",
    [
        ("mossbench", "llm", {"0": 3}, "Labels (1: refused, 0: complied, null: unparsed): 0: 3."),
        ("jsonl", "refusal-strings", {"0": 2, "1": 1}, "Labels (1: a refusal phrase found, 0: none, null: unparsed)"),
        ("mm-safetybench", "refusal-strings", {"1": 1}, "(1: a refusal phrase found, 0: none"),
        ("mm-safetybench", "llm", {"safe": 5, "unsafe": 4}, "(unsafe: judged unsafe (counts as an attack), safe:"),
        ("hades", "llm", {"null": 1, "safe": 5}, "judged safe, null: unparsed): null: 1, safe: 5."),
        ("mssbench", "llm", {"2": 1}, "(0: refused, 1: helped and pointed out the risk, 2: helped without a risk"),
    ],
)
def test_labels_say_what_they_mean(bench, scorer, counts, legend):
    md = render_markdown({**report_of("r", 0.5, 0.5), "benchmark": bench, "scorer": scorer, "label_counts": counts})
    assert legend in md
    assert label_legend(bench, "other") == ""


def test_refusal_strings_reports_say_they_are_a_smoke_test():
    md = render_markdown({**report_of("r", 0.5, 0.5), "scorer": "refusal-strings", "judge": None})
    caveat = [line for line in md.splitlines() if "smoke test" in line]
    assert len(caveat) == 1 and "not a benchmark result" in caveat[0]
    assert "smoke test" not in render_markdown(report_of("r", 0.5, 0.5))


def test_compare(tmp_path):
    base, safecode = tmp_path / "base", tmp_path / "safecode"
    for d, r in ((base, report_of("base", 0.5, 0.75)), (safecode, report_of("safecode", 0.125, None))):
        r["generation"] = generation_summary(RUNS[d.name])
        d.mkdir()
        (d / "report.json").write_text(json.dumps(r))
    safecode_report = json.loads((safecode / "report.json").read_text())
    safecode_report["metrics"]["attack_rate_by_scenario"] = {"01-X": 0.0}  # a metric only one run has
    (safecode / "report.json").write_text(json.dumps(safecode_report))
    assert compare([base, safecode]).splitlines() == [
        "| metric | base | safecode |",
        "|---|---|---|",
        "| benchmark | mm-safetybench | mm-safetybench |",
        "| model | llava-hf/llava-1.5-7b-hf | llava-1.5-7b-hf |",
        "| method | base | safecode |",
        "| recipe | – | released |",
        "| verdicts | – | judge: self (one-call) |",
        "| max_new_tokens | 8 | default |",
        "| steer_steps | – | 5 |",
        "| noise_std | – | 0.1 |",
        "| seed | – | 0 |",
        "| split | default | SD |",
        "| scorer | llm | llm |",
        "| n | 9 | 9 |",
        "| unparsed | 0 | 0 |",
        "| errors | 1 | 1 |",
        "| attack_rate | 0.500 | 0.125 |",
        "| attack_rate_by_kind.SD | 0.750 | – |",
        "| attack_rate_by_kind.SD_TYPO | 0.500 | 0.500 |",
        "| attack_rate_by_kind.TYPO | 0.250 | 0.250 |",
        "| attack_rate_by_scenario.01-X | – | 0.000 |",
    ]


def test_compare_same_folder_names_and_errors(tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent / "run").mkdir(parents=True)
        (tmp_path / parent / "run" / "report.json").write_text(json.dumps(report_of("run", 0.5, 0.5)))
    header = compare([tmp_path / "a" / "run", tmp_path / "b" / "run"]).splitlines()[0]
    assert str(tmp_path / "a" / "run") in header and str(tmp_path / "b" / "run") in header
    (tmp_path / "unscored").mkdir()
    with pytest.raises(FileNotFoundError, match="unscored/report.json not found: score the run first"):
        compare([tmp_path / "unscored"])
    with pytest.raises(FileNotFoundError, match="^run folder not found: .*missing$"):
        compare([tmp_path / "missing"])
    with pytest.raises(ValueError, match="at least one"):
        compare([])
