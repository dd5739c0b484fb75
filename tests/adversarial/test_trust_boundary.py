# SPDX-License-Identifier: Apache-2.0
"""A client that owns os_root, and other tenants on the host (threat_model/multitenant.md).

Attacker: an unprivileged client uid that owns and writes os_root and keeps
acting while the run goes on (plants, renames, unlinks), and a second
tenant whose engine runs at the same time. Expected: nothing the root engine
does is steered through the client's directory, tenants never share a step
uid, the lock holds, and nothing a step leaves wedges a later run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.world import World, plan, read_json, sh, step

CLIENT_UID = 4242  # not a host account, outside the policy's step uid pool
POOL = range(600_000, 600_000 + 65_536)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "world")


def _hand_to_client(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, CLIENT_UID, CLIENT_UID, follow_symlinks=False)
    # The client's tree must be reachable by it; the test's tmp dirs are 0700.
    for parent in root.parents:
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o711)


def _as_client(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/python3", "-c", script], user=CLIENT_UID, group=CLIENT_UID,
                          extra_groups=[], capture_output=True, text=True, timeout=60,
                          check=False)


def _start(world: World, root: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    return subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                             str(world.policy)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_running(root: Path, step_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = root / "state.json"
        if state.exists():
            try:
                if read_json(state)["steps"][step_id]["status"] == "running":
                    return
            except (ValueError, KeyError):
                pass
        time.sleep(0.05)
    raise AssertionError(f"step {step_id} never started")


def test_client_plants_and_renames_mid_run_without_steering_the_engine(
    world: World, tmp_path: Path
) -> None:
    """T-MT01, T-MT02, T-MT06: the old private area name is the client's to
    play with; the engine's area is elsewhere, the step sees no host path."""
    victim = tmp_path / "victim"  # stands for /etc or another tenant's area
    victim.mkdir(mode=0o700)
    script = ("sleep 2; cat /proc/self/mountinfo > mounts.txt; id -u > uid.txt; "
              "echo product > out.txt")
    root = world.os_root(plan("boundary", [
        step("slow", sh(script), products=["mounts.txt", "uid.txt", "out.txt"],
             timeout_seconds=60),
    ]))
    _hand_to_client(root)
    engine = _start(world, root)
    _wait_running(root, "slow")
    attack = _as_client(
        "import os\n"
        f"root = {str(root)!r}\n"
        f"os.symlink({str(victim)!r}, os.path.join(root, '.haios'))\n"
        f"os.symlink({str(victim)!r}, os.path.join(root, '.haios.lock'))\n"
        "os.rename(os.path.join(root, 'inbox'), os.path.join(root, 'inbox.moved'))\n"
    )
    assert attack.returncode == 0, attack.stderr
    _out, err = engine.communicate(timeout=120)
    assert engine.returncode == 0, err
    assert os.listdir(victim) == []
    mounts = (root / "artefacts" / "mounts.txt").read_text()
    assert str(root) not in mounts and "/var/lib/haios" not in mounts
    assert "tmpfs haios" in mounts
    uid = int((root / "artefacts" / "uid.txt").read_text())
    assert uid in POOL
    assert world.state(root).code == 0


def test_two_tenants_at_once_never_share_a_step_uid(world: World, tmp_path: Path) -> None:
    """T-MT03: concurrent engines lease distinct uids from the host pool."""
    other = World(tmp_path / "other")
    roots = []
    for owner, name in ((world, "a"), (other, "b")):
        root = owner.os_root(plan(f"tenant-{name}", [
            step("work", sh("id -u > uid.txt; sleep 2; id -u >> uid.txt"),
                 products=["uid.txt"], timeout_seconds=60),
        ]), name=f"os_root_{name}")
        _hand_to_client(root)
        roots.append((owner, root))
    engines = [_start(owner, root) for owner, root in roots]
    for engine in engines:
        _out, err = engine.communicate(timeout=120)
        assert engine.returncode == 0, err
    uids = [set((root / "artefacts" / "uid.txt").read_text().split()) for _, root in roots]
    assert all(len(found) == 1 for found in uids)
    assert uids[0] != uids[1]
    for owner, root in roots:
        assert owner.state(root).code == 0


def test_lock_cannot_be_bypassed_from_os_root(world: World) -> None:
    """T-MT04: the lock is on the root-owned run area; the client has no
    lock file to unlink, and a second run is busy (exit 7)."""
    root = world.os_root(plan("lock", [
        step("slow", sh("sleep 3; echo done > out.txt"), products=["out.txt"],
             timeout_seconds=60),
    ]))
    _hand_to_client(root)
    first = _start(world, root)
    _wait_running(root, "slow")
    cleared = _as_client(
        "import os\n"
        f"root = {str(root)!r}\n"
        "for name in os.listdir(root):\n"
        "    path = os.path.join(root, name)\n"
        "    if 'lock' in name and not os.path.isdir(path):\n"
        "        os.unlink(path)\n"
        "print(sorted(os.listdir(root)))\n"
    )
    assert cleared.returncode == 0, cleared.stderr
    assert "lock" not in cleared.stdout
    second = world.run(root)
    assert second.code == 7, second.stderr
    _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    state = read_json(root / "state.json")
    assert state["steps"]["slow"]["attempts"] == 1
    assert state["cost"]["totals"]["wall_seconds"] >= 3


@pytest.mark.parametrize("script", [
    # 3,000 nested directories left behind, then a failure
    "python3 -c \"import os\nfor _ in range(3000):\n    os.mkdir('d'); os.chdir('d')\"; exit 1",
    # the workspace filled to the last byte, then a failure
    "dd if=/dev/zero of=fill bs=1M 2>/dev/null; exit 1",
], ids=["deep-tree", "disk-fill"])
def test_what_a_step_leaves_never_wedges_the_next_run(world: World, script: str) -> None:
    """T-MT05: the workspace is a capped tmpfs dropped after the step; a
    failed step is exit 1 every time, never 70, and attempts count up."""
    root = world.os_root(plan("leftovers", [
        step("messy", sh(script), products=["never.txt"], timeout_seconds=60),
    ]))
    _hand_to_client(root)
    for attempt in (1, 2):
        result = world.run(root)
        assert result.code == 1, result.stderr
        state = read_json(root / "state.json")
        assert state["status"] == "failed"
        assert state["steps"]["messy"]["attempts"] == attempt
    assert world.state(root).code == 0


GRANDCHILD_SIGSYS = (
    "import ctypes, os\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    if os.fork() == 0:\n"
    "        ctypes.CDLL(None).syscall(1000)  # no profile allows it: SIGSYS\n"
    "        os._exit(0)\n"
    "    os.wait()\n"
    "    os._exit(0)\n"
    "os.waitpid(pid, 0)\n"
    "open('out.txt', 'w').write('parent never noticed')\n"
)


def test_sigsys_in_a_grandchild_fails_the_step(world: World) -> None:
    """T-MT07: a seccomp kill anywhere in the tree is a violation, even when
    the step's main process reaps it and exits 0."""
    root = world.os_root(plan("sigsys", [
        step("hides", ["/usr/bin/python3", "-c", GRANDCHILD_SIGSYS], products=["out.txt"]),
    ]))
    result = world.run(root)
    assert result.code == 1, result.stderr
    state = read_json(root / "state.json")
    assert state["steps"]["hides"]["status"] == "failed"
    assert state["steps"]["hides"]["reason"] == "sandbox violation: seccomp"
    assert not (root / "artefacts" / "out.txt").exists()
    metrics = (root / "metrics.prom").read_text()
    assert 'haios_sandbox_violations_total{kind="seccomp"} 1.0' in metrics
    audit = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]
    violations = [r["fields"] for r in audit if r["kind"] == "sandbox.violation"]
    assert violations == [{"kind": "seccomp", "step_id": "hides"}], audit[-5:]


MEMORY_BOMB = (
    "chunks = []\n"
    "while True:\n"
    "    chunks.append(bytearray(64 << 20))  # touched: bytearray zero-fills\n"
)


def test_memory_bomb_across_the_tree_is_stopped_by_the_step_cgroup(world: World) -> None:
    """T-MT05: RLIMIT_AS is per process; the step's memory cgroup bounds the
    tree (the default profile's memory_max_bytes) and the kill is a
    `memory` violation."""
    root = world.os_root(plan("membomb", [
        step("bomb", ["/usr/bin/python3", "-c", MEMORY_BOMB], products=["never.txt"],
             timeout_seconds=60),
    ]))
    result = world.run(root)
    assert result.code == 1, result.stderr
    state = read_json(root / "state.json")
    assert state["steps"]["bomb"]["reason"] == "sandbox violation: memory", state
    cost = read_json(root / "cost" / "bomb.json")
    # Far below the 4 GiB RLIMIT_AS the bomb would reach unbounded; RSS also
    # counts shared pages charged before the init joined, hence the margin.
    assert cost["measured"]["max_rss_bytes"] < (1 << 30) + (64 << 20)
