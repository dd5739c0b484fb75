# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.watchdog.client: lifecycle, refusals, start failures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from haios.errors import EnvironmentUnavailableError, InputError, PolicyLoadError
from haios.watchdog import cgroups
from haios.watchdog.client import KillReport, Watchdog
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
