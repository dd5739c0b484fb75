# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.watchdog.client: lifecycle, refusals, start failures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from haios.errors import EnvironmentUnavailableError, InputError, PolicyLoadError
from haios.watchdog import cgroups
from haios.watchdog.client import KillReport, PendingWatchdog, Watchdog
from tests.adversarial.test_kill_support import (
    Site,
    cleanup_run,
    marker_pids,
    new_marker,
    new_run_id,
    reap,
    start_tree,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates cgroups: needs root")


def test_start_and_close(tmp_path: Path) -> None:
    site = Site(tmp_path)
    run_id = new_run_id()
    wd = site.start(run_id=run_id)
    assert wd.alive()
    assert wd.inotify
    assert wd.run_cgroup == cgroups.default_base() / f"haios-{run_id}"
    assert wd.run_cgroup.is_dir()
    assert wd.engagements() == ()
    wd.close()
    wd.close()
    assert not wd.alive()
    assert not wd.run_cgroup.exists()
    assert not site.log.lost.is_set()
    events = [r["event"] for r in site.journal_records()]
    assert events == ["started", "stopped"]


def test_context_manager_closes(tmp_path: Path) -> None:
    site = Site(tmp_path)
    with site.start() as wd:
        run_cgroup = wd.run_cgroup
    assert not run_cgroup.exists()


def test_planted_journal_symlink_fails_the_start_and_leaves_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.journal.symlink_to(tmp_path / "elsewhere")
    run_id = new_run_id()
    with pytest.raises(EnvironmentUnavailableError, match="did not start"):
        site.start(run_id=run_id)
    assert not (cgroups.default_base() / f"haios-{run_id}").exists()
    assert not (tmp_path / "elsewhere").exists()


def test_invalid_run_id_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        Site(tmp_path).start(run_id="../escape")


def test_relative_extra_path_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError):
        Site(tmp_path).start(extra_paths=(Path("run/KILL"),))


def test_duplicate_registration_is_refused(tmp_path: Path) -> None:
    site = Site(tmp_path)
    with site.start() as wd:
        cgroup = wd.create_step_cgroup("s1")
        assert wd.register("s1", cgroup) is None
        with pytest.raises(EnvironmentUnavailableError, match="already registered"):
            wd.register("s1", cgroup)
        assert wd.alive()


def test_registration_of_another_steps_cgroup_is_refused(tmp_path: Path) -> None:
    site = Site(tmp_path)
    with site.start() as wd:
        other = wd.create_step_cgroup("s2")
        with pytest.raises(EnvironmentUnavailableError, match="refused"):
            wd.register("s1", other)
        with pytest.raises(EnvironmentUnavailableError, match="refused"):
            wd.register("s3", wd.run_cgroup / "step-s3")  # does not exist


def test_unregistered_step_is_not_killed_but_the_flag_is_reported(tmp_path: Path) -> None:
    site = Site(tmp_path)
    marker = new_marker()
    wd = site.start()
    with cleanup_run(wd.run_cgroup, marker):
        cgroup = wd.create_step_cgroup("s1")
        root = start_tree(cgroup, marker, count=3)
        try:
            wd.register("s1", cgroup)
            wd.unregister("s1")
            (site.control / "KILL.s1").touch()
            assert wait_for(lambda: len(wd.engagements()) == 1)
            assert wd.engagements()[0].step_id == "s1"
            assert site.log.reports == []
            assert len(marker_pids(marker)) == 4
            wd.remove_step_cgroup(cgroup)
            assert marker_pids(marker) == []
        finally:
            reap(root)
        wd.close()


def test_close_kills_steps_still_registered(tmp_path: Path) -> None:
    site = Site(tmp_path)
    marker = new_marker()
    wd = site.start()
    with cleanup_run(wd.run_cgroup, marker):
        root = start_tree(wd.create_step_cgroup("s1"), marker, count=5)
        try:
            wd.register("s1", wd.run_cgroup / "step-s1")
            wd.close()
            assert marker_pids(marker) == []
            assert not wd.run_cgroup.exists()
        finally:
            reap(root)
    stopped = site.journal_records()[-1]
    assert stopped["event"] == "stopped"
    assert stopped["killed_leftovers"] == ["s1"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_callback_counts_as_losing_the_watchdog(tmp_path: Path) -> None:
    """Nobody would hear later kills: the engine must fail closed."""
    site = Site(tmp_path)

    def broken(report: KillReport) -> None:
        raise RuntimeError("engine bug")

    wd = Watchdog.start(
        control_dir=site.control,
        extra_paths=[],
        journal_path=site.journal,
        run_id=new_run_id(),
        on_kill=broken,
        on_lost=site.log.on_lost,
    )
    try:
        wd.register("s1", wd.create_step_cgroup("s1"))
        (site.control / "KILL").touch()
        assert site.log.lost.wait(10.0)
        assert not wd.alive()
    finally:
        wd.close()
    assert not wd.run_cgroup.exists()


# A stand-in watchdog speaking the protocol: ready on its config; on shutdown
# either ends its output and lingers (as the real one does while the kernel
# finishes its exit), or ignores it and keeps its output open (a hung one).
FAKE_WATCHDOG = """\
import os, sys, time
sys.stdin.readline()
os.write(1, b'{"type":"ready","pid":%d,"inotify":true}\\n' % os.getpid())
sys.stdin.readline()
if sys.argv[1] == "linger":
    os.close(1)
    time.sleep(30)
else:
    time.sleep(30)
"""


def _fake(site: Site, mode: str) -> tuple[Watchdog, subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", FAKE_WATCHDOG, mode], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, bufsize=0)
    watchdog = Watchdog.start(
        control_dir=site.control, extra_paths=(), journal_path=site.journal,
        run_id=new_run_id(), on_kill=site.log.on_kill, on_lost=site.log.on_lost,
        process=PendingWatchdog(process))
    return watchdog, process


def test_close_waits_for_the_end_of_the_output_not_for_the_exit(tmp_path: Path) -> None:
    """The kernel's end of an exiting watchdog (an RCU grace period) is not waited for."""
    site = Site(tmp_path)
    wd, process = _fake(site, "linger")
    try:
        wd.close()
        assert process.poll() is None  # done (output ended), still not exited
        assert not wd.alive()
        assert not wd.run_cgroup.exists()
        assert not site.log.lost.is_set()  # a close is not a loss
        reaper = [t for t in threading.enumerate() if t.name == "haios-watchdog-reaper"]
        assert len(reaper) == 1 and reaper[0].daemon
    finally:
        process.kill()
    assert wait_for(lambda: process.returncode is not None, timeout=10)  # the reaper reaped it


def test_close_kills_a_watchdog_that_does_not_end_its_output(tmp_path: Path) -> None:
    site = Site(tmp_path)
    wd, process = _fake(site, "hang")
    try:
        wd.close(timeout_seconds=0.5)
        assert wait_for(lambda: process.poll() is not None, timeout=10)
        assert process.returncode == -9
        assert not wd.run_cgroup.exists()
    finally:
        process.kill()
