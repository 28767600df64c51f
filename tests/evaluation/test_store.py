"""The append-only JSONL store: whole lines, fsync, a cut-short last line ignored and repaired,
damage elsewhere reported with its line number."""

from __future__ import annotations

import json
import os
import stat

import pytest

from safecode_kernels.evaluation import store
from safecode_kernels.evaluation.store import CorruptLineError, append, read_lines, repair

RECORDS = [
    {"id": "a", "response": "Sure, here is how."},
    {"id": "b", "response": "line\u2028separator and \u00e9t\u00e9 \U0001f600", "seconds": 0.25},
    {"id": "c", "response": None, "error": "image: DataError: x.png: not found"},
]


def test_round_trip_and_missing_file(tmp_path):
    path = tmp_path / "g.jsonl"
    assert read_lines(path) == []
    append(path, RECORDS[:1])
    append(path, RECORDS[1:])
    append(path, [])  # nothing to write: the file stays as it is
    assert read_lines(path) == RECORDS
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == len(RECORDS)  # U+2028 does not split a line


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('\n{"id": "a"}\n\n{"id": "b"}\n\n', encoding="utf-8")
    assert [r["id"] for r in read_lines(path)] == ["a", "b"]
    assert repair(path) is False


def test_every_cut_is_read_and_repaired(tmp_path):
    """Cut the file at every byte: the reader returns exactly the records whose whole line
    (newline included) survived; appending the rest afterwards gives back every record."""
    full = store.encode(RECORDS)
    ends = [i + 1 for i, byte in enumerate(full) if byte == ord("\n")]  # where each line ends
    path = tmp_path / "g.jsonl"
    for cut in range(len(full) + 1):
        path.write_bytes(full[:cut])
        kept = sum(end <= cut for end in ends)
        assert read_lines(path) == RECORDS[:kept], cut
        append(path, RECORDS[kept:])
        assert read_lines(path) == RECORDS, cut
        assert path.read_bytes() == full, cut


@pytest.mark.parametrize(
    "tail",
    [
        b'{"id": "z", "resp',
        b'{"id": "z"}',
        b"\x00\x00\x00\x00",
        b'{"id": "z", "r\n',
        b"\x00\x00\n",
        b'{"id": "z", "r\n  \n',
    ],
)
def test_torn_last_line(tmp_path, tail):
    """No trailing newline, or not JSON at the end (NUL padding from a crash): ignored, then cut."""
    path = tmp_path / "g.jsonl"
    append(path, RECORDS[:2])
    with path.open("ab") as f:
        f.write(tail)
    assert read_lines(path) == RECORDS[:2]
    assert repair(path) is True
    assert path.read_bytes() == store.encode(RECORDS[:2])
    append(path, RECORDS[2:])
    assert read_lines(path) == RECORDS


def test_long_torn_line_beyond_one_read_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_CHUNK", 7)  # the backward scan crosses many chunks
    path = tmp_path / "g.jsonl"
    append(path, RECORDS[:1])
    with path.open("ab") as f:
        f.write(b'{"id": "long", "response": "' + b"x" * 200)
    append(path, RECORDS[1:])
    assert read_lines(path) == RECORDS


@pytest.mark.parametrize(
    "bad, problem",
    [(b"{not json}", "not valid JSON"), (b"[1, 2]", "expected a JSON object"), (b'{"id": "\xff"}', "not valid JSON")],
)
def test_damage_before_the_last_line_names_the_line(tmp_path, bad, problem):
    path = tmp_path / "g.jsonl"
    path.write_bytes(store.encode(RECORDS[:1]) + b"\n" + bad + b"\n" + store.encode(RECORDS[1:]))
    with pytest.raises(CorruptLineError, match=f"g.jsonl, line 3: {problem}") as info:
        read_lines(path)
    assert info.value.line == 3 and info.value.path == path
    # A bad line followed by a torn one is still damage in the middle.
    path.write_bytes(store.encode(RECORDS[:1]) + bad + b"\n" + b'{"id": "torn')
    with pytest.raises(CorruptLineError, match="line 2"):
        read_lines(path)


def test_unencodable_records_write_nothing(tmp_path):
    path = tmp_path / "g.jsonl"
    append(path, RECORDS[:1])
    before = path.read_bytes()
    with pytest.raises(ValueError):
        append(path, [{"id": "x"}, {"id": "y", "seconds": float("nan")}])
    with pytest.raises(TypeError):
        append(path, [{"id": "x", "image": object()}])
    with pytest.raises(TypeError, match="mapping"):
        append(path, ["not a record"])
    assert path.read_bytes() == before


def test_append_syncs_before_returning(tmp_path, monkeypatch):
    path = tmp_path / "g.jsonl"
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        info = os.fstat(fd)
        synced.append(info.st_size if stat.S_ISREG(info.st_mode) else "folder")
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    append(path, RECORDS[:2])
    size = len(store.encode(RECORDS[:2]))
    assert size in synced  # the file was synced once it held both lines
    synced.clear()
    append(path, RECORDS[2:])
    assert synced == [path.stat().st_size]  # the file only: its folder entry exists already
    assert json.loads(path.read_bytes().splitlines()[-1]) == RECORDS[2]
