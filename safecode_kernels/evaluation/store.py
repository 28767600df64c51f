"""An append-only JSON Lines store that survives crashes: one JSON object per line.

A writer killed mid-write (SIGKILL, power loss) can leave at most a cut-short *last* line: one
without its trailing newline, or holding bytes that are not JSON (a partial write, NUL padding
from the file system). :func:`read_lines` ignores such a line, and :func:`append` (through
:func:`repair`) truncates it before writing, so the file never holds a broken line in the middle.
A bad line anywhere else is real damage and is reported with its number.

Example::

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "generations.jsonl"
    >>> append(path, [{"id": "1", "response": "Sure."}])
    >>> _ = path.open("ab").write(b'{"id": "2", "resp')     # a crash in the middle of a line
    >>> [r["id"] for r in read_lines(path)]
    ['1']
    >>> append(path, [{"id": "2", "response": "No."}])      # the torn line is dropped first
    >>> [r["id"] for r in read_lines(path)]
    ['1', '2']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

# How far back repair() reads at a time while looking for the start of the last line.
_CHUNK = 1 << 16


class CorruptLineError(ValueError):
    """A line that is not a JSON object, other than a cut-short last line.

    ``path`` and ``line`` (1-based) name it; the message says what is wrong.
    """

    def __init__(self, path: Path, line: int, problem: str):
        super().__init__(
            f"{path}, line {line}: {problem} (only a cut-short last line is ignored; fix or delete this line)"
        )
        self.path, self.line = path, line


def _parse(raw: bytes):
    """The JSON object on ``raw``, or ``None`` when it is not one."""
    try:
        value = json.loads(raw.decode("utf-8"))  # per line: a cut can split a UTF-8 character
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_lines(path) -> list[dict]:
    """The JSON objects of the file ``path``, in file order.

    Blank lines are skipped. A cut-short last line (no trailing newline, or not valid JSON) is
    ignored: it is what a writer killed mid-write leaves. Returns ``[]`` when the file does not
    exist.

    Raises :class:`CorruptLineError` (a ``ValueError``) naming the file and line for any other
    line that is not a JSON object.
    """
    return [record for _, record in read_numbered(path)[0]]


def read_numbered(path) -> tuple[list[tuple[int, dict]], int | None]:
    """``([(line number, object), ...], cut)``: :func:`read_lines` with each object's 1-based line
    number, and ``cut`` the number of the cut-short last line it ignored (``None`` when none was).

    Same rules and errors as :func:`read_lines`; ``([], None)`` when the file does not exist.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], None
    lines = data.split(b"\n")  # not splitlines(): JSON strings may hold U+2028 and friends
    complete, tail = lines[:-1], lines[-1]  # tail: after the last newline (b"" when it ends with one)
    records = []
    last = max((n for n, raw in enumerate(complete) if raw.strip()), default=-1)
    for n, raw in enumerate(complete):
        if not raw.strip():
            continue
        record = _parse(raw)
        if record is None:
            if n == last and not tail.strip():
                return records, n + 1  # the last line, though it ends with a newline: a torn write
            try:
                value = json.loads(raw.decode("utf-8"))
                problem = f"expected a JSON object, got {type(value).__name__}"
            except (UnicodeDecodeError, ValueError) as err:
                problem = f"not valid JSON ({err})"
            raise CorruptLineError(path, n + 1, problem)
        records.append((n + 1, record))
    # ``tail``, a line without its newline, is cut short by definition
    return records, (len(complete) + 1 if tail.strip() else None)


def repair(path) -> bool:
    """Truncate a cut-short last line of ``path`` (see the module doc) and sync the file.

    Returns whether something was cut. A missing or empty file needs nothing. Only the end of
    the file is read, so this is cheap before every append.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        keep = _complete_prefix(fd, size)
        if keep == size:
            return False
        os.ftruncate(fd, keep)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def _complete_prefix(fd: int, size: int) -> int:
    """The length of the file without its cut-short last line (``size`` when there is none)."""
    end = _content_end(fd, size)
    if end == 0:
        return size  # empty, or blank lines only: nothing to cut
    start = _line_start(fd, end)
    ended = b"\n" in os.pread(fd, size - end, end)  # the blank bytes after it hold its newline
    if ended and _parse(os.pread(fd, end - start, start)) is not None:
        return size
    return start


def _content_end(fd: int, size: int) -> int:
    """The offset just after the last byte that is not ASCII white space (0 when there is none)."""
    pos = size
    while pos > 0:
        begin = max(0, pos - _CHUNK)
        chunk = os.pread(fd, pos - begin, begin)
        stripped = chunk.rstrip()
        if stripped:
            return begin + len(stripped)
        pos = begin
    return 0


def _line_start(fd: int, end: int) -> int:
    """The offset just after the last newline before ``end`` (0 when there is none)."""
    pos = end
    while pos > 0:
        begin = max(0, pos - _CHUNK)
        found = os.pread(fd, pos - begin, begin).rfind(b"\n")
        if found >= 0:
            return begin + found + 1
        pos = begin
    return 0


def encode(records: Iterable[Mapping]) -> bytes:
    """The JSON Lines bytes of ``records`` (UTF-8, one object per line, each ending in a newline).

    Raises ``TypeError`` for a record that is not a mapping or holds a value JSON cannot encode,
    and ``ValueError`` for NaN or infinite numbers (not valid JSON).
    """
    out = []
    for record in records:
        if not isinstance(record, Mapping):
            raise TypeError(f"a record must be a mapping, got {type(record).__name__}")
        out.append(json.dumps(dict(record), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n")
    return b"".join(out)


def append(path, records: Iterable[Mapping]) -> None:
    """Append ``records`` to ``path`` as whole lines, then flush and ``fsync`` before returning.

    A cut-short last line left by an earlier crash is truncated first (:func:`repair`). Every
    record is encoded before anything is written, so a record JSON cannot encode writes nothing.
    A new file is created with its folder's entry synced too.

    Raises ``TypeError`` / ``ValueError`` as :func:`encode`; ``OSError`` from the file system.
    """
    path = Path(path)
    data = encode(records)
    if not data:
        return
    created = not path.exists()
    repair(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    # A new file's name is durable only once its folder is synced (not possible everywhere).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["CorruptLineError", "append", "encode", "read_lines", "read_numbered", "repair"]
