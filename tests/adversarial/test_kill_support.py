# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the kill-switch tests: hostile process trees, /proc scans.

This module holds no test. It builds the tree an attacking step would build
(attack catalog cases 90-92): a root that joins a step cgroup first, then
forks descendants that setsid, setpgid, double-fork or ignore SIGTERM, each
tagged with a unique marker as argv[0] so a scan of /proc finds survivors
whatever they did to their session or parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from haios.watchdog import cgroups
from haios.watchdog.client import Engagement, KillReport, Watchdog

REPO_ROOT = Path(__file__).resolve().parents[2]
TREE_SIZE = 50
WAIT_SECONDS = 10.0

# The root writes its pid into cgroup.procs before anything else (as the
# sandbox runner does), optionally drops to an unprivileged uid, then forks
# TREE_SIZE descendants of five kinds, round robin.
TREE_PROGRAM = r"""
import os, signal, sys, time
procs, marker, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
uid = int(sys.argv[4]) if len(sys.argv) > 4 else None
with open(procs, "w") as f:
    f.write(str(os.getpid()))
if uid is not None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
KINDS = ("plain", "setsid", "double", "ignterm", "setpgid")
for i in range(count):
    kind = KINDS[i % len(KINDS)]
    pid = os.fork()
    if pid == 0:
        try:
            if kind == "setsid":
                os.setsid()
            elif kind == "setpgid":
                os.setpgid(0, 0)
            elif kind == "ignterm":
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(s, signal.SIG_IGN)
            elif kind == "double":
                if os.fork() != 0:
                    os._exit(0)
                os.setsid()
            os.execv("/bin/sleep", [marker + "-" + kind, "600"])
        finally:
            os._exit(127)
    if kind == "double":
        os.waitpid(pid, 0)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
sys.stdout.write("ready\n")
sys.stdout.flush()
while True:
    time.sleep(3600)
"""


def new_marker() -> str:
    """Return a marker no other process on the host carries."""
    return f"haios-kill-test-{uuid.uuid4().hex}"


def new_run_id() -> str:
    """Return a fresh run id (the run cgroup must not exist yet)."""
    return f"t{uuid.uuid4().hex[:16]}"


def marker_pids(marker: str) -> list[int]:
    """Return the pids of live processes whose argv contains `marker`.

    Zombies have an empty cmdline, so only processes that still run count.
    """
    needle = marker.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # it exited while we looked
        if needle in cmdline:
            found.append(int(entry))
    return found


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; return the last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def start_tree(
    cgroup: Path, marker: str, *, count: int = TREE_SIZE, uid: int | None = None
) -> subprocess.Popen[bytes]:
    """Start a hostile tree in `cgroup` and wait until every process runs.

    Returns:
        The tree's root process (the test's child; reap it with `reap`).
    """
    argv = [sys.executable, "-c", TREE_PROGRAM, str(cgroup / "cgroup.procs"), marker, str(count)]
    if uid is not None:
        argv.append(str(uid))
    root = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert root.stdout is not None
    line = root.stdout.readline()
    assert line == b"ready\n", f"tree did not start: {line!r}"
    # The root plus one long-lived sleeper per descendant, all exec'd.
    assert wait_for(lambda: len(marker_pids(marker)) == count + 1), "tree incomplete"
    return root


def reap(process: subprocess.Popen[bytes]) -> None:
    """Kill (if needed) and reap a child so no zombie outlives the test."""
    if process.poll() is None:
        process.kill()
    process.wait(WAIT_SECONDS)
    if process.stdout is not None:
        process.stdout.close()


def kill_markers(marker: str) -> None:
    """Last-resort cleanup of a failed test: SIGKILL leftover marker processes."""
    for pid in marker_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def cleanup_run(run_cgroup: Path, marker: str) -> Iterator[None]:
    """Make sure a test leaves no process and no cgroup behind, even failing."""
    try:
        yield
    finally:
        kill_markers(marker)
        cgroups.remove_cgroup(run_cgroup)


class KillLog:
    """Collects the watchdog's callbacks (they run on its reader thread)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self.reports: list[KillReport] = []
        self.engaged: list[Engagement] = []
        self.lost = threading.Event()

    def on_kill(self, report: KillReport) -> None:
        """Record a kill report."""
        with self._cv:
            self.reports.append(report)
            self._cv.notify_all()

    def on_engaged(self, engagement: Engagement) -> None:
        """Record an engagement."""
        with self._cv:
            self.engaged.append(engagement)
            self._cv.notify_all()

    def on_lost(self) -> None:
        """Record that the watchdog was lost."""
        self.lost.set()

    def wait_kill(self, step_id: str, timeout: float = WAIT_SECONDS) -> KillReport:
        """Return the kill report of `step_id`, waiting for it if needed."""
        with self._cv:
            found = self._cv.wait_for(lambda: self._find(step_id) is not None, timeout)
            assert found, f"no kill report for {step_id}"
            report = self._find(step_id)
            assert report is not None
            return report

    def _find(self, step_id: str) -> KillReport | None:
        return next((r for r in self.reports if r.step_id == step_id), None)


class Site:
    """An os_root control directory, a journal path and a kill log."""

    def __init__(self, base: Path) -> None:
        self.os_root = base / "os_root"
        self.control = self.os_root / "control"
        self.control.mkdir(parents=True)
        self.journal = base / "state" / "watchdog.jsonl"
        self.journal.parent.mkdir(mode=0o700)
        self.log = KillLog()

    def start(
        self,
        *,
        extra_paths: tuple[Path, ...] = (),
        disable_inotify: bool = False,
        run_id: str | None = None,
    ) -> Watchdog:
        """Start a watchdog watching this site."""
        return Watchdog.start(
            control_dir=self.control,
            extra_paths=extra_paths,
            journal_path=self.journal,
            run_id=run_id or new_run_id(),
            on_kill=self.log.on_kill,
            on_lost=self.log.on_lost,
            on_engaged=self.log.on_engaged,
            disable_inotify=disable_inotify,
        )

    def journal_records(self) -> list[dict[str, object]]:
        """Return the journal's records."""
        lines = self.journal.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]
