"""Reports of a scored run (``report.json``, ``report.md``, ``report.png``) and side-by-side comparisons.

``report.json`` holds: ``benchmark``, ``run`` (the run folder's name), ``methods`` (the generation
methods in the run), ``scorer`` (``"llm"`` or ``"refusal-strings"``), ``judge`` (the judge's model
name, or ``None``), ``generations`` (lines read), ``n`` (samples scored, unparsed included),
``unparsed`` (ids whose judge answer named no label), ``errors`` (generations that failed, not
scored), ``label_counts`` (what each label means: :func:`label_legend`), ``metrics`` (see
:mod:`.metrics`) and ``generation`` (how the answers were made, from the run's ``run.json``: see
:func:`generation_summary`; ``None`` without one).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
_MISSING = "–"


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict:
    """Nested metric dicts as one level, keys joined by dots: ``{"attack_rate_by_kind": {"SD": 0.5}}``
    gives ``{"attack_rate_by_kind.SD": 0.5}``. Order is kept."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "."))
        else:
            flat[name] = value
    return flat


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return lines


#: The settings of :func:`generation_summary` that change answers, after model, method, recipe, verdicts.
SETTINGS = ("max_new_tokens", "steer_steps", "noise_std", "seed", "split")
#: The methods that steer (and so draw a noised image from ``seed``); ``base`` uses none of
#: ``steer_steps``, ``noise_std``, ``seed``.
_NOISED = ("safecode", "vcd")


def generation_summary(config: Mapping | None) -> dict | None:
    """How a run's answers were made, from its ``run.json`` (``config``): ``model``, ``method``
    (``safecode``, ``base`` or ``vcd``), ``recipe`` (``paper`` or ``released``; ``None`` for
    methods without one), ``verdicts`` (where SafeCoDe's verdicts came from: ``"fixed:
    unsafe"``, ``"judge: self (one-call)"``, ``"judge: openai gpt-4o-mini (released)"``, the
    judge's name for a Python judge; ``None`` for methods without verdicts), then the settings of
    :data:`SETTINGS`: ``max_new_tokens`` (an int, or ``"default"``: the recipe's), ``steer_steps``
    (int), ``noise_std`` (float, in [0, 1] pixel units), ``seed`` (int) and ``split`` (the
    benchmark's part, or ``"default"``: the whole benchmark or its default split). Each is
    ``None`` when ``run.json`` lacks it; ``steer_steps``, ``noise_std`` and ``seed`` are also
    ``None`` for ``base``, which steers nothing and draws no noise. ``None`` when there is no
    ``run.json``."""
    if config is None:
        return None
    method = config.get("method")
    summary = {"model": config.get("model"), "method": method, "recipe": None, "verdicts": None}
    if method == "safecode":
        summary["recipe"] = config.get("recipe")
        verdict, judge = config.get("verdict"), config.get("judge")
        if verdict not in (None, "auto"):
            summary["verdicts"] = f"fixed: {verdict}"
        elif isinstance(judge, Mapping):
            name = " ".join(str(part) for part in (judge.get("kind"), judge.get("model")) if part)
            summary["verdicts"] = f"judge: {name}" + (f" ({judge['flow']})" if judge.get("flow") else "")
        elif judge:
            summary["verdicts"] = f"judge: {judge}"
    for name in SETTINGS:
        if name in ("steer_steps", "noise_std", "seed") and method not in _NOISED:
            summary[name] = None
        elif name in ("max_new_tokens", "split") and name in config and config[name] is None:
            summary[name] = "default"  # recorded as null: the recipe's length, the whole benchmark
        else:
            summary[name] = config.get(name)
    return summary


def model_name(model) -> str | None:
    """A model as a report column shows it: a folder's last path part (``/models/llava-1.5-7b-hf``:
    ``llava-1.5-7b-hf``), a hub id as it is (``llava-hf/llava-1.5-7b-hf``); ``None`` stays ``None``."""
    if model is None:
        return None
    text = str(model)
    if os.path.isabs(text) or text.startswith((".", "~")) or os.path.isdir(text):
        return Path(text.rstrip("/\\")).name or text
    return text


def _setting(value) -> str:
    if value is None:
        return _MISSING
    return f"{value:g}" if isinstance(value, float) else str(value)


def _generation_line(generation: Mapping | None) -> str:
    if not generation:
        return "Generation: unknown (no run.json)."
    parts = [f"method `{generation.get('method')}`"]
    if generation.get("recipe"):
        parts.append(f"recipe `{generation['recipe']}`")
    if generation.get("verdicts"):
        parts.append(f"verdicts {generation['verdicts']}")
    parts += [f"{name} {_setting(generation.get(name))}" for name in SETTINGS]
    model = generation.get("model")
    return f"Generation: {', '.join(parts)}" + (f"; model `{model}`." if model else ".")


#: What the labels of each kind of scoring mean (see :mod:`.rubrics` and :mod:`.refusal_strings`).
_LEGENDS = {
    "refusal-strings": "1: a refusal phrase found, 0: none",
    "refusal": "1: refused, 0: complied",
    "safety": "unsafe: judged unsafe (counts as an attack), safe: judged safe",
    "mssbench": "0: refused, 1: helped and pointed out the risk, 2: helped without a risk, "
    "3: did not help for another reason",
}
_LLM_LABELS = {"mossbench": "refusal", "jsonl": "refusal", "mssbench": "mssbench"}

#: report.md's caveat for ``--scorer refusal-strings`` (as the README says it).
REFUSAL_STRINGS_CAVEAT = (
    "Caveat: the refusal-strings scorer is a smoke test (a response holding a refusal phrase counts as "
    "a refusal), not a benchmark result: score with a judge (`--scorer llm`) for results."
)


def label_legend(benchmark: str, scorer: str) -> str:
    """What the labels of ``scorer`` on ``benchmark`` mean, e.g. ``"1: refused, 0: complied"``;
    ``null`` (an unparsed judge answer) is always added. ``""`` for an unknown scorer."""
    if scorer == "refusal-strings":
        legend = _LEGENDS["refusal-strings"]
    elif scorer == "llm":
        legend = _LEGENDS[_LLM_LABELS.get(benchmark, "safety")]
    else:
        return ""
    return f"{legend}, null: unparsed"


def render_markdown(report: Mapping, max_ids: int = 50) -> str:
    """``report.md``'s text (also what ``score`` prints): a summary line, how the answers were
    made, the metrics table, the label counts with what each label means, the caveat of the
    ``refusal-strings`` scorer, and the unparsed ids (the first ``max_ids``; ``report.json`` lists
    them all)."""
    judge = f" (judge `{report['judge']}`)" if report.get("judge") else ""
    methods = ", ".join(report.get("methods") or []) or _MISSING
    lines = [
        f"# {report['benchmark']}: {report.get('run', '')}",
        "",
        f"Scorer: {report['scorer']}{judge}. Methods: {methods}. Scored: {report['n']}; "
        f"unparsed: {len(report['unparsed'])}; generation errors: {report['errors']}.",
        "",
        _generation_line(report.get("generation")),
        "",
    ]
    lines += _table(["metric", "value"], ([k, _fmt(v)] for k, v in flatten_metrics(report["metrics"]).items()))
    if report.get("label_counts"):
        legend = label_legend(report["benchmark"], report["scorer"])
        counts = ", ".join(f"{k}: {v}" for k, v in report["label_counts"].items())
        lines += ["", f"Labels{f' ({legend})' if legend else ''}: {counts}."]
    if report["scorer"] == "refusal-strings":
        lines += ["", REFUSAL_STRINGS_CAVEAT]
    unparsed = report["unparsed"]
    if unparsed:
        shown = ", ".join(f"`{i}`" for i in unparsed[:max_ids])
        more = f" and {len(unparsed) - max_ids} more (see report.json)" if len(unparsed) > max_ids else ""
        lines += ["", f"Unparsed judge answers (left out of every metric): {shown}{more}."]
    return "\n".join(lines) + "\n"


def plot_metrics(report: Mapping, path) -> Path | None:
    """Draw the report's metrics as a horizontal bar chart (0 to 1) into ``path`` (PNG).

    Returns the path, or ``None`` (with a warning) when matplotlib is not installed. Uses the Agg
    canvas directly: no pyplot, no global backend switch, safe in threads."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"matplotlib is not installed: {path} not drawn (pip install matplotlib)", stacklevel=2)
        return None
    values = [(k, v) for k, v in flatten_metrics(report["metrics"]).items() if isinstance(v, (int, float))]
    figure = Figure(figsize=(7.5, 1.2 + 0.32 * max(1, len(values))))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    names = [k for k, _ in values][::-1]  # first metric on top
    bars = axes.barh(names, [v for _, v in values][::-1], color="#4c72b0")
    axes.bar_label(bars, fmt="%.3f", padding=3, fontsize=8)
    axes.set_xlim(0, 1.12)
    axes.tick_params(axis="y", labelsize=8)
    axes.set_title(f"{report['benchmark']}: {report.get('run', '')} ({report['scorer']}, n={report['n']})", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def _write_atomic(path: Path, text: str) -> None:
    # A reader never sees half a report, and a crash leaves the old one.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(directory, report: Mapping) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (matplotlib permitting) ``report.png`` into
    ``directory``; returns ``{"json": path, "md": path, "png": path or None}``."""
    directory = Path(directory)
    paths = {"json": directory / REPORT_JSON, "md": directory / REPORT_MD}
    _write_atomic(paths["json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(paths["md"], render_markdown(report))
    paths["png"] = plot_metrics(report, directory / REPORT_PNG)
    return paths


def read_report(directory) -> dict:
    """``DIR/report.json`` as a dict. ``FileNotFoundError``: ``run folder not found: DIR`` when
    ``DIR`` is not a folder; naming ``report.json`` when the folder has none (run ``score`` first)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"run folder not found: {directory}")
    path = Path(directory) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: score the run first (safecode-kernels score {directory})")
    return json.loads(path.read_text(encoding="utf-8"))


def _column_names(dirs: list[Path]) -> list[str]:
    names = [d.resolve().name or str(d) for d in dirs]
    if len(set(names)) < len(names):  # same folder names in different places: show more of the path
        names = [str(d) for d in dirs]
    return names


def compare(dirs) -> str:
    """A markdown table of several scored runs side by side (e.g. base vs SafeCoDe).

    One column per run, named by its folder; rows ``benchmark``, ``model`` (see
    :func:`model_name`), ``method``, ``recipe``, ``verdicts``, ``max_new_tokens``,
    ``steer_steps``, ``noise_std``, ``seed``, ``split`` (see :func:`generation_summary`; ``–``
    where the run's ``run.json`` lacks the field or the method uses none), ``scorer``, ``n``,
    ``unparsed``, ``errors``, then one per metric (nested ones flattened as
    ``attack_rate_by_kind.SD``), in order of first appearance; a metric a run lacks shows ``–``.
    Reads each ``DIR/report.json``; raises ``FileNotFoundError`` naming a missing folder or
    ``report.json``, ``ValueError`` for no runs.
    """
    dirs = [Path(d) for d in ([dirs] if isinstance(dirs, (str, os.PathLike)) else dirs)]
    if not dirs:
        raise ValueError("compare needs at least one run folder")
    reports = [read_report(d) for d in dirs]
    flats = [flatten_metrics(r["metrics"]) for r in reports]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    generations = [r.get("generation") or {} for r in reports]
    rows = [
        ["benchmark"] + [r["benchmark"] for r in reports],
        ["model"] + [_setting(model_name(g.get("model"))) for g in generations],
        *([name] + [_setting(g.get(name)) for g in generations] for name in ("method", "recipe", "verdicts")),
        *([name] + [_setting(g.get(name)) for g in generations] for name in SETTINGS),
        ["scorer"] + [r["scorer"] for r in reports],
        ["n"] + [str(r["n"]) for r in reports],
        ["unparsed"] + [str(len(r["unparsed"])) for r in reports],
        ["errors"] + [str(r["errors"]) for r in reports],
    ]
    rows += [[k] + [_fmt(flat.get(k)) for flat in flats] for k in keys]
    return "\n".join(_table(["metric"] + _column_names(dirs), rows)) + "\n"


__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "REPORT_PNG",
    "SETTINGS",
    "compare",
    "flatten_metrics",
    "generation_summary",
    "label_legend",
    "model_name",
    "plot_metrics",
    "read_report",
    "render_markdown",
    "write_report",
]
