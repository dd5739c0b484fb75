# SPDX-License-Identifier: Apache-2.0
"""`haios run` spawns the watchdog and the launcher first; a refusal leaves neither behind.

Each run goes through the real CLI in a fresh interpreter that is a child
subreaper, so anything the engine started and did not reap (a process, or a
zombie) is still its child when `main` returns, whoever forked it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.world import World, plan, step

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs the engine: needs root")

DRIVER = r"""
import ctypes, json, os, sys
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

import haios.app
from haios.area import ROOTS_DIR, RunArea, area_name
from haios.cli.main import main
from haios.load.policy import load_policy, resolve_policy_dir


def children():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.append([int(entry), fields[0]])
    return found


mode, root, policy_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
policy = load_policy(resolve_policy_dir(policy_dir, {}))
state_dir = Path(policy.file.engine.state_dir)
seen = {}
real = haios.app.run_command


def spying(*args, **kwargs):
    seen["children"] = children()
    seen["watchdog"] = kwargs["watchdog"].pid if kwargs.get("watchdog") else None
    seen["launcher"] = kwargs["launcher"].pid if kwargs.get("launcher") else None
    return real(*args, **kwargs)


haios.app.run_command = spying
holder = None
if mode == "hold-lock":
    # Another run holds the os_root: this one is busy (7).
    holder = RunArea.acquire(state_dir, os.open(root, os.O_RDONLY | os.O_DIRECTORY))
code = None
try:
    main(["run", str(root), "--policy", policy_dir])
except SystemExit as exc:
    code = exc.code
root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
journal = state_dir / ROOTS_DIR / area_name(root_fd) / "watchdog.jsonl"
os.close(root_fd)
records = journal.read_text().splitlines() if journal.exists() else []
sys.stdout.flush()
print("\n" + json.dumps({"code": code, "during": seen, "after": children(),
                         "journal": [json.loads(line) for line in records]}))
"""


def drive(world: World, root: Path, mode: str = "plain") -> tuple[dict[str, Any], str]:
    """Run `haios run` through the driver: (its report, the engine's stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    done = subprocess.run([sys.executable, "-c", DRIVER, mode, str(root), str(world.policy)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report, done.stderr


def assert_spawned_early_and_gone(report: dict[str, Any]) -> None:
    during = report["during"]
    # Both were running before the engine did anything with the os_root.
    assert during["watchdog"] is not None and during["launcher"] is not None
    assert {pid for pid, _state in during["children"]} == {during["watchdog"],
                                                           during["launcher"]}
    # Nothing the engine started survives, not even as a zombie.
    assert report["after"] == []
    for pid in (during["watchdog"], during["launcher"]):
        assert not Path(f"/proc/{pid}").exists()


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "world")


def one_step(name: str) -> dict[str, object]:
    return plan(name, [step("s0", ["/bin/true"])])


def test_bad_signature_refusal_leaves_no_process(world: World) -> None:
    root = world.os_root(one_step("badsig"))
    world.write_plan(root, one_step("badsig"), key=world.outsider)
    report, stderr = drive(world, root)
    assert report["code"] == 3, stderr
    assert_spawned_early_and_gone(report)
    assert report["journal"] == []  # the watchdog never watched
    assert "haios watchdog" not in stderr


def test_global_kill_flag_refusal_leaves_no_process(world: World) -> None:
    root = world.os_root(one_step("killed"))
    (root / "control" / "KILL").touch()
    report, stderr = drive(world, root)
    assert report["code"] == 4, stderr
    assert_spawned_early_and_gone(report)
    assert report["journal"] == []
    assert "haios watchdog" not in stderr


def test_busy_refusal_leaves_no_process(world: World) -> None:
    root = world.os_root(one_step("busy"))
    report, stderr = drive(world, root, "hold-lock")
    assert report["code"] == 7, stderr
    assert_spawned_early_and_gone(report)
    assert "haios watchdog" not in stderr


def test_environment_refusal_leaves_no_process(world: World) -> None:
    root = world.os_root(one_step("nokey"))
    world.engine.private_path.unlink()
    report, stderr = drive(world, root)
    assert report["code"] == 6, stderr
    assert_spawned_early_and_gone(report)
    assert report["journal"] == []
    assert "haios watchdog" not in stderr


def test_run_uses_the_spawned_processes_and_reaps_them(world: World) -> None:
    root = world.os_root(one_step("ok"))
    report, stderr = drive(world, root)
    assert report["code"] == 0, stderr
    assert_spawned_early_and_gone(report)
    # The process spawned ahead is the one that watched the run.
    events = [(r["event"], r["pid"] if r["event"] == "started" else None)
              for r in report["journal"]]
    assert events == [("started", report["during"]["watchdog"]), ("stopped", None)]
    # An already succeeded plan runs nothing: both are discarded unused.
    again, stderr = drive(world, root)
    assert again["code"] == 0, stderr
    assert_spawned_early_and_gone(again)
    assert again["journal"] == []
