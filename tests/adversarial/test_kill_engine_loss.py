# SPDX-License-Identifier: Apache-2.0
"""The engine dies mid-step; the watchdog kills the trees (T-W07).

Threat T-W07: the engine is SIGKILLed (or crashes) while steps run, so
nothing of the engine is left to stop them. Attacker capability: none
needed, a crash suffices; or a step that manages to kill the engine.
Expected: the watchdog notices (pipe EOF / pidfd), kills every tree of the
run, appends an `engine_lost` record to its journal (fsync'd), removes the
run's cgroups, and exits. No marker process survives. It does not rely on
PR_SET_PDEATHSIG (attack catalog case 94).

The "engine" is a small Python process that uses the real client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adversarial.test_kill_support import (
    REPO_ROOT,
    TREE_PROGRAM,
    WAIT_SECONDS,
    Site,
    cleanup_run,
    marker_pids,
    new_marker,
    new_run_id,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kills cgroups: needs root")

# Reads its settings from the environment (so no marker appears in its own
# argv), starts the watchdog, runs two 50-process trees in registered step
# cgroups, prints what the test needs, then waits to be killed.
ENGINE_PROGRAM = r"""
import json, os, subprocess, sys, time
from pathlib import Path
from haios.watchdog.client import Watchdog

wd = Watchdog.start(
    control_dir=Path(os.environ["T_CONTROL"]),
    extra_paths=[],
    journal_path=Path(os.environ["T_JOURNAL"]),
    run_id=os.environ["T_RUN_ID"],
    on_kill=lambda report: None,
    on_lost=lambda: None,
)
roots = []
for step_id in ("s1", "s2"):
    cgroup = wd.create_step_cgroup(step_id)
    root = subprocess.Popen(
        [sys.executable, "-c", os.environ["T_TREE"], str(cgroup / "cgroup.procs"),
         os.environ["T_MARKER"] + "-" + step_id, "50"],
        stdout=subprocess.PIPE,
    )
    assert root.stdout.readline() == b"ready\n"
    wd.register(step_id, cgroup)
    roots.append(root)
sys.stdout.write(json.dumps({"watchdog_pid": wd.pid, "run_cgroup": str(wd.run_cgroup)}) + "\n")
sys.stdout.flush()
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_engine_sigkill_makes_the_watchdog_kill_every_tree(tmp_path: Path) -> None:
    """T-W07: SIGKILL the engine; no step process survives; journal says so."""
    site = Site(tmp_path)
    marker = new_marker()
    run_id = new_run_id()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "T_CONTROL": str(site.control),
        "T_JOURNAL": str(site.journal),
        "T_RUN_ID": run_id,
        "T_MARKER": marker,
        "T_TREE": TREE_PROGRAM,
    }
    engine = subprocess.Popen(
        [sys.executable, "-c", ENGINE_PROGRAM], stdout=subprocess.PIPE, env=env
    )
    assert engine.stdout is not None
    info = json.loads(engine.stdout.readline())
    run_cgroup = Path(info["run_cgroup"])
    with cleanup_run(run_cgroup, marker):
        assert wait_for(lambda: len(marker_pids(marker)) == 102)
        engine.send_signal(signal.SIGKILL)
        engine.wait(WAIT_SECONDS)
        engine.stdout.close()
        assert wait_for(lambda: marker_pids(marker) == [])
        assert wait_for(lambda: not _running(info["watchdog_pid"]))
        assert wait_for(lambda: not run_cgroup.exists())
    records = site.journal_records()
    lost = [r for r in records if r["event"] == "engine_lost"]
    assert len(lost) == 1
    steps = lost[0]["steps"]
    assert isinstance(steps, list)
    assert sorted(s["step_id"] for s in steps) == ["s1", "s2"]
    assert all(s["complete"] for s in steps)
    assert lost[0]["run_cgroup_removed"] is True
    assert site.journal.stat().st_mode & 0o777 == 0o600
