# SPDX-License-Identifier: Apache-2.0
"""Killing every process of a cgroup subtree, waiting, removing it.

The primary method writes "1" to `cgroup.kill` (Linux >= 5.14): the kernel
SIGKILLs every member, including children forked while the kill runs, and no
pid is ever named, so pid reuse cannot redirect it. Without `cgroup.kill`
the fallback freezes the cgroup (`cgroup.freeze`), then SIGKILLs each member
through a pidfd after checking, on the pidfd's process, that it is still in
the cgroup, and repeats until it is empty. Either way the kill waits for
`populated 0` in `cgroup.events` (inotify on that file, polling when inotify
is unavailable), then removes the directories so nothing can join them.

What it does not do: kill by name or process group, or read /proc to find
victims (except the fallback's membership re-check). I/O: all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import signal
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from haios.errors import EnvironmentUnavailableError
from haios.watchdog import _inotify
from haios.watchdog._cgroupfs import (
    KillMethod,
    cgroup_of,
    find_cgroup2_mount,
    kill_method,
    read_cpu_seconds,
    read_populated,
    subtree,
    write_control,
)

#: how long a kill waits for the tree to be gone before reporting it incomplete
DEFAULT_KILL_TIMEOUT_SECONDS: Final = 5.0
# Polling steps when inotify is unavailable: start fine (a kill usually
# completes in well under a millisecond) and back off to bound CPU use.
_POLL_FIRST_SECONDS: Final = 0.0002
_POLL_MAX_SECONDS: Final = 0.01


@dataclasses.dataclass(frozen=True)
class KillOutcome:
    """What one cgroup kill achieved.

    Attributes:
        path: the cgroup directory.
        method: "kill" (cgroup.kill) or "freeze" (freeze, then SIGKILL each).
        complete: True when the cgroup reported `populated 0` before the
            deadline (or no longer existed).
        emptied_at: `time.monotonic()` when it was first seen empty, or None.
        removed: the directory no longer exists.
        cpu_seconds: CPU time of the whole tree read from `cpu.stat` just
            before removal, or None when unreadable.
        error: why the kill could not be carried out, or None.
    """

    path: Path
    method: KillMethod
    complete: bool
    emptied_at: float | None
    removed: bool
    cpu_seconds: float | None
    error: str | None


class _Target:
    """One cgroup being killed: its open `cgroup.events` descriptor."""

    def __init__(self, path: Path, method: KillMethod | None) -> None:
        """Open the cgroup's events file; note if it is already gone."""
        self.path = path
        self.method: KillMethod = "kill"
        self.events_fd = -1
        self.gone = False
        self.error: str | None = None
        self.emptied_at: float | None = None
        try:
            # cgroup.events first: its absence means the cgroup is gone.
            self.events_fd = os.open(path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
            self.method = method if method is not None else kill_method(path)
        except FileNotFoundError:
            self.gone = True
        except (OSError, EnvironmentUnavailableError) as e:
            self.error = str(e)

    def start(self) -> None:
        """Issue the kill (cgroup.kill, or freeze and a first SIGKILL pass)."""
        if self.gone or self.error is not None:
            return
        try:
            if self.method == "kill":
                write_control(self.path / "cgroup.kill", b"1")
            else:
                write_control(self.path / "cgroup.freeze", b"1")
                signal_members(self.path)
        except FileNotFoundError:
            self.gone = True
        except OSError as e:
            if e.errno == errno.ENODEV:  # the cgroup was removed under us
                self.gone = True
            else:
                self.error = f"cannot kill {self.path}: {e.strerror}"

    def pending(self) -> bool:
        """Return True while the target still has to be waited for."""
        return not self.gone and self.error is None and self.emptied_at is None

    def check(self, now: float) -> None:
        """Re-read cgroup.events; note when empty; re-signal under the fallback."""
        try:
            populated = read_populated(self.events_fd)
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                self.gone = True
                self.emptied_at = now
                return
            self.error = f"cannot read {self.path}/cgroup.events: {e.strerror}"
            return
        if not populated:
            self.emptied_at = now
        elif self.method == "freeze":
            # Frozen members cannot fork; a second pass catches any that
            # joined before the freeze took effect.
            try:
                signal_members(self.path)
            except OSError as e:
                self.error = f"cannot signal members of {self.path}: {e.strerror}"

    def close(self) -> None:
        """Close the cgroup.events descriptor."""
        if self.events_fd >= 0:
            os.close(self.events_fd)
            self.events_fd = -1


def signal_members(path: Path) -> None:
    """SIGKILL every process in the cgroup subtree, through pidfds (fallback).

    A pid read from `cgroup.procs` may be recycled before it is signalled, so
    each is pinned with pidfd_open first and its membership re-checked on the
    pinned process; the signal goes to the pidfd, never to the raw pid.
    """
    mount = find_cgroup2_mount()
    for cgroup in subtree(path):
        relative = "/" + cgroup.relative_to(mount).as_posix()
        try:
            pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            continue
        for pid in pids:
            pidfd_kill_if_member(pid, relative)


def pidfd_kill_if_member(pid: int, relative: str) -> None:
    """SIGKILL `pid` through a pidfd if the pinned process is in `relative`."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        member = cgroup_of(pid)
        if member is not None and (member == relative or member.startswith(relative + "/")):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it exited between the listing and the signal: nothing to kill
    finally:
        os.close(pidfd)


def _wait_until_empty(targets: Sequence[_Target], deadline: float) -> None:
    """Block until each target is empty, gone, failed, or the deadline passed."""
    if _check_pending(targets, time.monotonic()):
        # Already empty (a clean run's end): no inotify instance, whose
        # close waits for an SRCU grace period (about 5 ms).
        return
    watcher: _inotify.Inotify | None
    try:
        watcher = _inotify.Inotify()
        for target in targets:
            if target.pending():
                watcher.add_watch(target.path / "cgroup.events", _inotify.IN_MODIFY)
    except OSError:
        # No inotify (or no watch): poll with a bounded back-off instead.
        watcher = None
    try:
        _wait_loop(targets, deadline, watcher)
    finally:
        if watcher is not None:
            watcher.close()


def _check_pending(targets: Sequence[_Target], now: float) -> bool:
    """Check every pending target once; True when none is pending any more."""
    for target in targets:
        if target.pending():
            target.check(now)
    return not any(target.pending() for target in targets)


def _wait_loop(
    targets: Sequence[_Target], deadline: float, watcher: _inotify.Inotify | None
) -> None:
    """Check targets on each wake-up (inotify or timer) until done or deadline."""
    poll_seconds = _POLL_FIRST_SECONDS
    while True:
        now = time.monotonic()
        if _check_pending(targets, now) or now >= deadline:
            return
        remaining = deadline - now
        if watcher is None:
            time.sleep(min(poll_seconds, remaining))
            poll_seconds = min(poll_seconds * 2, _POLL_MAX_SECONDS)
            continue
        # The freeze fallback re-signals on each wake-up, so it also wakes on
        # a short timer in case no cgroup.events change comes.
        freezing = any(t.method == "freeze" and t.pending() for t in targets)
        timeout = min(remaining, _POLL_MAX_SECONDS) if freezing else remaining
        ready, _, _ = select.select([watcher.fileno()], [], [], timeout)
        if ready:
            watcher.read_events()


def _remove_tree(path: Path, deadline: float) -> str | None:
    """Remove the cgroup and its descendants (rmdir), children first.

    Returns:
        None when the cgroup is gone, else why it is not.
    """
    for cgroup in reversed(subtree(path)):
        while True:
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY: the last member is still leaving; retry briefly.
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    return f"cannot remove cgroup {cgroup}: {e.strerror}"
                time.sleep(_POLL_FIRST_SECONDS)
    return None


def kill_cgroups(
    paths: Iterable[Path],
    *,
    timeout_seconds: float = DEFAULT_KILL_TIMEOUT_SECONDS,
    method: KillMethod | None = None,
    remove: bool = True,
) -> list[KillOutcome]:
    """Kill every process in each cgroup at once, wait, then remove them.

    All kills are issued before any wait, so several trees die in parallel.
    A cgroup that does not exist counts as already killed.

    Args:
        paths: cgroup directories (their descendants are killed too).
        timeout_seconds: how long to wait for all of them to be empty.
        method: force "kill" or "freeze"; detected per cgroup when None.
        remove: rmdir each emptied cgroup (and its child cgroups), so nothing
            can join it afterwards.

    Returns:
        One outcome per path, in order. Never raises for one bad cgroup: its
        outcome carries the error, and the others are still killed.

    Side Effects:
        Writes `cgroup.kill` (or `cgroup.freeze` and sends SIGKILL through
        pidfds), reads `cgroup.events`, removes cgroup directories.
    """
    started = time.monotonic()
    deadline = started + timeout_seconds
    targets = [_Target(p, method) for p in paths]
    try:
        for target in targets:
            target.start()
        _wait_until_empty(targets, deadline)
        return [_finish(t, deadline, remove=remove) for t in targets]
    finally:
        for target in targets:
            target.close()


def _finish(target: _Target, deadline: float, *, remove: bool) -> KillOutcome:
    """Turn a target's state into its outcome, removing it when emptied."""
    complete = target.gone or target.emptied_at is not None
    if target.gone and target.emptied_at is None:
        target.emptied_at = time.monotonic()
    cpu_seconds = None if target.gone else read_cpu_seconds(target.path)
    removed = target.gone
    error = target.error
    if complete and remove and not target.gone:
        if target.method == "freeze":
            _thaw(target.path)
        error = _remove_tree(target.path, deadline + 1.0)
        removed = error is None
    if not complete and error is None:
        error = f"{target.path} still populated after the kill deadline"
    return KillOutcome(
        path=target.path,
        method=target.method,
        complete=complete,
        emptied_at=target.emptied_at,
        removed=removed,
        cpu_seconds=cpu_seconds,
        error=error,
    )


def _thaw(path: Path) -> None:
    """Unfreeze an emptied cgroup before removal (fallback method)."""
    # It is empty and about to be removed: a failure leaves a frozen, empty
    # cgroup, which is harmless, and the removal reports its own errors.
    with contextlib.suppress(OSError):
        write_control(path / "cgroup.freeze", b"0")
