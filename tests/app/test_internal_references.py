"""Nothing a user reads points at the project's issue tracker: no "issue N" or "goals of ..." in
the sources, docs, benchmarks, results or the command line's help (say what was meant
instead)."""

from __future__ import annotations

import re

from safecode_kernels.app import cli
from tests.test_docs import ROOT, read, scanned_files, where

# "issue 6", "issues 3 and 4", "issue #12", "goals of ...": a reference to the tracker.
REFERENCE = re.compile(r"\bissues?\s*#?\s*\d+|\bgoals? of\b", re.IGNORECASE)


def test_no_file_refers_to_the_issue_tracker():
    files = scanned_files() + [ROOT / ".ci" / "run"]
    files += sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    hits = []
    for path in files:
        if path.name == "test_internal_references.py":
            continue
        text = read(path)
        hits += [f"{where(path, text, m.start())}: {m.group(0)!r}" for m in REFERENCE.finditer(text)]
    assert not hits, "say what is meant instead of citing the tracker:\n" + "\n".join(hits)


def test_no_help_text_refers_to_the_issue_tracker(capsys):
    from safecode_kernels.app.benchmarking import decode

    parser = cli.build_parser()
    texts = [parser.format_help(), decode.build_parser("safecode-kernels bench").format_help()]
    for action in parser._subparsers._group_actions[0].choices.values():
        texts.append(action.format_help())
    for text in texts:
        assert not REFERENCE.search(text), text
