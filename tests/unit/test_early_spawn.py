# SPDX-License-Identifier: Apache-2.0
"""Watchdog and launcher processes spawned ahead of their run: hand-over, discard, reaping."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from haios._util.process import wait_exited
from haios.errors import EnvironmentUnavailableError, InputError, SandboxSetupError
from haios.sandbox.launcher import PendingLauncher
from haios.watchdog import _daemon, cgroups
from haios.watchdog.client import (
    PENDING_MAX_AGE_SECONDS,
    PendingWatchdog,
    Watchdog,
)
from tests.adversarial.test_kill_support import Site, new_run_id, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="spawns root helpers: needs root")


def gone(pid: int) -> bool:
    """No such process, not even a zombie (it was reaped)."""
    return not Path(f"/proc/{pid}").exists()


def start_with(site: Site, process: PendingWatchdog | None,
               run_id: str | None = None) -> Watchdog:
    return Watchdog.start(control_dir=site.control, extra_paths=(), journal_path=site.journal,
                          run_id=run_id or new_run_id(), on_kill=site.log.on_kill,
                          on_lost=site.log.on_lost, process=process)


# -- the launcher --------------------------------------------------------------


def test_discarded_launcher_is_killed_and_reaped() -> None:
    pending = PendingLauncher.spawn()
    pid = pending.pid
    pending.discard()
    pending.discard()
    assert gone(pid)
    with pytest.raises(SandboxSetupError, match="discarded"):
        pending.wait_ready()


def test_launcher_handed_over_is_its_launchers() -> None:
    pending = PendingLauncher.spawn()
    launcher = pending.wait_ready()
    assert launcher.pid == pending.pid
    pending.discard()  # handed over: not the pending object's to kill
    assert not gone(launcher.pid)
    launcher.close()
    assert gone(launcher.pid)


def test_launcher_that_dies_before_its_greeting_is_reaped() -> None:
    pending = PendingLauncher.spawn(python="/bin/false")
    pid = pending.pid
    with pytest.raises(SandboxSetupError, match="did not start"):
        pending.wait_ready(timeout_seconds=10)
    assert gone(pid)


# -- the watchdog --------------------------------------------------------------


def test_watchdog_start_configures_the_process_spawned_ahead(tmp_path: Path) -> None:
    site = Site(tmp_path)
    pending = PendingWatchdog.spawn()
    wd = start_with(site, pending)
    try:
        assert wd.pid == pending.pid
        assert wd.alive()
        pending.discard()  # taken over: a no-op
        assert wd.alive()
    finally:
        wd.close()
    assert gone(pending.pid)
    assert [r["event"] for r in site.journal_records()] == ["started", "stopped"]


def test_discarded_watchdog_is_killed_reaped_and_silent(tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    pending = PendingWatchdog.spawn()
    pending.discard()
    pending.discard()
    assert gone(pending.pid)
    assert "haios watchdog" not in capfd.readouterr().err


def test_watchdog_not_taken_in_time_is_discarded_and_replaced(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pending = PendingWatchdog.spawn(max_age_seconds=0.2)
    assert wait_for(lambda: gone(pending.pid))
    site = Site(tmp_path)
    with start_with(site, pending) as wd:
        assert wd.pid != pending.pid
        assert wd.alive()
    # Killed before it gave up waiting for its config: nothing said on stderr.
    assert "haios watchdog" not in capfd.readouterr().err


def test_refused_start_kills_the_process_spawned_ahead(tmp_path: Path) -> None:
    pending = PendingWatchdog.spawn()
    with pytest.raises(InputError):
        start_with(Site(tmp_path), pending, run_id="../escape")
    assert gone(pending.pid)


def test_failed_start_leaves_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.journal.symlink_to(tmp_path / "elsewhere")
    pending = PendingWatchdog.spawn()
    run_id = new_run_id()
    with pytest.raises(EnvironmentUnavailableError, match="did not start"):
        start_with(site, pending, run_id=run_id)
    assert gone(pending.pid)
    assert not (cgroups.default_base() / f"haios-{run_id}").exists()


def test_pending_age_is_well_inside_the_daemons_config_wait() -> None:
    # A process spawned ahead must be configured or killed before it gives
    # up on its config (and says so on the engine's stderr).
    assert PENDING_MAX_AGE_SECONDS <= _daemon.CONFIG_TIMEOUT_SECONDS / 2


# -- waiting for an exit -----------------------------------------------------------


def test_wait_exited() -> None:
    process = subprocess.Popen(["/bin/sleep", "30"])
    try:
        assert not wait_exited(process, 0.05)
        assert process.returncode is None
    finally:
        process.kill()
    assert wait_exited(process, 10)
    assert process.returncode == -9
    assert gone(process.pid)
    assert wait_exited(process, 0)  # already reaped


def test_wait_exited_reaps_a_process_that_exits_by_itself() -> None:
    process = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    assert wait_exited(process, 10)
    assert process.returncode == 3
