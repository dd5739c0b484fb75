# SPDX-License-Identifier: Apache-2.0
"""Steps cannot stop the watchdog; if it dies anyway, the engine kills (T-W08, T-W09).

Threat T-W08: a step kills or ptraces the watchdog to disable the kill
switch. Attacker capability: code running as the step's unprivileged uid
(here an otherwise unused uid), even without the PID namespace the sandbox adds. Expected:
kill(2), kill(-1) and ptrace(2) against the watchdog fail with EPERM and the
watchdog keeps working; it runs in its own session with only CAP_KILL and
CAP_DAC_READ_SEARCH, no_new_privs, and is not dumpable.

Threat T-W09: the watchdog dies anyway (a root operator, the OOM killer).
Expected: the engine hears it (`on_lost`), `alive()` is False, a register
fails with WatchdogLostError, and `kill_all_registered()` kills the trees.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios.errors import WatchdogLostError
from haios.watchdog.client import Watchdog
from tests.adversarial.test_kill_support import (
    WAIT_SECONDS,
    Site,
    cleanup_run,
    marker_pids,
    new_marker,
    reap,
    start_tree,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kills cgroups: needs root")

# A uid nothing else on the host uses (drawn per run, so two test runs at
# once do not share it): the attack's kill(-1) can only hit its own processes.
STEP_UID = 3_000_000 + secrets.randbelow(1_000_000)

ATTACK_PROGRAM = r"""
import ctypes, errno, os, signal, sys
target = int(sys.argv[1])
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
results = []
try:
    os.kill(target, signal.SIGKILL)
    results.append("kill:ok")
except PermissionError:
    results.append("kill:EPERM")
try:
    os.kill(-1, signal.SIGKILL)  # every process it may signal: only its own uid
except ProcessLookupError:
    pass
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
if libc.ptrace(PTRACE_ATTACH, target, None, None) == -1:
    results.append("ptrace:" + errno.errorcode[ctypes.get_errno()])
else:
    results.append("ptrace:ok")
print(" ".join(results))
"""


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


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_unprivileged_step_cannot_kill_or_trace_the_watchdog(
    site: Site, watchdog: Watchdog, marker: str
) -> None:
    """T-W08: kill, kill(-1) and ptrace from the step uid all fail with EPERM."""
    attack = subprocess.run(
        [sys.executable, "-c", ATTACK_PROGRAM, str(watchdog.pid), str(STEP_UID)],
        capture_output=True,
        timeout=WAIT_SECONDS,
        check=True,
    )
    assert attack.stdout.split() == [b"kill:EPERM", b"ptrace:EPERM"]
    assert watchdog.alive()
    # And it still kills: a tree run as the same unprivileged uid dies.
    cgroup = watchdog.create_step_cgroup("s1")
    root = start_tree(cgroup, marker, uid=STEP_UID)
    try:
        watchdog.register("s1", cgroup)
        (site.control / "KILL.s1").touch()
        assert site.log.wait_kill("s1").complete
        assert wait_for(lambda: marker_pids(marker) == [])
    finally:
        reap(root)


def test_watchdog_runs_with_reduced_privileges(watchdog: Watchdog) -> None:
    """T-W08: own session, two capabilities, no_new_privs, not dumpable."""
    status = _status(watchdog.pid)
    kept = (1 << 2) | (1 << 5)  # CAP_DAC_READ_SEARCH, CAP_KILL
    assert int(status["CapEff"], 16) == kept
    assert int(status["CapPrm"], 16) == kept
    assert int(status["CapBnd"], 16) == kept
    assert int(status["CapInh"], 16) == 0
    assert int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert os.getsid(watchdog.pid) == watchdog.pid
    assert os.getsid(watchdog.pid) != os.getsid(0)
    # Not dumpable: its /proc files belong to root, not to its uid's peers.
    assert Path(f"/proc/{watchdog.pid}/mem").stat().st_uid == 0
    # Only the protocol pipes and stderr, inotify and the engine's pidfd, the
    # journal: nothing inherited.
    assert len(os.listdir(f"/proc/{watchdog.pid}/fd")) <= 6


def test_watchdog_loss_is_noticed_and_the_engine_kills(
    site: Site, watchdog: Watchdog, marker: str
) -> None:
    """T-W09: SIGKILL the watchdog; on_lost fires; the engine kills the tree."""
    cgroup = watchdog.create_step_cgroup("s1")
    root = start_tree(cgroup, marker)
    try:
        watchdog.register("s1", cgroup)
        os.kill(watchdog.pid, signal.SIGKILL)
        assert site.log.lost.wait(WAIT_SECONDS)
        assert not watchdog.alive()
        with pytest.raises(WatchdogLostError):
            watchdog.register("s2", watchdog.create_step_cgroup("s2"))
        outcomes = watchdog.kill_all_registered()
        assert sorted(outcomes) == ["s1"]
        assert outcomes["s1"].complete
        assert wait_for(lambda: marker_pids(marker) == [])
        assert not watchdog.run_cgroup.exists()
    finally:
        reap(root)
