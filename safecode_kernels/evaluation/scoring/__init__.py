"""Scoring of evaluation runs: judge each generation, compute the benchmark's metrics, write reports.

Example::

    from safecode_kernels.evaluation.scoring import ChatClient, compare, score

    with ChatClient("http://localhost:8000/v1", "Qwen/Qwen2.5-VL-72B-Instruct") as judge:
        report = score("runs/mossbench-base", judge=judge)      # scores.jsonl, report.json/.md/.png
    score("runs/mossbench-safecode", scorer="refusal-strings")  # no judge: refusal phrases only
    print(compare(["runs/mossbench-base", "runs/mossbench-safecode"]))

Modules: :mod:`.scorer` (the resumable loop and the files), :mod:`.rubrics` (judge prompts and
label parsing), :mod:`.refusal_strings` (the judge-free scorer), :mod:`.metrics`, :mod:`.report`,
:mod:`.chat` (the chat-completions client).
"""

from __future__ import annotations

from .chat import ChatClient, Completer
from .metrics import BREAKDOWN_FIELDS, compute_metrics
from .refusal_strings import REFUSAL_PHRASES, find_refusal, refusal_label
from .report import compare, flatten_metrics, read_report, render_markdown, write_report
from .rubrics import (
    BENCHMARKS,
    Rubric,
    load_template,
    parse_mssbench_class,
    parse_refusal_score,
    parse_safety,
    rubric_for,
)
from .scorer import SCORERS, load_generations, read_scores, score

__all__ = [
    "BENCHMARKS",
    "BREAKDOWN_FIELDS",
    "REFUSAL_PHRASES",
    "SCORERS",
    "ChatClient",
    "Completer",
    "Rubric",
    "compare",
    "compute_metrics",
    "find_refusal",
    "flatten_metrics",
    "load_generations",
    "load_template",
    "parse_mssbench_class",
    "parse_refusal_score",
    "parse_safety",
    "read_report",
    "read_scores",
    "refusal_label",
    "render_markdown",
    "rubric_for",
    "score",
    "write_report",
]
