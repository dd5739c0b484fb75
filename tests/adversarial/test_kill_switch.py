# SPDX-License-Identifier: Apache-2.0
"""Kill switches against hostile step trees (threat_model/watchdog.md).

Threats: T-W01 (a step escapes a kill by leaving its session or process
group, double-forking or ignoring signals), T-W02 (a per-step flag kills the
wrong steps), T-W03 (flags of unusual entry types, or set early, or
flickering, do not engage), T-W04 (inotify misses a flag), T-W05 (a process
joins a killed step's cgroup later), T-W06 (the watchdog pointed at a cgroup
that is not the run's).

Attacker: the step (any process tree it can build as root or as its uid)
and the client who writes `control/` (any entry type, any timing).
Expected: after the flag no marker process remains (scan of /proc), the
watchdog reports the kill with the right scope and flag, and the step's
cgroup is gone.

Real processes, real cgroups, bounded waits; no timing assertion.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from haios.watchdog import cgroups
from haios.watchdog.client import Watchdog
from tests.adversarial.test_kill_support import (
    Site,
    cleanup_run,
    marker_pids,
    new_marker,
    reap,
    start_tree,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kills cgroups: needs root")


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


@pytest.fixture
def marker() -> str:
    return new_marker()


@pytest.fixture
def watchdog(site: Site, marker: str) -> Iterator[Watchdog]:
    wd = site.start()
    with cleanup_run(wd.run_cgroup, marker):
        yield wd
        wd.close()


def _step(wd: Watchdog, step_id: str, marker: str) -> tuple[Path, subprocess.Popen[bytes]]:
    cgroup = wd.create_step_cgroup(step_id)
    root = start_tree(cgroup, f"{marker}-{step_id}")
    assert wd.register(step_id, cgroup) is None
    return cgroup, root


def test_global_flag_kills_every_escaping_descendant(
    site: Site, watchdog: Watchdog, marker: str
) -> None:
    """T-W01: setsid, setpgid, double fork and SIG_IGN do not escape."""
    cgroup1 = watchdog.create_step_cgroup("s1")
    cgroup2 = watchdog.create_step_cgroup("s2")
    root1 = start_tree(cgroup1, f"{marker}-a")
    root2 = start_tree(cgroup2, f"{marker}-b")
    try:
        assert watchdog.register("s1", cgroup1) is None
        assert watchdog.register("s2", cgroup2) is None
        (site.control / "KILL").touch()
        for step_id in ("s1", "s2"):
            report = site.log.wait_kill(step_id)
            assert report.scope == "global"
            assert report.flag == str(site.control / "KILL")
            assert report.complete
        assert wait_for(lambda: marker_pids(marker) == [])
        assert not cgroup1.exists()
        assert not cgroup2.exists()
        assert watchdog.global_engaged() == str(site.control / "KILL")
    finally:
        reap(root1)
        reap(root2)
    killed = [r for r in site.journal_records() if r["event"] == "killed"]
    assert sorted(str(r["step_id"]) for r in killed) == ["s1", "s2"]


def test_step_flag_kills_only_that_step(site: Site, watchdog: Watchdog, marker: str) -> None:
    """T-W02: KILL.s1 kills s1's whole tree and leaves s2's untouched."""
    cgroup1 = watchdog.create_step_cgroup("s1")
    cgroup2 = watchdog.create_step_cgroup("s2")
    root1 = start_tree(cgroup1, f"{marker}-a")
    root2 = start_tree(cgroup2, f"{marker}-b")
    try:
        watchdog.register("s1", cgroup1)
        watchdog.register("s2", cgroup2)
        (site.control / "KILL.s1").touch()
        report = site.log.wait_kill("s1")
        assert (report.scope, report.step_id) == ("step", "s1")
        assert wait_for(lambda: marker_pids(f"{marker}-a") == [])
        assert len(marker_pids(f"{marker}-b")) == 51
        assert cgroups.is_populated(cgroup2)
        assert [r.step_id for r in site.log.reports] == ["s1"]
        assert watchdog.global_engaged() is None
    finally:
        reap(root1)
        reap(root2)


def test_operator_extra_path_kills_as_global(tmp_path: Path, site: Site, marker: str) -> None:
    """T-W01: an operator-wide flag outside os_root kills every step."""
    extra = tmp_path / "run" / "haios" / "KILL"
    extra.parent.mkdir(parents=True)
    wd = site.start(extra_paths=(extra,))
    with cleanup_run(wd.run_cgroup, marker):
        _cgroup, root = _step(wd, "s1", marker)
        try:
            extra.write_text("operator note: never read")
            report = site.log.wait_kill("s1")
            assert (report.scope, report.flag) == ("global", str(extra))
            assert wait_for(lambda: marker_pids(marker) == [])
        finally:
            reap(root)
        wd.close()


def _make_file(path: Path) -> None:
    path.write_bytes(b"resume")


def _make_dir(path: Path) -> None:
    path.mkdir()


def _make_dangling_symlink(path: Path) -> None:
    path.symlink_to("/nonexistent/haios/target")


def _make_fifo(path: Path) -> None:
    # Opening a FIFO with no writer blocks: engaging must never open it.
    os.mkfifo(path)


def _make_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def _make_hardlink(path: Path) -> None:
    target = path.parent.parent / "elsewhere"
    target.write_text("x")
    os.link(target, path)


ENTRY_MAKERS: dict[str, Callable[[Path], None]] = {
    "regular_file": _make_file,
    "directory": _make_dir,
    "dangling_symlink": _make_dangling_symlink,
    "fifo": _make_fifo,
    "unix_socket": _make_socket,
    "hard_link": _make_hardlink,
}


@pytest.mark.parametrize("kind", sorted(ENTRY_MAKERS))
@pytest.mark.parametrize("name", ["KILL", "KILL.s1"])
def test_flag_of_any_entry_type_engages(
    site: Site, watchdog: Watchdog, marker: str, kind: str, name: str
) -> None:
    """T-W03: any directory entry of a flag's name engages (catalog case 57)."""
    _, root = _step(watchdog, "s1", marker)
    try:
        ENTRY_MAKERS[kind](site.control / name)
        report = site.log.wait_kill("s1")
        assert report.scope == ("global" if name == "KILL" else "step")
        assert report.flag == str(site.control / name)
        assert wait_for(lambda: marker_pids(marker) == [])
    finally:
        reap(root)


def test_step_flag_set_before_register_kills_at_registration(
    site: Site, watchdog: Watchdog, marker: str
) -> None:
    """T-W03: a flag that predates the step still kills it, at once."""
    (site.control / "KILL.s1").mkdir()
    cgroup = watchdog.create_step_cgroup("s1")
    root = start_tree(cgroup, marker)
    try:
        report = watchdog.register("s1", cgroup)
        assert report is not None
        assert (report.scope, report.step_id) == ("step", "s1")
        assert marker_pids(marker) == []  # register returns after the tree is gone
        assert not cgroup.exists()
    finally:
        reap(root)


def test_global_flag_before_start_kills_every_later_step(site: Site, marker: str) -> None:
    """T-W03/T-W05: a latched global flag kills each step as it registers.

    The killed cgroup is removed, so a step process that tries to join it
    afterwards fails instead of running.
    """
    (site.control / "KILL").symlink_to("dangling")
    wd = site.start()
    with cleanup_run(wd.run_cgroup, marker):
        assert wait_for(lambda: wd.global_engaged() is not None)
        cgroup = wd.create_step_cgroup("s1")
        report = wd.register("s1", cgroup)
        assert report is not None
        assert report.scope == "global"
        assert not cgroup.exists()
        with pytest.raises(FileNotFoundError):
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        wd.close()


def test_flickering_flag_latches(site: Site, watchdog: Watchdog, marker: str) -> None:
    """T-W03: a flag created and removed at once still engages, for good."""
    _cgroup, root = _step(watchdog, "s1", marker)
    try:
        flag = site.control / "KILL"
        flag.touch()
        flag.unlink()
        report = site.log.wait_kill("s1")
        assert report.scope == "global"
        assert wait_for(lambda: marker_pids(marker) == [])
        later = watchdog.create_step_cgroup("s2")
        assert watchdog.register("s2", later) is not None
    finally:
        reap(root)


def test_polling_fallback_kills_without_inotify(site: Site, marker: str) -> None:
    """T-W04: with inotify off, the bounded-interval lstat poll engages."""
    wd = site.start(disable_inotify=True)
    with cleanup_run(wd.run_cgroup, marker):
        assert not wd.inotify
        _cgroup1, root1 = _step(wd, "s1", f"{marker}-a")
        _cgroup2, root2 = _step(wd, "s2", f"{marker}-b")
        try:
            (site.control / "KILL.s1").touch()
            assert site.log.wait_kill("s1").scope == "step"
            assert wait_for(lambda: marker_pids(f"{marker}-a") == [])
            assert len(marker_pids(f"{marker}-b")) == 51
            os.mkfifo(site.control / "KILL")
            assert site.log.wait_kill("s2").scope == "global"
            assert wait_for(lambda: marker_pids(marker) == [])
        finally:
            reap(root1)
            reap(root2)
        wd.close()


def test_replaced_control_directory_is_watched_again(
    site: Site, watchdog: Watchdog, marker: str
) -> None:
    """T-W04: renaming control/ away and creating a new one keeps flags live."""
    _cgroup, root = _step(watchdog, "s1", marker)
    try:
        site.control.rename(site.os_root / "control.old")
        site.control.mkdir()
        (site.control / "KILL").touch()
        report = site.log.wait_kill("s1")
        assert report.flag == str(site.control / "KILL")
        assert wait_for(lambda: marker_pids(marker) == [])
    finally:
        reap(root)


def test_foreign_cgroup_registration_is_refused(site: Site, watchdog: Watchdog) -> None:
    """T-W06: the watchdog cannot be pointed at a cgroup outside the run."""
    from haios.errors import EnvironmentUnavailableError

    with pytest.raises(EnvironmentUnavailableError, match="refused"):
        watchdog.register("s1", cgroups.find_cgroup2_mount())
    assert watchdog.alive()
