# SPDX-License-Identifier: Apache-2.0
"""A crash at every persistence point of a run (threat T-R04; issue: crash safety).

Attacker: the power switch, the OOM killer, an operator's SIGKILL. The
engine is killed (SIGKILL) at the N-th persistence point of a run, for every
N the run reaches (with --jobs 1, and with --jobs 2 where two workers
interleave): each fsync, syncfs and rename, counted across all threads
by a wrapper around the real engine (test code only; nothing in haios knows
about it). Expected after each crash:

- if a state.json exists, `haios state` verifies it;
- the next `haios run` succeeds, never re-runs a step the crashed run had
  recorded as succeeded, and never lowers the recorded cost;
- no step process, limit cgroup or mount of the run is left.

The first points fall before the first signed state: the engine's own
audit log is then unsignable, and the run area's record that the engine made
it lets the next run set it aside instead of refusing it as tampering.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.sandbox import status_fields
from tests.support.world import World, plan, py, read_json, sh, step

POOL = range(600_000, 600_000 + 65_536)
CGROUP_V1 = (Path("/sys/fs/cgroup/memory/haios"), Path("/sys/fs/cgroup/pids/haios"))

#: runs haios, SIGKILLs itself at the N-th fsync/syncfs/rename of any thread
CRASHER = r"""
import os, signal, sys, threading
limit = int(sys.argv[1])
lock = threading.Lock()
count = [0]
def counted(real):
    def call(*args, **kwargs):
        with lock:
            count[0] += 1
            hit = count[0] == limit
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call
for name in ("fsync", "rename", "replace"):
    setattr(os, name, counted(getattr(os, name)))
from haios._util import durability  # the barrier's syncfs is a persistence point too
durability.syncfs = counted(durability.syncfs)
import atexit
atexit.register(lambda: sys.stderr.write(f"persistence points: {count[0]}\n"))
sys.argv = ["haios", *sys.argv[2:]]
from haios.cli.main import main
main()
"""

STEP_ONE = ("import json, os\nopen('a.txt', 'w').write('a')\n"
            "json.dump({'usd': 0.5, 'tokens': 3}, open(os.environ['HAIOS_COST_REPORT'], 'w'))\n")


def _plan(jobs: int) -> dict[str, Any]:
    if jobs == 1:
        return plan("crash", [
            step("s1", py(STEP_ONE), products=["a.txt"]),
            step("s2", sh("cp a.txt b.txt"), needs=["s1"], materials=["a.txt"],
                 products=["b.txt"]),
        ])
    # Two steps at once, then one that needs both: persistence points of two
    # worker threads interleave, and a turn records one ending and one start.
    return plan("crash2", [
        step("s1", py(STEP_ONE), products=["a.txt"]),
        step("s2", sh("echo b > b.txt"), products=["b.txt"]),
        step("s3", sh("cat a.txt b.txt > c.txt"), needs=["s1", "s2"],
             materials=["a.txt", "b.txt"], products=["c.txt"]),
    ])


def _crash_run(world: World, root: Path, limit: int, script: Path,
               jobs: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    return subprocess.run([sys.executable, str(script), str(limit), "run", str(root),
                           "--policy", str(world.policy), "--jobs", str(jobs)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def _step_processes(run_id: str) -> list[int]:
    """Live processes of this run's steps: a pool uid and this run's cgroups."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = status_fields(Path("/proc", entry, "status").read_text())
            cgroups = Path("/proc", entry, "cgroup").read_text()
        except OSError:
            continue
        ours = f"/haios/{run_id}/" in cgroups or f"/haios-{run_id}" in cgroups
        if (int(fields["Uid"].split()[0]) in POOL and ours
                and not fields["State"].startswith("Z")):
            found.append(int(entry))
    return found


def _no_step_left(run_id: str) -> list[str]:
    deadline = time.monotonic() + 10
    while _step_processes(run_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [f"process {pid}" for pid in _step_processes(run_id)]
    left += [str(base / run_id) for base in CGROUP_V1 if (base / run_id).exists()]
    mounts = Path("/proc/self/mountinfo").read_text()
    left += [line for line in mounts.splitlines() if " haios " in line]
    return left


@pytest.fixture(scope="module")
def points(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, Path, int]:
    """The world, the crasher, and how many persistence points a whole run has."""
    return _count_points(tmp_path_factory, 1)


def _count_points(tmp_path_factory: pytest.TempPathFactory,
                  jobs: int) -> tuple[World, Path, int]:
    base = tmp_path_factory.mktemp(f"crash-j{jobs}")
    world = World(base / "world")
    script = base / "crasher.py"
    script.write_text(CRASHER)
    root = world.os_root(_plan(jobs), name="count")
    done = _crash_run(world, root, 1_000_000, script, jobs)
    assert done.returncode == 0, done.stderr
    total = _points(done)
    assert total > 10  # state writes, barriers, products, links, costs, logs
    return world, script, total


def _points(done: subprocess.CompletedProcess[str]) -> int:
    return int(done.stderr.rsplit("persistence points: ", 1)[1].split()[0])


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_crash_at_every_persistence_point_resumes_to_success(
    tmp_path_factory: pytest.TempPathFactory, jobs: int,
) -> None:
    world, script, total = _count_points(tmp_path_factory, jobs)
    failures: list[str] = []
    # With two workers the order of points differs from run to run, so each
    # N kills the run at a different instant of the same interleaving space.
    for limit in range(1, total + 1):
        root = world.os_root(_plan(jobs), name=f"crash-{limit}")
        crashed = _crash_run(world, root, limit, script, jobs)
        if crashed.returncode == 0 and jobs > 1 and _points(crashed) < limit:
            continue  # this interleaving had fewer points (a barrier found nothing to do)
        if crashed.returncode != -9:
            failures.append(f"{limit}: not killed ({crashed.returncode}) {crashed.stderr[-200:]}")
            continue
        before = read_json(root / "state.json") if (root / "state.json").exists() else None
        if before is not None and (state := world.state(root)).code != 0:
            failures.append(f"{limit}: haios state {state.code}: {state.stderr.strip()}")
        again = world.run(root, "--jobs", str(jobs))
        if again.code != 0:
            failures.append(f"{limit}: resume {again.code}: {again.stderr.strip()[-300:]}")
            continue
        after = read_json(root / "state.json")
        for step_id, entry in (before or {}).get("steps", {}).items():
            if entry["status"] == "succeeded" and after["steps"][step_id]["attempts"] != entry[
                    "attempts"]:
                failures.append(f"{limit}: {step_id} ran again after it had succeeded")
        for unit, value in (before or {}).get("cost", {}).get("totals", {}).items():
            if after["cost"]["totals"][unit] < value:
                failures.append(f"{limit}: cost {unit} went down")
        left = _no_step_left(after["plan_sha256"][:12])
        if left:
            failures.append(f"{limit}: left behind {left}")
    assert failures == [], "\n".join(failures)


def test_an_audit_log_without_state_that_the_engine_did_not_make_is_refused(
    points: tuple[World, Path, int],
) -> None:
    """The set-aside path needs the run area's record: a planted log is exit 3."""
    world, _script, _total = points
    root = world.os_root(_plan(1), name="planted")
    planted = '{"planted": true}\n'
    (root / "audit.jsonl").write_text(planted)
    result = world.run(root)
    assert result.code == 3, result.stderr
    assert "audit.jsonl" in result.stderr
    assert (root / "audit.jsonl").read_text() == planted  # never set aside, never rewritten
    assert not (root / "artefacts").exists()


def test_the_set_aside_log_is_recorded_in_the_new_chain(points: tuple[World, Path, int]) -> None:
    world, script, total = points
    for limit in range(1, total):  # the first crash that leaves a log but no state
        root = world.os_root(_plan(1), name=f"aside-{limit}")
        assert _crash_run(world, root, limit, script, 1).returncode == -9
        if (root / "audit.jsonl").exists() and not (root / "state.json").exists():
            break
    else:
        pytest.fail("no persistence point leaves an audit log without state")
    leftover = (root / "audit.jsonl").read_bytes()
    assert world.run(root).code == 0
    records = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]
    aside = [r for r in records if r["kind"] == "audit.leftover_set_aside"]
    assert len(aside) == 1 and aside[0]["seq"] == 0
    assert aside[0]["fields"]["records"] == leftover.count(b"\n")
    assert world.state(root).code == 0
