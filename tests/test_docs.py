"""The design page and what points at it.

- Every citation ``docs/design.md §n`` (or ``design §n``, ranges such as ``§1-§2`` and lists such
  as ``§3, §6`` included) in the sources, tests, benchmarks, build files and docs names a section
  that exists in ``docs/design.md``; so does every bare ``§n`` inside the design page itself.
- ``README.md`` and the pages under ``docs/`` link only inside the repository: no relative link
  that climbs out of it (``../``), no absolute file path; every relative link reaches a file or
  folder that exists, and every ``#anchor`` a heading of the page.
- No file cites the project's former external design file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"

SCANNED_DIRS = ("safecode_kernels", "tests", "benchmarks", "csrc", "python", "docs")
SCANNED_FILES = ("README.md", "setup.py", "CMakeLists.txt", "pyproject.toml")
TEXT_SUFFIXES = {
    ".py",
    ".pyi",
    ".h",
    ".hpp",
    ".c",
    ".cc",
    ".cpp",
    ".cu",
    ".cuh",
    ".md",
    ".rst",
    ".txt",
    ".toml",
    ".cfg",
    ".ini",
    ".yaml",
    ".yml",
}
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks", "build", "dist"}

SECTION = r"§\d+(?:\.\d+)*"
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
CITATION = re.compile(rf"(?:\bdocs/design\.md|\bdesign)\s+({SECTION}(?:\s*(?:-|–|,|and|or)\s*{SECTION})*)")
NUMBER = re.compile(r"§(\d+(?:\.\d+)*)")
# The former external design file, by its name (spelled in two parts so that this file does not
# match itself).
OLD_NAME = "SP" + "EC"
OLD_CITATION = re.compile(rf"\b{OLD_NAME}\b|\b(?i:{OLD_NAME}\.md)\b")  # the word in capitals, or the file

MARKDOWN_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML_LINK = re.compile(r"\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            parts = path.relative_to(ROOT).parts
            if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in parts):
                continue
            if path.is_file() and path.suffix in TEXT_SUFFIXES:
                files.append(path)
    return files


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def design_sections() -> set[str]:
    return set(HEADING.findall(read(DESIGN)))


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{line_of(text, offset)}"


def test_design_page_has_the_numbered_sections():
    sections = design_sections()
    missing = [str(n) for n in range(1, 10) if str(n) not in sections]
    assert not missing, f"docs/design.md lacks the top-level sections {missing}"


def test_design_citations_point_to_existing_sections():
    sections = design_sections()
    found, broken = 0, []
    for path in scanned_files():
        text = read(path)
        for match in CITATION.finditer(text):
            for number in NUMBER.findall(match.group(1)):
                found += 1
                if number not in sections:
                    broken.append(f"{where(path, text, match.start())}: §{number} ({match.group(0)!r})")
    assert not broken, "citations of sections that docs/design.md does not have:\n" + "\n".join(broken)
    # The package cites the design page all over; finding none would mean the pattern broke.
    assert found >= 20, f"only {found} design citations found: has the citation pattern changed?"


def test_design_page_cross_references_exist():
    sections = design_sections()
    text = read(DESIGN)
    broken = [
        f"{where(DESIGN, text, m.start())}: §{m.group(1)}" for m in NUMBER.finditer(text) if m.group(1) not in sections
    ]
    assert not broken, "docs/design.md refers to sections it does not have:\n" + "\n".join(broken)


def test_no_file_cites_the_former_design_file():
    hits = []
    for path in scanned_files():
        text = read(path)
        hits += [f"{where(path, text, m.start())}: {m.group(0)!r}" for m in OLD_CITATION.finditer(text)]
    assert not hits, "cite docs/design.md instead of the former external design file:\n" + "\n".join(hits)


def link_targets(text: str) -> list[tuple[int, str]]:
    """``(offset, target)`` of every inline, reference-style and HTML link outside fenced code."""
    text = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # keep offsets (line numbers)
    targets = []
    for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK):
        targets += [(m.start(1), m.group(1)) for m in pattern.finditer(text)]
    return sorted(targets)


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the page's headings (lower case, punctuation dropped, spaces as
    hyphens; a repeated heading gets ``-1``, ``-2``, ...)."""
    text = FENCE.sub("", text)
    anchors: set[str] = set()
    for heading in re.findall(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


@pytest.mark.parametrize("page", MARKDOWN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_stay_in_the_repository(page: Path):
    text = read(page)
    anchors = github_anchors(text)
    problems = []
    for offset, target in link_targets(text):
        at = where(page, text, offset)
        if target.startswith("#"):
            if target[1:] not in anchors:
                problems.append(f"{at}: {target!r} names no heading of this page")
            continue
        if SCHEME.match(target):
            if target.lower().startswith("file:"):
                problems.append(f"{at}: {target!r} points at a local file outside the repository")
            continue  # a web address (https://arxiv.org/...) is fine
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path.startswith(("/", "\\")):
            problems.append(f"{at}: {target!r} is an absolute path, outside the repository")
            continue
        resolved = (page.parent / path).resolve()
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{at}: {target!r} leaves the repository")
        elif not resolved.exists():
            problems.append(f"{at}: {target!r} does not exist")
    assert not problems, "\n".join(problems)
