"""MOSSBench: 300 benign image-question pairs that oversensitive models refuse.

Source: https://github.com/xirui-li/MOSSBench (``data/``), also https://huggingface.co/datasets/AIcell/MOSSBench.

Layout (``root`` is the ``data`` folder)::

    <root>/images_information/information.json   {"<key>": {scene}, ...}
    <root>/images/<pid>.png                      the scene's "image", relative to <root>

Each scene has ``image`` (path relative to ``root``), ``question``, ``pid`` and ``metadata.over``, a text
such as ``"type 2"`` whose number is the stimulus type: 1 Exaggerated Risk, 2 Negated Harm,
3 Counterintuitive Interpretation (MOSSBench's ``experiments/main.py`` reads the first number the same
way). Other keys are ignored.

Samples: ``id`` = the ``pid`` (as a string), ``prompt`` = ``question``, ``fields`` = ``{"type": <type
name>}``; ordered by ``pid`` (numerically). MOSSBench has no splits.

Raises :class:`DataError` for a missing or invalid ``information.json``, a scene that is not an object,
a missing or mistyped field, an ``over`` text without type 1-3, a duplicate ``pid`` or a missing image.
"""

from __future__ import annotations

import os
import re

from safecode_kernels.evaluation.samples import (
    DataError,
    Sample,
    check_object,
    check_split,
    field_of,
    first,
    image_field,
    natural_key,
    read_json,
    root_path,
    unique_id,
)

BENCHMARK = "mossbench"
INFO_FILE = "images_information/information.json"
#: ``metadata.over`` number -> stimulus type name.
TYPES = {1: "Exaggerated Risk", 2: "Negated Harm", 3: "Counterintuitive Interpretation"}


def load(root: str | os.PathLike[str], *, split: str | None = None, limit: int | None = None) -> list[Sample]:
    """The MOSSBench samples under ``root`` (see the module docstring), the first ``limit`` by ``pid``."""
    root = root_path(root, BENCHMARK)
    check_split(split, (), BENCHMARK)
    path = root / INFO_FILE
    scenes = check_object(read_json(path), str(path), "an object of scenes")
    samples: list[Sample] = []
    keys: dict[str, str] = {}  # pid -> its scene, to name both scenes of a duplicate
    for key, scene in scenes.items():
        where = f"{path}: scene {key!r}"
        check_object(scene, where)
        pid = unique_id(scene, "pid", keys, f"scene {key!r}", where)
        question = field_of(scene, "question", str, where)
        image = image_field(scene, "image", root, where)
        over = field_of(field_of(scene, "metadata", dict, where), "over", str, f"{where}: metadata")
        samples.append(Sample(pid, BENCHMARK, question, image, {"type": _type_name(over, where)}))
    samples.sort(key=lambda s: natural_key(s.id))
    return first(samples, limit)


def _type_name(over: str, where: str) -> str:
    number = re.search(r"\d+", over)
    if number is None or int(number.group()) not in TYPES:
        raise DataError(f"{where}: field 'metadata.over' is {over!r}; expected a text naming type 1, 2 or 3")
    return TYPES[int(number.group())]
