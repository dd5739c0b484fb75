# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.watchdog.cgroups: mount detection, names, kill, remove."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios.errors import EnvironmentUnavailableError, InputError
from haios.watchdog import _kill, cgroups
from tests.adversarial.test_kill_support import (
    kill_markers,
    marker_pids,
    new_marker,
    new_run_id,
    reap,
    start_tree,
    wait_for,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates cgroups: needs root")

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE_V2 = """\
22 1 0:21 / /proc rw,nosuid - proc proc rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""
BIND_FIRST = """\
50 1 0:26 /system.slice /mnt/slice rw - cgroup2 cgroup2 rw
51 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
"""
ESCAPED = "60 1 0:26 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n"
NONE = "22 1 0:21 / /proc rw - proc proc rw\n40 31 0:37 / /x rw - cgroup cgroup rw,name=systemd\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HYBRID, Path("/sys/fs/cgroup/unified")),
        (PURE_V2, Path("/sys/fs/cgroup")),
        (BIND_FIRST, Path("/sys/fs/cgroup")),
        (ESCAPED, Path("/mnt/cg two")),
        (NONE, None),
        ("", None),
        ("garbage without separator\n", None),
    ],
    ids=[
        "hybrid",
        "pure_v2",
        "bind_mount_listed_first",
        "escaped_space",
        "v1_only",
        "empty",
        "junk",
    ],
)
def test_cgroup2_mount_is_found_in_mountinfo(text: str, expected: Path | None) -> None:
    assert cgroups.parse_cgroup2_mount(text) == expected


def test_missing_cgroup2_is_environment_unavailable(tmp_path: Path) -> None:
    fake = tmp_path / "mountinfo"
    fake.write_text(NONE)
    with pytest.raises(EnvironmentUnavailableError, match="no cgroup2"):
        cgroups.find_cgroup2_mount(fake)
    with pytest.raises(EnvironmentUnavailableError, match="cannot read"):
        cgroups.find_cgroup2_mount(tmp_path / "absent")


def test_this_host_has_a_usable_cgroup2_mount() -> None:
    mount = cgroups.find_cgroup2_mount()
    assert (mount / "cgroup.controllers").exists()


@pytest.mark.parametrize(
    "step_id", ["../s1", ".", "/", "s1/..", "S1", "", "é", "s" * 65, "-s", "s.1", "s 1"]
)
def test_unsafe_step_ids_never_become_cgroup_names(step_id: str) -> None:
    with pytest.raises(InputError):
        cgroups.step_cgroup_name(step_id)


@pytest.mark.parametrize("run_id", ["../r", ".", "", "r/1", "r" * 65, "é", "_r"])
def test_unsafe_run_ids_never_become_cgroup_names(run_id: str) -> None:
    with pytest.raises(InputError):
        cgroups.run_cgroup_name(run_id)


def test_valid_names() -> None:
    assert cgroups.step_cgroup_name("s1_a-b") == "step-s1_a-b"
    assert cgroups.run_cgroup_name("Run-01") == "haios-Run-01"


@pytest.mark.parametrize(
    ("text", "populated"),
    [("populated 1\nfrozen 0\n", True), ("populated 0\nfrozen 1\n", False), ("populated 0", False)],
)
def test_events_populated_is_parsed(text: str, populated: bool) -> None:
    assert cgroups.parse_events_populated(text) is populated


def test_events_without_populated_line_is_an_error() -> None:
    with pytest.raises(EnvironmentUnavailableError):
        cgroups.parse_events_populated("frozen 0\n")


@pytest.fixture
def run_cgroup() -> Iterator[Path]:
    path = cgroups.create_run_cgroup(new_run_id())
    try:
        yield path
    finally:
        cgroups.remove_cgroup(path)


@pytest.fixture
def marker() -> Iterator[str]:
    tag = new_marker()
    try:
        yield tag
    finally:
        kill_markers(tag)


@needs_root
def test_cgroups_are_never_adopted(run_cgroup: Path) -> None:
    run_id = run_cgroup.name.removeprefix(cgroups.RUN_PREFIX)
    with pytest.raises(EnvironmentUnavailableError, match="already exists"):
        cgroups.create_run_cgroup(run_id)
    cgroups.create_step_cgroup(run_cgroup, "s1")
    with pytest.raises(EnvironmentUnavailableError, match="already exists"):
        cgroups.create_step_cgroup(run_cgroup, "s1")


@needs_root
@pytest.mark.parametrize("method", ["kill", "freeze"])
def test_kill_empties_and_removes_the_cgroup(run_cgroup: Path, marker: str, method: str) -> None:
    cgroup = cgroups.create_step_cgroup(run_cgroup, "s1")
    root = start_tree(cgroup, marker, count=20)
    try:
        assert cgroups.is_populated(cgroup)
        outcome = cgroups.kill_cgroup(cgroup, method=method)  # type: ignore[arg-type]
        assert outcome.complete
        assert outcome.removed
        assert outcome.method == method
        assert outcome.error is None
        assert outcome.emptied_at is not None
        assert marker_pids(marker) == []
        assert not cgroup.exists()
    finally:
        reap(root)


@needs_root
def test_killing_the_run_cgroup_kills_every_step(run_cgroup: Path, marker: str) -> None:
    roots = [
        start_tree(cgroups.create_step_cgroup(run_cgroup, s), f"{marker}-{s}", count=5)
        for s in ("s1", "s2")
    ]
    try:
        outcome = cgroups.kill_cgroup(run_cgroup)
        assert outcome.complete
        assert outcome.removed
        assert marker_pids(marker) == []
    finally:
        for root in roots:
            reap(root)


@needs_root
def test_kill_without_remove_keeps_the_directory(run_cgroup: Path, marker: str) -> None:
    cgroup = cgroups.create_step_cgroup(run_cgroup, "s1")
    root = start_tree(cgroup, marker, count=3)
    try:
        outcome = cgroups.kill_cgroup(cgroup, remove=False)
        assert outcome.complete
        assert not outcome.removed
        assert cgroup.is_dir()
        assert not cgroups.is_populated(cgroup)
    finally:
        reap(root)


@needs_root
def test_missing_cgroup_counts_as_killed(run_cgroup: Path) -> None:
    outcome = cgroups.kill_cgroup(run_cgroup / "step-gone")
    assert outcome.complete
    assert outcome.removed
    assert outcome.error is None
    assert not cgroups.is_populated(run_cgroup / "step-gone")


@needs_root
def test_remove_is_idempotent_and_kills_leftovers(run_cgroup: Path, marker: str) -> None:
    cgroup = cgroups.create_step_cgroup(run_cgroup, "s1")
    root = start_tree(cgroup, marker, count=3)
    try:
        cgroups.remove_cgroup(cgroup)
        cgroups.remove_cgroup(cgroup)
        assert not cgroup.exists()
        assert marker_pids(marker) == []
    finally:
        reap(root)


@needs_root
def test_fallback_never_signals_a_process_outside_the_cgroup(run_cgroup: Path) -> None:
    """PID reuse: a pid listed earlier that now names a bystander is spared."""
    bystander = subprocess.Popen(["/bin/sleep", "60"])
    try:
        relative = "/" + run_cgroup.relative_to(cgroups.find_cgroup2_mount()).as_posix()
        _kill.pidfd_kill_if_member(bystander.pid, relative)
        assert not wait_for(lambda: bystander.poll() is not None, 0.2)
    finally:
        bystander.kill()
        bystander.wait()
