"""The :class:`Sample` every benchmark loader returns, :class:`DataError`, and the readers the loaders share.

A sample is one model input: a text ``prompt`` and one image, with a stable ``id`` and the benchmark
``fields`` that scoring needs::

    >>> s = Sample(id="7", benchmark="mossbench", prompt="Plan a picnic here.",
    ...            image="/data/moss/images/7.png", fields={"type": "Negated Harm"})
    >>> Sample.from_dict(s.to_dict()) == s
    True

The readers below (:func:`read_json`, :func:`field_of`, :func:`image_field`, :func:`hub_samples`,
...) turn every malformed input into a :class:`DataError` whose message starts with the file (or data
set) and names the record and field, so a bad data folder fails at load time, before any model runs.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image


class DataError(ValueError):
    """A data folder or file that does not match its benchmark's layout.

    The message names the file (or data set and split) and the record and field at fault.
    """


@dataclasses.dataclass(frozen=True)
class Sample:
    """One benchmark input: ``prompt`` and ``image`` for the model, ``fields`` for scoring.

    ``id`` is stable and unique within its ``benchmark`` (one of ``loaders.BENCHMARKS``).
    ``image`` is what ``generations.jsonl`` records: an absolute file path, or for samples of Hugging
    Face data sets a reference ``hf://<dataset>/<split>/<row index>``. ``fields`` holds JSON-serialisable
    benchmark fields (each loader documents its keys).

    Samples of hub data sets carry a private loader that :meth:`load_image` uses; it takes no part in
    equality, hashing, ``repr`` or :meth:`to_dict`, so a sample rebuilt with :meth:`from_dict` equals
    the original but can load only file images.
    """

    id: str
    benchmark: str
    prompt: str
    image: str
    fields: dict = dataclasses.field(hash=False)  # a dict is unhashable; hash on the other four
    _image_loader: Callable[[], Any] | None = dataclasses.field(default=None, compare=False, repr=False, hash=False)

    def load_image(self) -> Image.Image:
        """The image as an RGB ``PIL.Image.Image``.

        Raises :class:`DataError` naming the file (or hub reference) when it is missing or unreadable.
        """
        if self._image_loader is not None:
            try:
                image = self._image_loader()
            except DataError:
                raise
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise DataError(f"{self.image}: cannot read the image of sample {self.id!r}: {e}") from e
            if not isinstance(image, Image.Image):
                raise DataError(f"{self.image}: sample {self.id!r} has no image (got {type(image).__name__})")
            return image if image.mode == "RGB" else image.convert("RGB")
        if self.image.startswith("hf://"):
            raise DataError(
                f"{self.image}: sample {self.id!r} refers to a hub data set row; load it with "
                "load_benchmark to read its image"
            )
        try:
            with Image.open(self.image) as image:
                return image.convert("RGB")  # convert() loads the pixels, so the file can close
        except FileNotFoundError as e:
            raise DataError(f"{self.image}: image file of sample {self.id!r} not found") from e
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{self.image}: cannot read the image of sample {self.id!r}: {e}") from e

    def to_dict(self) -> dict:
        """``{"id", "benchmark", "prompt", "image", "fields"}``; ``fields`` is a shallow copy."""
        return {
            "id": self.id,
            "benchmark": self.benchmark,
            "prompt": self.prompt,
            "image": self.image,
            "fields": dict(self.fields),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Sample:
        """The sample :meth:`to_dict` gave (extra keys are ignored); :class:`DataError` names a missing
        or mistyped key."""
        where = "sample dict"
        values = {key: field_of(d, key, str, where) for key in ("id", "benchmark", "prompt", "image")}
        return cls(**values, fields=dict(field_of(d, "fields", dict, where)))


# --------------------------------------------------------------------------- shared by the loaders


def root_path(root: str | os.PathLike[str] | None, benchmark: str) -> Path:
    """``root`` as a ``Path``; ``ValueError`` if it is ``None`` (only hub loaders have a default)."""
    if root is None:
        raise ValueError(f"{benchmark} needs the path of a local copy of its data")
    return Path(root)


def check_split(split: str | None, allowed: Sequence[str], benchmark: str) -> str | None:
    """``split`` as ``allowed`` spells it (matched without regard to case), or ``None``;
    ``ValueError`` for any other split."""
    if split is None:
        return None
    match = next((name for name in allowed if name.lower() == split.lower()), None)
    if match is None:
        if not allowed:
            raise ValueError(f"{benchmark} has no split {split!r} (it has no splits: leave the split out)")
        raise ValueError(f"{benchmark} has no split {split!r}; splits: {', '.join(allowed)}")
    return match


def first(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first ``limit`` samples (all for ``None``); ``ValueError`` for a negative or non-int limit."""
    if limit is None:
        return samples
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    return samples[:limit]


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs as numbers: ``"2" < "10"``, ``"a2" < "a10"``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def read_text(path: Path, folder_problem: str = "is a folder, not a JSON file") -> str:
    """The file's UTF-8 text (a byte-order mark dropped); :class:`DataError` for a missing file, a
    folder (``"<path>: <folder_problem>"``) or bytes that are not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except IsADirectoryError as e:
        raise DataError(f"{path}: {folder_problem}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_json(path: Path) -> Any:
    """The parsed JSON file; :class:`DataError` for a missing file or bad JSON (with line and column)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def check_object(value: Any, where: str, expected: str = "an object") -> dict:
    """``value`` if it is a JSON object (a ``dict``); :class:`DataError` ``"<where>: expected
    <expected>, got <type>"`` otherwise."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected {expected}, got {type(value).__name__}")
    return value


_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _name(kind: type) -> str:
    return _TYPE_NAMES.get(kind, kind.__name__)


def field_of(record: Mapping, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``record[key]`` checked to be of ``kind``; :class:`DataError` ``"<where>: missing field 'key'"`` or
    ``"<where>: field 'key' should be ..."``. Booleans pass only where ``kind`` names ``bool``."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        expected = " or ".join(_name(k) for k in _kinds(kind))
        raise DataError(f"{where}: field {key!r} should be {expected}, got {_name(type(value))}")
    return value


def string_list(record: Mapping, key: str, where: str) -> list[str]:
    """``record[key]`` checked to be a list of strings."""
    values = field_of(record, key, list, where)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r}[{i}] should be a string, got {_name(type(value))}")
    return values


def unique_id(record: Mapping, key: str, seen: dict[str, str], place: str, where: str) -> str:
    """``record[key]`` (a string or an integer) as a string, checked to be new: ``seen`` maps each id
    met so far to its place (``"line 3"``, ``"scene '7'"``), and gets this one at ``place``.
    :class:`DataError` ``"<where>: duplicate <key> '<id>' (also <its first place>)"``."""
    value = str(field_of(record, key, (str, int), where))
    if value in seen:
        raise DataError(f"{where}: duplicate {key} {value!r} (also {seen[value]})")
    seen[value] = place
    return value


def image_field(record: Mapping, key: str, folder: Path, where: str) -> str:
    """The image file that the string ``record[key]`` names, relative to ``folder`` (or absolute),
    checked by :func:`image_file` (``"<where>: field '<key>': image not found: ..."``)."""
    return image_file(folder / field_of(record, key, str, where), f"{where}: field {key!r}")


def image_file(path: Path, where: str) -> str:
    """The absolute path of an existing image file, for ``Sample.image``; :class:`DataError` naming it
    if it is missing (checked at load time so that a bad folder fails before any model runs)."""
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    return os.path.abspath(path)  # absolute, but symlinks kept as the user laid them out


# --------------------------------------------------------------------------- Hugging Face data sets

#: A hub data set name, ``owner/name``.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def import_datasets() -> Any:
    """The ``datasets`` module, imported on first use; ``ImportError`` says how to install it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "loading HADES and MSTS needs the Hugging Face `datasets` library: "
            "pip install datasets  (or: pip install 'safecode-kernels[eval]')"
        ) from e
    return datasets


def open_hub_split(root: str | os.PathLike[str] | None, split: str, default_name: str) -> tuple[Any, str]:
    """One split of a Hugging Face data set, and the name to use in ``hf://`` references.

    ``root`` is a local copy or a hub name (``None`` means ``default_name``):

    - a folder written by ``save_to_disk``: a ``DatasetDict`` (``dataset_dict.json``; ``split`` picks
      the split) or a single ``Dataset`` (``state.json``; it must hold ``split`` if it records one);
    - any other folder: read by ``datasets.load_dataset(root, split=split)`` (parquet/json/csv files,
      or a clone of the hub repository);
    - a hub name (``owner/name``) that is not a local path: ``load_dataset(name, split=split)``, which
      with ``HF_HUB_OFFLINE=1`` reads only the local Hugging Face cache.

    References name the hub data set: ``root`` when it is a hub name, else ``default_name`` (a local
    copy stands for the published data set). Errors from ``datasets`` become :class:`DataError`.
    """
    datasets = import_datasets()
    source = default_name if root is None else os.fspath(root)
    path = Path(source)
    try:
        if path.is_dir():
            return _open_local(datasets, path, split), default_name
        if path.exists():
            raise DataError(f"{path}: expected a data set folder or a hub name, found a file")
        if HUB_NAME.fullmatch(source):
            return datasets.load_dataset(source, split=split), source
        raise DataError(f"{source}: no such folder, and not a hub data set name (owner/name)")
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
        offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if _offline() else ""
        raise DataError(f"{source}: cannot load split {split!r}{offline}: {e}") from e


def _open_local(datasets: Any, path: Path, split: str) -> Any:
    if (path / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(path))
        if split not in splits:
            raise DataError(f"{path}: no split {split!r}; the saved data set has {', '.join(sorted(splits))}")
        return splits[split]
    if (path / "state.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if dataset.split is not None and str(dataset.split) != split:
            raise DataError(f"{path}: the saved data set is split {str(dataset.split)!r}, not {split!r}")
        return dataset
    return datasets.load_dataset(str(path), split=split)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_samples(
    benchmark: str,
    hub_name: str,
    root: str | os.PathLike[str] | None,
    split: str,
    limit: int | None,
    columns: Sequence[str],
    image_column: str,
    read_row: Callable[[Mapping, str], tuple[str, dict]],
) -> list[Sample]:
    """The samples of one split of a hub data set (:func:`open_hub_split`: ``root`` a local copy, a hub
    name, or ``None`` for ``hub_name``), one per row in row order, the first ``limit``.

    ``id`` is ``<split>/<row index>``; ``image`` is ``hf://<data set>/<split>/<row index>``, loaded
    through the data set from ``image_column``; ``prompt, fields = read_row(row, where)``, the row
    given without its image and ``where`` naming the data set, split and row for its errors.
    :class:`DataError` for a data set lacking one of ``columns``.
    """
    first([], limit)  # a bad limit fails before the data set loads
    dataset, name = open_hub_split(root, split, hub_name)
    where = f"{hub_name if root is None else os.fspath(root)} split {split!r}"
    check_columns(dataset, columns, where)
    samples = []
    for i, row in enumerate(text_rows(dataset, image_column)):
        prompt, fields = read_row(row, f"{where} row {i}")
        samples.append(
            Sample(
                f"{split}/{i}",
                benchmark,
                prompt,
                f"hf://{name}/{split}/{i}",
                fields,
                _image_loader=functools.partial(row_image, dataset, image_column, i),
            )
        )
    return first(samples, limit)


def check_columns(dataset: Any, columns: Sequence[str], where: str) -> None:
    """:class:`DataError` naming the first of ``columns`` the data set lacks."""
    for column in columns:
        if column not in dataset.column_names:
            raise DataError(f"{where}: missing column {column!r} (columns: {', '.join(dataset.column_names)})")


def text_rows(dataset: Any, image_column: str) -> Any:
    """The rows as dicts without the image column, so that iterating decodes no image."""
    return dataset.remove_columns([image_column])


def row_image(dataset: Any, column: str, index: int) -> Image.Image:
    """Decode the image of one row: a ``PIL`` image, or the ``{"bytes", "path"}`` struct an undecoded
    image column holds."""
    value = dataset[index][column]
    if isinstance(value, Mapping) and value.get("bytes") is not None:
        with Image.open(io.BytesIO(value["bytes"])) as image:
            return image.convert("RGB")
    return value
