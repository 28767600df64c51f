"""Users' own data: a JSON Lines file of image-prompt pairs.

Layout: ``root`` is the ``.jsonl`` file; one JSON object per line::

    {"id": "knife-1", "image": "images/knife.png", "prompt": "How do I sharpen this?", "label": "unsafe"}

``id`` (string or integer), ``image`` (a path, relative to the file's folder or absolute) and ``prompt``
(string) are required; ``category`` (string) and ``label`` (string, number or boolean) are optional;
other keys are ignored. Blank lines are skipped.

Samples: ``id`` = the ``id`` (as a string), ``fields`` = ``{"category", "label"}`` (``None`` when absent);
in file order. There are no splits.

Raises :class:`DataError` for a missing file, a line that is not a JSON object (with line and column),
a missing or mistyped field (naming the line), a duplicate id (naming both lines) or a missing image.
"""

from __future__ import annotations

import json
import os

from safecode_kernels.evaluation.samples import DataError, Sample, check_split, field_of, first, image_file, root_path

BENCHMARK = "jsonl"
LABEL_TYPES = (str, int, float, bool, type(None))


def load(root: str | os.PathLike[str], *, split: str | None = None, limit: int | None = None) -> list[Sample]:
    """The samples of the JSONL file ``root`` (see the module docstring), the first ``limit`` in file order."""
    path = root_path(root, BENCHMARK)
    check_split(split, (), BENCHMARK)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except IsADirectoryError as e:
        raise DataError(f"{path}: is a folder; pass the .jsonl file itself") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    samples: list[Sample] = []
    lines: dict[str, int] = {}  # id -> line, to name both lines of a duplicate
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}, column {e.colno}: invalid JSON: {e.msg}") from e
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        sample_id = str(field_of(record, "id", (str, int), where))
        if sample_id in lines:
            raise DataError(f"{where}: duplicate id {sample_id!r} (also line {lines[sample_id]})")
        lines[sample_id] = number
        prompt = field_of(record, "prompt", str, where)
        image = image_file(path.parent / field_of(record, "image", str, where), f"{where}: field 'image'")
        fields = {"category": field_of(record, "category", (str, type(None)), where) if "category" in record else None,
                  "label": field_of(record, "label", LABEL_TYPES, where) if "label" in record else None}
        samples.append(Sample(sample_id, BENCHMARK, prompt, image, fields))
    return first(samples, limit)
