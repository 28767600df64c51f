"""report.json / report.md / report.png and the side-by-side comparison (scoring.report)."""

from __future__ import annotations

import json
import sys

import pytest

from safecode_kernels.evaluation.scoring.report import (
    compare,
    flatten_metrics,
    generation_summary,
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
    "base": {"model": "m", "method": "base", "recipe": "paper", "verdict": "auto", "judge": None},
    "safecode": {
        "model": "m",
        "method": "safecode",
        "recipe": "released",
        "verdict": "auto",
        "judge": {"kind": "self", "flow": "one-call", "on_unparseable": "safe"},
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
        "| method | base | safecode |",
        "| recipe | – | released |",
        "| verdicts | – | judge: self (one-call) |",
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
    with pytest.raises(FileNotFoundError, match="missing/report.json"):
        compare([tmp_path / "missing"])
    with pytest.raises(ValueError, match="at least one"):
        compare([])
