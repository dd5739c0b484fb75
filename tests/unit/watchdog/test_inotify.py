# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.watchdog._inotify: record parsing and the ctypes binding."""

from __future__ import annotations

import errno
import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios.watchdog import _inotify


def _record(wd: int, mask: int, name: bytes, pad_to: int = 16) -> bytes:
    padded = name + b"\0" * (pad_to - len(name)) if name else b""
    return struct.pack("iIII", wd, mask, 0, len(padded)) + padded


def test_records_are_parsed_in_order() -> None:
    data = (
        _record(1, _inotify.IN_CREATE, b"KILL")
        + _record(-1, _inotify.IN_Q_OVERFLOW, b"")
        + _record(2, _inotify.IN_MOVED_TO, b"KILL.s1")
    )
    assert _inotify.parse_events(data) == [
        _inotify.InotifyEvent(1, _inotify.IN_CREATE, "KILL"),
        _inotify.InotifyEvent(-1, _inotify.IN_Q_OVERFLOW, ""),
        _inotify.InotifyEvent(2, _inotify.IN_MOVED_TO, "KILL.s1"),
    ]


def test_truncated_record_is_dropped_not_misread() -> None:
    data = _record(1, _inotify.IN_CREATE, b"KILL")
    assert _inotify.parse_events(data[:-3]) == []
    assert _inotify.parse_events(data[:7]) == []


def test_non_utf8_names_survive_as_surrogates() -> None:
    (event,) = _inotify.parse_events(_record(1, _inotify.IN_CREATE, b"KILL\xff"))
    assert event.name == "KILL\udcff"
    assert event.name != "KILL"


@pytest.fixture
def watcher() -> Iterator[_inotify.Inotify]:
    instance = _inotify.Inotify()
    try:
        yield instance
    finally:
        instance.close()


def test_creation_in_a_watched_directory_is_reported(
    tmp_path: Path, watcher: _inotify.Inotify
) -> None:
    wd = watcher.add_watch(tmp_path, _inotify.IN_CREATE | _inotify.IN_ONLYDIR)
    assert watcher.read_events() == []
    (tmp_path / "KILL").mkdir()
    ready, _, _ = select.select([watcher.fileno()], [], [], 5.0)
    assert ready
    events = watcher.read_events()
    assert [(e.wd, e.name) for e in events] == [(wd, "KILL")]
    assert events[0].mask & _inotify.IN_ISDIR


def test_watching_twice_returns_the_same_descriptor(
    tmp_path: Path, watcher: _inotify.Inotify
) -> None:
    first = watcher.add_watch(tmp_path, _inotify.IN_CREATE)
    assert watcher.add_watch(tmp_path, _inotify.IN_CREATE) == first
    watcher.rm_watch(first)
    watcher.rm_watch(first)  # already gone: not an error


def test_missing_or_non_directory_paths_raise(tmp_path: Path, watcher: _inotify.Inotify) -> None:
    with pytest.raises(OSError) as missing:
        watcher.add_watch(tmp_path / "absent", _inotify.IN_CREATE)
    assert missing.value.errno == errno.ENOENT
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as not_dir:
        watcher.add_watch(tmp_path / "file", _inotify.IN_CREATE | _inotify.IN_ONLYDIR)
    assert not_dir.value.errno == errno.ENOTDIR


def test_close_is_idempotent() -> None:
    instance = _inotify.Inotify()
    instance.close()
    instance.close()
