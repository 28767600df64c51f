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

from safecode_kernels.evaluation.samples import (
    DataError,
    Sample,
    check_object,
    check_split,
    field_of,
    first,
    image_field,
    read_text,
    root_path,
    unique_id,
)

BENCHMARK = "jsonl"
LABEL_TYPES = (str, int, float, bool, type(None))


def load(root: str | os.PathLike[str], *, split: str | None = None, limit: int | None = None) -> list[Sample]:
    """The samples of the JSONL file ``root`` (see the module docstring), the first ``limit`` in file order."""
    path = root_path(root, BENCHMARK)
    check_split(split, (), BENCHMARK)
    text = read_text(path, "is a folder; pass the .jsonl file itself")
    samples: list[Sample] = []
    lines: dict[str, str] = {}  # id -> its line, to name both lines of a duplicate
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}, column {e.colno}: invalid JSON: {e.msg}") from e
        check_object(record, where, "a JSON object")
        sample_id = unique_id(record, "id", lines, f"line {number}", where)
        prompt = field_of(record, "prompt", str, where)
        image = image_field(record, "image", path.parent, where)
        fields = {
            "category": field_of(record, "category", (str, type(None)), where) if "category" in record else None,
            "label": field_of(record, "label", LABEL_TYPES, where) if "label" in record else None,
        }
        samples.append(Sample(sample_id, BENCHMARK, prompt, image, fields))
    return first(samples, limit)
