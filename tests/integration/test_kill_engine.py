# SPDX-License-Identifier: Apache-2.0
"""Kill switches through the real engine: whole trees die, the plan is `killed`, exit 4.

Threats T-W* (threat_model/watchdog.md). Every step process carries a unique
marker in its argv; after a kill no process with the marker may remain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.adversarial.test_kill_support import marker_pids, wait_for
from tests.support.world import World, plan, py, read_json, sh, step

SPAWNER = r"""
import os, signal, subprocess, sys, time
marker = sys.argv[1]
def sleeper():
    return [sys.executable, "-S", "-c", "import time; time.sleep(1000)", marker]
for i in range(50):
    kind = i % 3
    if kind == 0:
        subprocess.Popen(sleeper(), start_new_session=True)
    elif kind == 1:
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, sleeper())
            os._exit(0)
    else:
        subprocess.Popen(sleeper(), preexec_fn=lambda: signal.signal(signal.SIGTERM,
                                                                     signal.SIG_IGN))
open("ready", "w").write("x")
time.sleep(1000)
"""


def start(world: World, root: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    return subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                             str(world.policy), "--jobs", "2"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def marker() -> str:
    return f"haios-marker-{uuid.uuid4().hex}"


def spawner_plan(marker: str, *, extra_steps: list[dict[str, object]] | None = None
                 ) -> dict[str, object]:
    return plan("kill", [step("tree", [*py(SPAWNER), marker], timeout_seconds=300),
                         *(extra_steps or [])])


@pytest.mark.parametrize("flag", ["KILL", "KILL.tree"])
def test_flag_kills_the_whole_tree(tmp_path: Path, marker: str, flag: str) -> None:
    world = World(tmp_path / "w")
    root = world.os_root(spawner_plan(marker))
    engine = start(world, root)
    try:
        assert wait_for(lambda: len(marker_pids(marker)) >= 50, 30), marker_pids(marker)
        (root / "control" / flag).write_text("stop")
        _, stderr = engine.communicate(timeout=60)
    finally:
        engine.kill()
    assert engine.returncode == 4, stderr
    assert wait_for(lambda: not marker_pids(marker), 5), marker_pids(marker)
    state = read_json(root / "state.json")
    assert state["status"] == "killed" and state["steps"]["tree"]["status"] == "killed"
    kinds = [line for line in (root / "audit.jsonl").read_text().splitlines() if '"kill"' in line]
    assert kinds, "the kill is recorded in the audit trail"


def test_step_flag_kills_only_that_step(tmp_path: Path, marker: str) -> None:
    world = World(tmp_path / "w")
    root = world.os_root(spawner_plan(marker, extra_steps=[
        step("other", sh("sleep 2; echo done > other.txt"), products=["other.txt"])]))
    engine = start(world, root)
    try:
        assert wait_for(lambda: len(marker_pids(marker)) >= 50, 30)
        (root / "control" / "KILL.tree").mkdir()
        _, stderr = engine.communicate(timeout=60)
    finally:
        engine.kill()
    assert engine.returncode == 4, stderr
    steps = read_json(root / "state.json")["steps"]
    assert steps["tree"]["status"] == "killed"
    assert steps["other"]["status"] == "succeeded"  # running in parallel: finishes, recorded
    assert not marker_pids(marker)


def test_operator_extra_path_is_global(tmp_path: Path, marker: str) -> None:
    flag = tmp_path / "operator" / "KILL"
    flag.parent.mkdir()
    world = World(tmp_path / "w", extra_kill_paths=[str(flag)])
    root = world.os_root(spawner_plan(marker))
    engine = start(world, root)
    try:
        assert wait_for(lambda: len(marker_pids(marker)) >= 50, 30)
        flag.write_text("")
        _, stderr = engine.communicate(timeout=60)
    finally:
        engine.kill()
    assert engine.returncode == 4, stderr
    assert wait_for(lambda: not marker_pids(marker), 5)
    result = world.run(root)
    assert result.code == 4 and "KILL" in result.stderr  # refuses to start while set


def test_engine_sigkill_kills_the_tree_and_rerun_resumes(tmp_path: Path, marker: str) -> None:
    world = World(tmp_path / "w")
    first = step("first", sh("echo one > one.txt"), products=["one.txt"])
    tree = step("tree", [*py(SPAWNER), marker], needs=["first"], timeout_seconds=300)
    root = world.os_root(plan("crash", [first, tree]))
    engine = start(world, root)
    try:
        assert wait_for(lambda: len(marker_pids(marker)) >= 50, 30)
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait()
    finally:
        engine.kill()
    assert wait_for(lambda: not marker_pids(marker), 10), marker_pids(marker)
    # Resume: replace nothing; the tree step runs again and is killed by a per-step flag.
    one = (root / "artefacts" / "one.txt").read_bytes()
    engine = start(world, root)
    try:
        assert wait_for(lambda: len(marker_pids(marker)) >= 50, 30)
        (root / "control" / "KILL.tree").write_text("")
        engine.communicate(timeout=60)
    finally:
        engine.kill()
    state = read_json(root / "state.json")
    assert state["steps"]["first"]["attempts"] == 1  # not rerun
    assert state["steps"]["tree"]["attempts"] == 2
    assert (root / "artefacts" / "one.txt").read_bytes() == one
    audit = (root / "audit.jsonl").read_text()
    assert '"engine_lost"' in audit  # what the watchdog did while the engine was dead
