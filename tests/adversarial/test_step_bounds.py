# SPDX-License-Identifier: Apache-2.0
"""A step cannot hold unbounded memory or processes (T-MT05).

Threat T-MT05 (unbounded step memory/process count): rlimits are per process
(RLIMIT_AS) or per uid (RLIMIT_NPROC), so one step could hold about 1 TiB of
address space with many processes, fork without a tree-wide bound, and pin
kernel memory. The attacker controls the code of a step and everything it
forks, but runs unprivileged inside cgroups the engine created.

Expected refusals, each shown with real processes forked from this test
(root) that join the step's kill cgroup (made as the watchdog makes it) and
then its `StepLimits` cgroups exactly as the sandbox init does in its stage
5, without the rest of the engine:

- a memory bomb is OOM-killed (SIGKILL) at its limit, `violations()` says
  "memory", and the memory charged never exceeds the limit;
- a fork bomb never has more than `pids_max` processes, fork fails with
  EAGAIN, `violations()` says "processes"; threads count too;
- after dropping root, a step cannot leave its cgroups (its kill cgroup
  included), raise its limits or create sub-cgroups;
- after `remove()` no cgroup of the step or its run remains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from haios.sandbox.cglimits import StepLimits
from haios.watchdog import cgroups

MIB = 1024 * 1024
NOBODY = 65534
WAIT_SECONDS = 10.0


def new_run_id() -> str:
    """A run id no other test (or engineer) uses."""
    return f"t{os.getpid()}-{secrets.token_hex(4)}"


def kill_cgroup_of(limits: StepLimits) -> Path:
    """Where the watchdog makes the kill cgroup of the step of `limits`."""
    return (
        cgroups.find_cgroup2_mount()
        / cgroups.BASE_NAME
        / cgroups.run_cgroup_name(limits.run_id)
        / cgroups.step_cgroup_name(limits.step_id)
    )


class KillCgroups:
    """The watchdog's run and step cgroups of test steps, made as the engine makes them."""

    def __init__(self) -> None:
        """Start with none."""
        self.made: list[Path] = []

    def step(self, run_id: str, step_id: str) -> Path:
        """The step's kill cgroup, made (with its run cgroup) unless this object made it."""
        run = cgroups.default_base() / cgroups.run_cgroup_name(run_id)
        if run not in self.made:
            self.made.append(cgroups.create_run_cgroup(run_id))
        step = run / cgroups.step_cgroup_name(step_id)
        if step not in self.made:
            self.made.append(cgroups.create_step_cgroup(run, step_id))
        return step

    def remove(self) -> None:
        """Remove every cgroup made, steps before their run, killing what lingers."""
        while self.made:
            cgroups.remove_cgroup(self.made.pop())


def join(limits: StepLimits) -> None:
    """Join the kill cgroup, then every limit cgroup, as the sandbox init's stage 5 does."""
    for procs in (str(kill_cgroup_of(limits) / "cgroup.procs"), *limits.procs_files):
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


@dataclasses.dataclass
class Child:
    """A forked test process; killed and reaped by `forked` whatever happens."""

    pid: int
    status: int | None = None

    def wait(self, timeout_seconds: float = WAIT_SECONDS) -> int:
        """Reap the child and return its wait status."""
        deadline = time.monotonic() + timeout_seconds
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.status = status
                break
            if time.monotonic() > deadline:
                pytest.fail(f"child {self.pid} still runs after {timeout_seconds}s")
            time.sleep(0.01)
        return self.status


@contextlib.contextmanager
def forked(body: Callable[[], int]) -> Iterator[Child]:
    """Run `body` in a forked child (its return value is the exit status).

    The child never returns into pytest; on leaving the block the parent
    SIGKILLs it if it still runs and reaps it.
    """
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = body()
        except BaseException:  # a forked child must never unwind into pytest
            traceback.print_exc(file=sys.stderr)
        finally:
            os._exit(code)
    child = Child(pid)
    try:
        yield child
    finally:
        if child.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            child.status = -1


def read_report(fd: int, timeout_seconds: float = WAIT_SECONDS) -> str:
    """Read a child's whole report from a pipe (until EOF)."""
    deadline = time.monotonic() + timeout_seconds
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            pytest.fail(f"no report within {timeout_seconds}s (so far {data!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode()
        data += chunk


def assert_nothing_remains(limits: StepLimits) -> None:
    """No step or run cgroup that `limits` made is left (the kill cgroup is the watchdog's)."""
    for directory in limits.directories:
        assert not directory.exists(), directory
        assert not directory.parent.exists(), directory.parent


@pytest.fixture
def make_limits() -> Iterator[Callable[..., StepLimits]]:
    """Create a kill cgroup and step limits with a fresh run id; remove both after."""
    made: list[StepLimits] = []
    kill_cgroups = KillCgroups()

    def make(memory_max_bytes: int = 256 * MIB, pids_max: int = 64) -> StepLimits:
        run_id = new_run_id()
        kill_cgroup = kill_cgroups.step(run_id, "s1")
        limits = StepLimits.create(
            run_id, "s1", memory_max_bytes, pids_max, kill_cgroup=kill_cgroup
        )
        made.append(limits)
        return limits

    try:
        yield make
    finally:
        try:
            for limits in made:
                limits.remove()
        finally:
            kill_cgroups.remove()


def memory_peak_bytes(limits: StepLimits) -> int | None:
    """The most memory the step's memory cgroup was charged, where the kernel says."""
    for group in limits.groups:
        if "memory" in group.controllers:
            for name in ("memory.max_usage_in_bytes", "memory.peak"):
                path = group.path / name
                if path.exists():
                    return int(path.read_text().split()[0])
    return None


def test_memory_bomb_is_oom_killed_at_its_limit(make_limits: Callable[..., StepLimits]) -> None:
    """T-MT05: 512 MiB touched under a 64 MiB limit ends in SIGKILL, violation "memory"."""
    limit = 64 * MIB
    limits = make_limits(memory_max_bytes=limit)

    def bomb() -> int:
        join(limits)
        # Multiplying bytes writes every page, so each one is charged.
        hoard = b"\x01" * (512 * MIB)
        return 0 if len(hoard) else 1

    with forked(bomb) as child:
        status = child.wait()
    assert os.WIFSIGNALED(status), f"the bomb was not killed (status {status})"
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert limits.violations() == ("memory",)
    peak = memory_peak_bytes(limits)
    if peak is not None:
        assert peak <= limit
    # The host (this process) is fine and can still allocate.
    assert len(bytearray(128 * MIB)) == 128 * MIB
    limits.remove()
    assert_nothing_remains(limits)


def test_fork_bomb_stops_at_pids_max(make_limits: Callable[..., StepLimits]) -> None:
    """T-MT05: forking in a loop gets EAGAIN at 16 processes, violation "processes"."""
    limits = make_limits(pids_max=16)
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()

    def bomb() -> int:
        os.close(report_r)
        os.close(release_w)
        join(limits)
        forks, failure = 0, 0
        while True:
            try:
                pid = os.fork()
            except OSError as e:
                failure = e.errno or 0
                break
            if pid == 0:
                # Sleep until the test closes the release pipe.
                os.close(report_w)
                os.read(release_r, 1)
                os._exit(0)
            forks += 1
        os.write(report_w, f"{forks} {failure}".encode())
        os.close(report_w)
        os.read(release_r, 1)
        with contextlib.suppress(ChildProcessError):
            while True:
                os.wait()
        return 0

    try:
        with forked(bomb) as child:
            os.close(report_w)
            os.close(release_r)
            forks, failure = map(int, read_report(report_r).split())
            pids = next(g for g in limits.groups if "pids" in g.controllers).path
            current = int((pids / "pids.current").read_text())
            assert failure == errno.EAGAIN
            assert forks == 16 - 1  # the bomb itself is the 16th
            assert current <= 16
            assert limits.violations() == ("processes",)
            os.close(release_w)
            release_w = -1
            assert child.wait() == 0
    finally:
        os.close(report_r)
        if release_w != -1:
            os.close(release_w)
    limits.remove()
    assert_nothing_remains(limits)


def test_threads_count_against_pids_max(make_limits: Callable[..., StepLimits]) -> None:
    """T-MT05: threads are tasks too; a thread bomb stops at pids_max."""
    limits = make_limits(pids_max=16)
    report_r, report_w = os.pipe()

    def bomb() -> int:
        os.close(report_r)
        join(limits)
        stop = threading.Event()
        started = 0
        with contextlib.suppress(RuntimeError):
            for _ in range(64):
                threading.Thread(target=stop.wait, daemon=True).start()
                started += 1
        os.write(report_w, str(started).encode())
        os.close(report_w)
        stop.set()
        return 0

    try:
        with forked(bomb) as child:
            os.close(report_w)
            started = int(read_report(report_r))
            assert child.wait() == 0
    finally:
        os.close(report_r)
    assert started == 16 - 1
    assert limits.violations() == ("processes",)


def test_step_cannot_leave_or_loosen_its_cgroups(make_limits: Callable[..., StepLimits]) -> None:
    """T-MT05: unprivileged, the step cannot move out, raise a limit or nest cgroups."""
    limits = make_limits()
    report_r, report_w = os.pipe()
    kill_cgroup = kill_cgroup_of(limits)
    mount = cgroups.find_cgroup2_mount()
    attempts: list[tuple[str, Callable[[], object]]] = [
        ("kill: join the mount root", partial(_write, mount / "cgroup.procs")),
        ("kill: join the run cgroup", partial(_write, kill_cgroup.parent / "cgroup.procs")),
        ("kill: create a sub-cgroup", partial(os.mkdir, kill_cgroup / "escape")),
    ]
    for group in limits.groups:
        name = "+".join(group.controllers)
        attempts += [
            (f"{name}: join the mount root", partial(_write, group.mount / "cgroup.procs")),
            (f"{name}: join the run cgroup", partial(_write, group.path.parent / "cgroup.procs")),
            (f"{name}: create a sub-cgroup", partial(os.mkdir, group.path / "escape")),
        ]
        if "pids" in group.controllers:
            raise_pids = partial(_write, group.path / "pids.max", b"max")
            attempts.append((f"{name}: raise pids.max", raise_pids))
        if "memory" in group.controllers:
            # The value that lifts the limit: "-1" on v1, "max" on v2.
            lift = (
                partial(_write, group.path / "memory.limit_in_bytes", b"-1")
                if group.version == "v1"
                else partial(_write, group.path / "memory.max", b"max")
            )
            attempts.append((f"{name}: raise memory", lift))

    def step() -> int:
        os.close(report_r)
        join(limits)
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        lines = []
        for label, attempt in attempts:
            try:
                attempt()
                lines.append(f"{label}: ALLOWED")
            except OSError as e:
                lines.append(f"{label}: {errno.errorcode.get(e.errno or 0, e.errno)}")
        os.write(report_w, "\n".join(lines).encode())
        os.write(report_w, b"\n" + Path("/proc/self/cgroup").read_bytes())
        return 0

    try:
        with forked(step) as child:
            os.close(report_w)
            report = read_report(report_r)
            assert child.wait() == 0
    finally:
        os.close(report_r)
    outcomes = report.splitlines()[: len(attempts)]
    assert len(outcomes) == len(attempts)
    for line in outcomes:
        assert line.endswith((": EACCES", ": EPERM")), line
    # Still in its kill cgroup: the v2 line names it.
    assert f"0::/{kill_cgroup.relative_to(mount)}" in report.splitlines()[len(attempts) :]
    # It is still inside every limit cgroup it joined.
    assert limits.violations() == ()
    limits.remove()
    assert_nothing_remains(limits)


def _write(path: Path, value: bytes = b"0") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)
