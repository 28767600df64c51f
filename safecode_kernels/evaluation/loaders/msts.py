"""MSTS (Multimodal Safety Test Suite): prompts whose unsafe meaning appears only with their image,
in English and ten translations.

Source: the Hugging Face data set https://huggingface.co/datasets/felfri/MSTS (gated: accept its
terms on the hub first), one split per language: english (400 rows: each case as an ``assistance``
and an ``intention`` prompt), arabic, chinese, farsi, french, german, hindi, italian, korean, russian,
spanish (200 rows each).

Columns used (dataset card): ``prompt_text`` (the text given to the model), ``unsafe_image`` (image),
``case_id``, ``prompt_type`` (``assistance`` / ``intention``), ``hazard_category``,
``hazard_subcategory``, ``hazard_subsubcategory``. The card also lists ``case_text``,
``unsafe_image_id``, ``unsafe_image_description``, ``unsafe_image_url``, ``unsafe_image_license`` and
``unsafe_image_cw``, which are not used.

``root`` is a local copy or the hub name (``None`` = :data:`HUB_NAME`), read with ``datasets`` as
:func:`~safecode_kernels.evaluation.samples.open_hub_split` describes (``HF_HUB_OFFLINE=1`` reads
only the local cache). ``split`` is the language, default ``"english"``.

Samples: ``id`` = ``<split>/<row index>``, ``image`` = ``hf://<dataset>/<split>/<row index>`` (the image
loads through the data set), ``prompt`` = ``prompt_text``, ``fields`` = ``{"category": hazard_category,
"subcategory", "subsubcategory", "language": split, "prompt_type", "case_id"}``; in row order.

Raises :class:`DataError` for a data set or split that cannot be loaded, a missing column or a
mistyped value (naming the row and column); ``ImportError`` without ``datasets``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

from safecode_kernels.evaluation.samples import Sample, field_of, hub_samples

BENCHMARK = "msts"
HUB_NAME = "felfri/MSTS"
DEFAULT_SPLIT = "english"
LANGUAGES = (
    "english",
    "arabic",
    "chinese",
    "farsi",
    "french",
    "german",
    "hindi",
    "italian",
    "korean",
    "russian",
    "spanish",
)
PROMPT_COLUMN = "prompt_text"
IMAGE_COLUMN = "unsafe_image"
CASE_ID_COLUMN = "case_id"
PROMPT_TYPE_COLUMN = "prompt_type"
CATEGORY_COLUMN = "hazard_category"
SUBCATEGORY_COLUMN = "hazard_subcategory"
SUBSUBCATEGORY_COLUMN = "hazard_subsubcategory"
COLUMNS = (
    PROMPT_COLUMN,
    IMAGE_COLUMN,
    CASE_ID_COLUMN,
    PROMPT_TYPE_COLUMN,
    CATEGORY_COLUMN,
    SUBCATEGORY_COLUMN,
    SUBSUBCATEGORY_COLUMN,
)


def load(
    root: str | os.PathLike[str] | None = None, *, split: str | None = None, limit: int | None = None
) -> list[Sample]:
    """The MSTS samples of language ``split`` (see the module docstring), the first ``limit`` rows."""
    split = split or DEFAULT_SPLIT
    return hub_samples(
        BENCHMARK, HUB_NAME, root, split, limit, COLUMNS, IMAGE_COLUMN, functools.partial(_read_row, split)
    )


def _read_row(split: str, row: Mapping, at: str) -> tuple[str, dict]:
    """``(prompt, fields)`` of one row of language ``split``."""
    optional = (str, type(None))  # only the top hazard category is required
    fields = {
        "category": field_of(row, CATEGORY_COLUMN, str, at),
        "subcategory": field_of(row, SUBCATEGORY_COLUMN, optional, at),
        "subsubcategory": field_of(row, SUBSUBCATEGORY_COLUMN, optional, at),
        "language": split,
        "prompt_type": field_of(row, PROMPT_TYPE_COLUMN, str, at),
        "case_id": field_of(row, CASE_ID_COLUMN, str, at),
    }
    return field_of(row, PROMPT_COLUMN, str, at), fields
