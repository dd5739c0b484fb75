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

This module is the public face: names, creation, removal, and the kill
functions re-exported from `_kill.py` (which kills and waits) and
`_cgroupfs.py` (which reads and writes cgroup files).

What it does not do: it never kills by name or by process group, never reads
`/proc` to find victims (except the fallback's membership re-check), and does
not enable cgroup controllers (limits are the sandbox's business). The name
helpers are pure; everything else does file-system I/O.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Final

from haios.errors import EnvironmentUnavailableError, InputError
from haios.watchdog._cgroupfs import (
    KillMethod,
    find_cgroup2_mount,
    kill_method,
    parse_cgroup2_mount,
    parse_events_populated,
)
from haios.watchdog._kill import DEFAULT_KILL_TIMEOUT_SECONDS, KillOutcome, kill_cgroups

__all__ = [
    "BASE_NAME",
    "DEFAULT_KILL_TIMEOUT_SECONDS",
    "RUN_ID_PATTERN",
    "RUN_PREFIX",
    "STEP_ID_PATTERN",
    "STEP_PREFIX",
    "KillMethod",
    "KillOutcome",
    "create_run_cgroup",
    "create_step_cgroup",
    "default_base",
    "find_cgroup2_mount",
    "is_populated",
    "kill_cgroup",
    "kill_cgroups",
    "kill_method",
    "parse_cgroup2_mount",
    "parse_events_populated",
    "remove_cgroup",
    "run_cgroup_name",
    "step_cgroup_name",
]

RUN_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: contract section 3
STEP_ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
RUN_PREFIX: Final = "haios-"
#: the directory under the cgroup2 mount that holds every run's cgroup
BASE_NAME: Final = "haios"
STEP_PREFIX: Final = "step-"


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


def _mkdir_cgroup(path: Path) -> None:
    """Create a cgroup directory exclusively (never adopt an existing one)."""
    try:
        # Exclusive: a cgroup that already exists may hold processes this run
        # did not start, and must never be adopted.
        path.mkdir(mode=0o755)
    except FileExistsError as e:
        raise EnvironmentUnavailableError(f"cgroup {path} already exists") from e
    except OSError as e:
        raise EnvironmentUnavailableError(f"cannot create cgroup {path}: {e.strerror}") from e


def default_base() -> Path:
    """Return `<cgroup2 mount>/haios`, creating it (mode 0755) if needed.

    Run cgroups live one level below the mount rather than at it: the mount's
    root directory may be mode 0555 (it is on v1/v2 hybrid hosts), and the
    watchdog, which keeps no CAP_DAC_OVERRIDE, must be able to remove a run
    cgroup as the owner of its parent directory.

    Raises:
        EnvironmentUnavailableError: no cgroup2 hierarchy, or the directory
            cannot be created.

    Side Effects:
        May create a cgroup directory (it is shared by runs, never removed,
        and never holds a process).
    """
    base = find_cgroup2_mount() / BASE_NAME
    try:
        base.mkdir(mode=0o755, exist_ok=True)
    except OSError as e:
        raise EnvironmentUnavailableError(f"cannot create cgroup {base}: {e.strerror}") from e
    return base


def create_run_cgroup(run_id: str, *, root: Path | None = None) -> Path:
    """Create the run's parent cgroup `haios-<run_id>`.

    Args:
        run_id: a unique id of this run (see `RUN_ID_PATTERN`).
        root: the cgroup directory to create it in; `default_base()` when None.

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
    base = default_base() if root is None else root
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


def _rmdir_quiet(path: Path) -> None:
    """Remove an empty directory; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


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
    # Fast path for the usual case, a step that ended with its tree: an empty
    # cgroup is removed at once. rmdir fails (EBUSY) if anything still lives
    # there or a child cgroup exists, and then the kill path below handles it.
    if not is_populated(path):
        try:
            os.rmdir(path)
            return
        except OSError:
            pass
    outcome = kill_cgroup(path, timeout_seconds=timeout_seconds)
    if not outcome.removed:
        raise EnvironmentUnavailableError(outcome.error or f"cannot remove cgroup {path}")
