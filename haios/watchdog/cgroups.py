# SPDX-License-Identifier: Apache-2.0
"""Step cgroups: create them, kill every process in them, remove them.

Each run gets a parent cgroup `haios-<run_id>` on the cgroup v2 hierarchy and
each step a child `step-<step_id>`; the sandbox runner makes the step's first
process join that child before it drops privileges, so every process the step
ever starts (whatever it does with sessions, process groups or double forks)
stays inside it. Killing a step is then one write of "1" to `cgroup.kill`
(Linux >= 5.14): the kernel SIGKILLs every member, including children forked
while the kill runs, and no pid is ever named, so pid reuse cannot redirect
it. Without `cgroup.kill` the fallback freezes the cgroup (`cgroup.freeze`),
then SIGKILLs each member through a pidfd after checking, on the pidfd's
process, that it is still inside the cgroup, and repeats until it is empty.
Either way a kill waits for `populated 0` in `cgroup.events` (inotify on that
file, polling when inotify is unavailable) before the directory is removed.

What it does not do: it never kills by name or by process group, never reads
`/proc` to find victims (except the fallback's membership re-check), and does
not enable cgroup controllers (limits are the sandbox's business).
`parse_cgroup2_mount` is pure; everything else does file-system I/O.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import select
import signal
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, Literal

from haios.errors import EnvironmentUnavailableError, InputError
from haios.watchdog import _inotify

MOUNTINFO: Final = Path("/proc/self/mountinfo")
RUN_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: contract section 3
STEP_ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
RUN_PREFIX: Final = "haios-"
STEP_PREFIX: Final = "step-"

#: how long a kill waits for the tree to be gone before reporting it incomplete
DEFAULT_KILL_TIMEOUT_SECONDS: Final = 5.0
# Polling steps when inotify is unavailable: start fine (a kill usually
# completes in well under a millisecond) and back off to bound CPU use.
_POLL_FIRST_SECONDS: Final = 0.0002
_POLL_MAX_SECONDS: Final = 0.01
_EVENTS_READ_BYTES: Final = 256

KillMethod = Literal["kill", "freeze"]


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


# -- finding the hierarchy ------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_cgroup2_mount(mountinfo_text: str) -> Path | None:
    """Return the mount point of the cgroup v2 hierarchy, from mountinfo text.

    A mount whose root is "/" (the whole hierarchy) is preferred over a bind
    mount of a sub-tree.

    Args:
        mountinfo_text: the content of `/proc/self/mountinfo`.

    Returns:
        The mount point, or None when no cgroup2 file system is mounted.
    """
    candidates: list[tuple[bool, Path]] = []
    for line in mountinfo_text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or not rest or rest[0] != "cgroup2":
            continue
        root, mount_point = _unescape_mountinfo(fields[3]), _unescape_mountinfo(fields[4])
        candidates.append((root != "/", Path(mount_point)))
    if not candidates:
        return None
    # Stable sort: whole-hierarchy mounts first, then mountinfo order.
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1]


def find_cgroup2_mount(mountinfo: Path = MOUNTINFO) -> Path:
    """Find where the cgroup v2 hierarchy is mounted.

    Raises:
        EnvironmentUnavailableError: mountinfo is unreadable or shows no
            cgroup2 mount (no safe way to kill whole step trees).

    Side Effects:
        Reads `mountinfo`.
    """
    try:
        text = mountinfo.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise EnvironmentUnavailableError(f"cannot read {mountinfo}: {e.strerror}") from e
    mount = parse_cgroup2_mount(text)
    if mount is None:
        raise EnvironmentUnavailableError("no cgroup2 file system is mounted")
    return mount


# -- names ------------------------------------------------------------------------


def run_cgroup_name(run_id: str) -> str:
    """Return the run's parent cgroup name, `haios-<run_id>`.

    Raises:
        InputError: `run_id` does not match `RUN_ID_PATTERN` (it becomes a
            path component, so nothing else is accepted).
    """
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise InputError(f"run id {run_id!r} does not match {RUN_ID_PATTERN.pattern}")
    return RUN_PREFIX + run_id


def step_cgroup_name(step_id: str) -> str:
    """Return a step's cgroup name, `step-<step_id>`.

    Raises:
        InputError: `step_id` does not match the contract's step id pattern.
    """
    if not STEP_ID_PATTERN.fullmatch(step_id):
        raise InputError(f"step id {step_id!r} does not match {STEP_ID_PATTERN.pattern}")
    return STEP_PREFIX + step_id


# -- creating -----------------------------------------------------------------------


def kill_method(path: Path) -> KillMethod:
    """Return how a cgroup can be killed: "kill" if `cgroup.kill` exists.

    Raises:
        EnvironmentUnavailableError: neither `cgroup.kill` nor `cgroup.freeze`
            exists (not a cgroup v2 directory, or a kernel older than 5.2).

    Side Effects:
        Two lstat calls.
    """
    if (path / "cgroup.kill").exists():
        return "kill"
    if (path / "cgroup.freeze").exists():
        return "freeze"
    raise EnvironmentUnavailableError(f"{path} supports neither cgroup.kill nor cgroup.freeze")


def _mkdir_cgroup(path: Path) -> None:
    try:
        # Exclusive: a cgroup that already exists may hold processes this run
        # did not start, and must never be adopted.
        path.mkdir(mode=0o755)
    except FileExistsError as e:
        raise EnvironmentUnavailableError(f"cgroup {path} already exists") from e
    except OSError as e:
        raise EnvironmentUnavailableError(f"cannot create cgroup {path}: {e.strerror}") from e


def create_run_cgroup(run_id: str, *, root: Path | None = None) -> Path:
    """Create the run's parent cgroup `haios-<run_id>`.

    Args:
        run_id: a unique id of this run (see `RUN_ID_PATTERN`).
        root: the cgroup directory to create it in; the cgroup2 mount point
            when None.

    Returns:
        The new directory.

    Raises:
        InputError: `run_id` is not a valid name.
        EnvironmentUnavailableError: no cgroup2 hierarchy, the cgroup already
            exists, it cannot be created, or it can be neither killed nor
            frozen (it is removed again in that case).

    Side Effects:
        Creates a cgroup directory.
    """
    name = run_cgroup_name(run_id)
    base = find_cgroup2_mount() if root is None else root
    path = base / name
    _mkdir_cgroup(path)
    try:
        kill_method(path)
    except EnvironmentUnavailableError:
        _rmdir_quiet(path)
        raise
    return path


def create_step_cgroup(parent: Path, step_id: str) -> Path:
    """Create the cgroup `step-<step_id>` under a run's parent cgroup.

    Raises:
        InputError: `step_id` is not a valid step id.
        EnvironmentUnavailableError: it exists already or cannot be created.

    Side Effects:
        Creates a cgroup directory.
    """
    path = parent / step_cgroup_name(step_id)
    _mkdir_cgroup(path)
    return path


# -- reading state ------------------------------------------------------------------


def parse_events_populated(text: str) -> bool:
    """Return the `populated` value of a `cgroup.events` text.

    Raises:
        EnvironmentUnavailableError: the text has no `populated` line.
    """
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "populated":
            return value.strip() != "0"
    raise EnvironmentUnavailableError("cgroup.events has no populated line")


def _read_populated(events_fd: int) -> bool:
    # pread at offset 0 makes kernfs regenerate the file: no reopen needed.
    return parse_events_populated(os.pread(events_fd, _EVENTS_READ_BYTES, 0).decode("ascii"))


def is_populated(path: Path) -> bool:
    """Return True while any process lives in the cgroup or its descendants.

    A cgroup that no longer exists is not populated.

    Raises:
        EnvironmentUnavailableError: `cgroup.events` is unreadable or malformed.

    Side Effects:
        Reads `cgroup.events`.
    """
    try:
        text = (path / "cgroup.events").read_text(encoding="ascii")
    except FileNotFoundError:
        return False
    except OSError as e:
        raise EnvironmentUnavailableError(f"cannot read {path}/cgroup.events: {e}") from e
    return parse_events_populated(text)


def _read_cpu_seconds(path: Path) -> float | None:
    try:
        text = (path / "cpu.stat").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return int(value) / 1_000_000
    return None


# -- killing ----------------------------------------------------------------------


class _Target:
    """One cgroup being killed: its open `cgroup.events` descriptor."""

    def __init__(self, path: Path, method: KillMethod | None) -> None:
        self.path = path
        self.method: KillMethod = "kill"
        self.events_fd = -1
        self.gone = False
        self.error: str | None = None
        self.emptied_at: float | None = None
        try:
            self.method = method if method is not None else kill_method(path)
            self.events_fd = os.open(path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.gone = True
        except (OSError, EnvironmentUnavailableError) as e:
            self.error = str(e)

    def start(self) -> None:
        if self.gone or self.error is not None:
            return
        try:
            if self.method == "kill":
                _write_control(self.path / "cgroup.kill", b"1")
            else:
                _write_control(self.path / "cgroup.freeze", b"1")
                _signal_members(self.path)
        except FileNotFoundError:
            self.gone = True
        except OSError as e:
            if e.errno == errno.ENODEV:  # the cgroup was removed under us
                self.gone = True
            else:
                self.error = f"cannot kill {self.path}: {e.strerror}"

    def pending(self) -> bool:
        return not self.gone and self.error is None and self.emptied_at is None

    def check(self, now: float) -> None:
        try:
            populated = _read_populated(self.events_fd)
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
                _signal_members(self.path)
            except OSError as e:
                self.error = f"cannot signal members of {self.path}: {e.strerror}"

    def close(self) -> None:
        if self.events_fd >= 0:
            os.close(self.events_fd)
            self.events_fd = -1


def _write_control(path: Path, value: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)


def _subtree(path: Path) -> list[Path]:
    """Return `path` and every descendant cgroup directory, parents first."""
    out = [path]
    index = 0
    while index < len(out):
        try:
            with os.scandir(out[index]) as entries:
                out.extend(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            pass
        index += 1
    return out


def _cgroup_of(pid: int) -> str | None:
    """Return the cgroup v2 path of `pid` as /proc shows it, or None if gone."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _signal_members(path: Path) -> None:
    """SIGKILL every process in the cgroup subtree, through pidfds (fallback).

    A pid read from `cgroup.procs` may be recycled before it is signalled, so
    each is pinned with pidfd_open first and its membership re-checked on the
    pinned process; the signal goes to the pidfd, never to the raw pid.
    """
    mount = find_cgroup2_mount()
    for cgroup in _subtree(path):
        relative = "/" + cgroup.relative_to(mount).as_posix()
        try:
            pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            continue
        for pid in pids:
            _pidfd_kill_if_member(pid, relative)


def _pidfd_kill_if_member(pid: int, relative: str) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        member = _cgroup_of(pid)
        if member is not None and (member == relative or member.startswith(relative + "/")):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it exited between the listing and the signal: nothing to kill
    finally:
        os.close(pidfd)


def _wait_until_empty(targets: Sequence[_Target], deadline: float) -> None:
    """Block until each target is empty, gone, failed, or the deadline passed."""
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


def _wait_loop(
    targets: Sequence[_Target], deadline: float, watcher: _inotify.Inotify | None
) -> None:
    poll_seconds = _POLL_FIRST_SECONDS
    while True:
        now = time.monotonic()
        for target in targets:
            if target.pending():
                target.check(now)
        if not any(t.pending() for t in targets) or now >= deadline:
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


def _remove_tree(path: Path, deadline: float) -> bool:
    """rmdir the cgroup and its descendants, children first; True when gone."""
    for cgroup in reversed(_subtree(path)):
        while True:
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY: the last member is still leaving; retry briefly.
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    return not path.exists()
                time.sleep(_POLL_FIRST_SECONDS)
    return not path.exists()


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass


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
    complete = target.gone or target.emptied_at is not None
    if target.gone and target.emptied_at is None:
        target.emptied_at = time.monotonic()
    cpu_seconds = None if target.gone else _read_cpu_seconds(target.path)
    removed = target.gone
    if complete and remove and not target.gone:
        if target.method == "freeze":
            _thaw(target.path)
        removed = _remove_tree(target.path, deadline + 1.0)
    error = target.error
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
    try:
        _write_control(path / "cgroup.freeze", b"0")
    except OSError:
        pass  # it is empty and about to be removed; a frozen empty cgroup is harmless


def kill_cgroup(
    path: Path,
    *,
    timeout_seconds: float = DEFAULT_KILL_TIMEOUT_SECONDS,
    method: KillMethod | None = None,
    remove: bool = True,
) -> KillOutcome:
    """Kill every process in one cgroup subtree, wait until empty, remove it.

    See `kill_cgroups`; this is the single-cgroup form.

    Side Effects:
        As `kill_cgroups`.
    """
    return kill_cgroups([path], timeout_seconds=timeout_seconds, method=method, remove=remove)[0]


def remove_cgroup(path: Path, *, timeout_seconds: float = DEFAULT_KILL_TIMEOUT_SECONDS) -> None:
    """Remove a cgroup and its descendants, killing whatever still runs there.

    Idempotent: a missing cgroup is fine. Used when a step ended normally
    (its cgroup is normally empty then) and when a run closes.

    Raises:
        EnvironmentUnavailableError: the cgroup could not be emptied or
            removed before the deadline.

    Side Effects:
        May write `cgroup.kill`; removes cgroup directories.
    """
    if not path.exists():
        return
    outcome = kill_cgroup(path, timeout_seconds=timeout_seconds)
    if not outcome.removed:
        raise EnvironmentUnavailableError(outcome.error or f"cannot remove cgroup {path}")
