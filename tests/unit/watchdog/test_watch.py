# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.watchdog._watch.FlagWatcher: events, rescans, polling."""

from __future__ import annotations

import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios.watchdog._watch import FlagHit, FlagWatcher


@pytest.fixture
def control(tmp_path: Path) -> Path:
    path = tmp_path / "os_root" / "control"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def extra(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "KILL"
    path.parent.mkdir()
    return path


@pytest.fixture
def watcher(control: Path, extra: Path) -> Iterator[FlagWatcher]:
    instance = FlagWatcher(control, (extra,), use_inotify=True)
    try:
        yield instance
    finally:
        instance.close()


def _drain(watcher: FlagWatcher) -> tuple[list[FlagHit], bool]:
    fd = watcher.fileno()
    assert fd is not None
    select.select([fd], [], [], 5.0)
    return watcher.drain()


def test_flag_events_are_hits(control: Path, extra: Path, watcher: FlagWatcher) -> None:
    assert watcher.inotify_active
    (control / "KILL.s1").touch()
    (control / "KILL.BAD").touch()
    (control / "notes").touch()
    (control / "KILL").mkdir()
    extra.symlink_to("dangling")
    (extra.parent / "OTHER").touch()
    hits, rescan = _drain(watcher)
    assert hits == [
        FlagHit("step", str(control / "KILL.s1"), "s1"),
        FlagHit("global", str(control / "KILL"), None),
        FlagHit("global", str(extra), None),
    ]
    assert not rescan


def test_renamed_control_directory_stops_counting(control: Path, watcher: FlagWatcher) -> None:
    old = control.parent / "control.old"
    control.rename(old)
    (old / "KILL").touch()  # in the moved-away inode: not a flag any more
    hits, rescan = _drain(watcher)
    assert hits == []
    assert rescan
    control.mkdir()
    watcher.refresh_watches()
    (control / "KILL").touch()
    hits, _ = _drain(watcher)
    assert hits == [FlagHit("global", str(control / "KILL"), None)]


def test_control_created_later_asks_for_a_rescan(tmp_path: Path) -> None:
    control = tmp_path / "control"
    watcher = FlagWatcher(control, (), use_inotify=True)
    try:
        control.mkdir()
        _, rescan = _drain(watcher)
        assert rescan
        watcher.refresh_watches()
        (control / "KILL").touch()
        hits, _ = _drain(watcher)
        assert [h.scope for h in hits] == ["global"]
    finally:
        watcher.close()


def test_scan_finds_flags_by_lstat(control: Path, extra: Path) -> None:
    watcher = FlagWatcher(control, (extra,), use_inotify=False)
    try:
        assert not watcher.inotify_active
        assert watcher.fileno() is None
        assert watcher.drain() == ([], False)
        assert watcher.scan(["s1", "s2"]) == []
        (control / "KILL.s2").mkdir()
        extra.touch()
        assert watcher.scan(["s1", "s2"]) == [
            FlagHit("global", str(extra), None),
            FlagHit("step", str(control / "KILL.s2"), "s2"),
        ]
    finally:
        watcher.close()
