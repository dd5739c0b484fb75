# SPDX-License-Identifier: Apache-2.0
"""200 kill trials: every one kills the whole tree (T-W01, repeated).

Threat T-W01 under repetition: a race that lets one process in a few hundred
escape (a fork during the kill, a pid reused, a missed event). Attacker: a
step tree mixing setsid, setpgid, double fork and SIG_IGN descendants.
Expected: every trial ends with no marker process and a complete kill
report. Latencies are not asserted here; benchmarks/bench_kill.py measures
them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tests.adversarial.test_kill_support import (
    Site,
    cleanup_run,
    marker_pids,
    new_marker,
    reap,
    start_tree,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="kills cgroups: needs root"),
    pytest.mark.slow,
]

TRIALS = 200
# Ten descendants, two of each kind, keep 200 trials within a minute.
TRIAL_TREE_SIZE = 10


def _gone(tag: str) -> bool:
    return marker_pids(tag) == []


def test_two_hundred_kills_leave_no_survivor(tmp_path: Path) -> None:
    """T-W01: 200 per-step kills in a row, each of a fresh hostile tree."""
    site = Site(tmp_path)
    marker = new_marker()
    wd = site.start()
    survivors: dict[str, list[int]] = {}
    with cleanup_run(wd.run_cgroup, marker):
        for trial in range(TRIALS):
            step_id = f"t{trial:03d}"
            tag = f"{marker}-{step_id}"
            cgroup = wd.create_step_cgroup(step_id)
            root = start_tree(cgroup, tag, count=TRIAL_TREE_SIZE)
            try:
                assert wd.register(step_id, cgroup) is None
                (site.control / f"KILL.{step_id}").touch()
                report = site.log.wait_kill(step_id)
                assert report.complete, f"trial {trial}: incomplete kill"
                if not wait_for(functools.partial(_gone, tag), 2.0):
                    survivors[step_id] = marker_pids(tag)
            finally:
                reap(root)
        wd.close()
    assert survivors == {}
    assert len(site.log.reports) == TRIALS
