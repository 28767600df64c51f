"""HADES: harmful instructions with images that carry the harm (typography, generated and adversarial
images), in five scenarios.

Source: the Hugging Face data set https://huggingface.co/datasets/Monosail/HADES (split ``test``,
4,500 rows), from the HADES paper's repository https://github.com/RUCAIBox/HADES.

Columns (dataset card): ``image`` (image), ``id`` (string), ``scenario`` (string: the harm scenario,
e.g. Violence, Financial, Privacy, Self-Harm, Animal), ``keywords`` (string), ``step`` (int: the image
optimisation step; every instruction appears once per step), ``category`` (string: the kind of keyword,
e.g. behavior or object), ``instruction`` (string).

``root`` is a local copy or the hub name (``None`` = :data:`HUB_NAME`), read with ``datasets`` as
:func:`~safecode_kernels.evaluation.samples.open_hub_split` describes (``HF_HUB_OFFLINE=1`` reads
only the local cache). ``split`` defaults to ``"test"``. Every row is a sample, all steps included, and
the prompt is ``instruction`` unchanged (as the SafeCoDe paper's harness runs HADES).

Samples: ``id`` = ``<split>/<row index>``, ``image`` = ``hf://<dataset>/<split>/<row index>`` (the image
loads through the data set), ``fields`` = ``{"category": scenario, "keywords", "keyword_type": the
category column, "step", "source_id": the id column}``; in row order.

Raises :class:`DataError` for a data set or split that cannot be loaded, a missing column or a
mistyped value (naming the row and column); ``ImportError`` without ``datasets``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from safecode_kernels.evaluation.samples import Sample, field_of, hub_samples

BENCHMARK = "hades"
HUB_NAME = "Monosail/HADES"
DEFAULT_SPLIT = "test"
IMAGE_COLUMN = "image"
ID_COLUMN = "id"
SCENARIO_COLUMN = "scenario"
KEYWORDS_COLUMN = "keywords"
STEP_COLUMN = "step"
CATEGORY_COLUMN = "category"
INSTRUCTION_COLUMN = "instruction"
COLUMNS = (IMAGE_COLUMN, ID_COLUMN, SCENARIO_COLUMN, KEYWORDS_COLUMN, STEP_COLUMN, CATEGORY_COLUMN, INSTRUCTION_COLUMN)


def load(
    root: str | os.PathLike[str] | None = None, *, split: str | None = None, limit: int | None = None
) -> list[Sample]:
    """The HADES samples of ``split`` (see the module docstring), the first ``limit`` rows."""
    return hub_samples(BENCHMARK, HUB_NAME, root, split or DEFAULT_SPLIT, limit, COLUMNS, IMAGE_COLUMN, _read_row)


def _read_row(row: Mapping, at: str) -> tuple[str, dict]:
    """``(prompt, fields)`` of one row."""
    scenario = field_of(row, SCENARIO_COLUMN, str, at)
    fields = {
        "category": scenario,
        "keywords": field_of(row, KEYWORDS_COLUMN, str, at),
        "keyword_type": field_of(row, CATEGORY_COLUMN, str, at),
        "step": field_of(row, STEP_COLUMN, int, at),
        "source_id": field_of(row, ID_COLUMN, str, at),
    }
    return field_of(row, INSTRUCTION_COLUMN, str, at), fields
