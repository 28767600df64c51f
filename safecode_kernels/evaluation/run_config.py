"""``run.json``: the configuration of an evaluation run, and the check that a rerun matches it.

A run folder holds the generations of one configuration. Resuming into it with other settings
would mix answers of two configurations in one ``generations.jsonl``, so :func:`check_and_write`
refuses a configuration that differs from the recorded one in any field but those of
:data:`IGNORED` (the versions, the sample limit, the batch size, the timestamps: they do not change
an answer).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path

RUN_FILE = "run.json"
GENERATIONS_FILE = "generations.jsonl"

#: Fields a rerun may change: they do not change any answer.
IGNORED = frozenset({"versions", "limit", "batch_size", "created", "updated"})


class ConfigMismatch(ValueError):
    """A rerun into a folder made with another configuration; ``fields`` names the differences."""

    def __init__(self, path: Path, differences: dict[str, tuple]):
        shown = "; ".join(f"{name}: {_show(old)} there, {_show(new)} now" for name, (old, new) in differences.items())
        super().__init__(
            f"{path} was made with another configuration ({shown}): give another --out folder, "
            "or rerun with the recorded settings to resume"
        )
        self.path, self.fields = path, list(differences)


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, ensure_ascii=False)


_ABSENT = object()


def versions() -> dict:
    """The versions that produced the answers: this package, torch, transformers, Python."""
    import torch
    import transformers

    from .. import __version__

    return {
        "safecode_kernels": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def differences(recorded: Mapping, current: Mapping) -> dict[str, tuple]:
    """``{field: (recorded value, current value)}`` for every field outside :data:`IGNORED` that differs."""
    names = [k for k in dict.fromkeys([*recorded, *current]) if k not in IGNORED]
    return {
        k: (recorded.get(k, _ABSENT), current.get(k, _ABSENT))
        for k in names
        if recorded.get(k, _ABSENT) != current.get(k, _ABSENT)
    }


def read_config(folder) -> dict | None:
    """``folder/run.json`` as a dict, or ``None`` when absent. ``ValueError`` naming the file when
    it is not a JSON object."""
    path = Path(folder) / RUN_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        config = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); restore it or use another folder") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def check_and_write(folder, config: Mapping, has_generations: bool) -> dict:
    """Check ``config`` against ``folder/run.json`` (if any), then write it there; returns what was written.

    ``config`` must be JSON-serialisable (it is compared after a JSON round trip, so tuples equal
    lists). The recorded ``created`` time is kept; ``updated`` is now.

    Raises :class:`ConfigMismatch` for a differing field; ``ValueError`` when ``run.json`` is
    unreadable, or missing while ``has_generations`` (the folder holds answers of an unknown
    configuration); ``TypeError`` for a value JSON cannot encode.
    """
    folder = Path(folder)
    path = folder / RUN_FILE
    try:
        current = json.loads(json.dumps(dict(config), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(f"the run configuration must be JSON-serialisable: {err}") from None
    recorded = read_config(folder)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if recorded is None:
        if has_generations:
            raise ValueError(
                f"{folder / GENERATIONS_FILE} exists but {path} does not, so its configuration is "
                "unknown: restore run.json or give another folder"
            )
        current["created"] = now
    else:
        diff = differences(recorded, current)
        if diff:
            raise ConfigMismatch(path, diff)
        current["created"] = recorded.get("created", now)
    current["updated"] = now
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader (or a crash) never sees half a file
    return current


__all__ = [
    "GENERATIONS_FILE",
    "IGNORED",
    "RUN_FILE",
    "ConfigMismatch",
    "check_and_write",
    "differences",
    "read_config",
    "versions",
]
