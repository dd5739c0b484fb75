# SPDX-License-Identifier: Apache-2.0
"""Kill-switch flags: their names and whether one is set (contract section 7).

A flag is set when a directory entry of its name exists, whatever its type:
regular file, directory, FIFO, socket, device, or a symlink (dangling or not).
Presence is decided by `lstat` alone, so a flag is never opened, read, or
followed, and a FIFO or a huge sparse file cannot block or slow the check
(attack catalog case 57). A path that cannot be examined (EACCES, ELOOP, EIO)
counts as set: an unknown flag state fails closed.

Flags: `<control_dir>/KILL` (global), `<control_dir>/KILL.<step_id>` (one
step), and the policy's extra paths (operator-wide, global).

What it does not do: it does not watch (see `_watch.py`) and does not kill.
The naming helpers are pure; the `*_present` functions do lstat calls only.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from haios.errors import InputError, PolicyLoadError
from haios.watchdog.cgroups import STEP_ID_PATTERN

GLOBAL_FLAG_NAME: Final = "KILL"
STEP_FLAG_PREFIX: Final = "KILL."

# lstat errors that mean "no entry of that name": the entry, or a directory
# on its path, does not exist (ENOTDIR: a path component is not a directory,
# so no entry can exist below it).
_ABSENT_ERRNOS: Final = frozenset({errno.ENOENT, errno.ENOTDIR})


def step_flag_name(step_id: str) -> str:
    """Return the flag name of one step, `KILL.<step_id>`.

    Raises:
        InputError: `step_id` does not match the contract's pattern (it
            becomes a path component, so nothing else is accepted).
    """
    if not STEP_ID_PATTERN.fullmatch(step_id):
        raise InputError(f"step id {step_id!r} does not match {STEP_ID_PATTERN.pattern}")
    return STEP_FLAG_PREFIX + step_id


def step_id_of_flag_name(name: str) -> str | None:
    """Return the step id a `KILL.<step_id>` entry name targets, else None.

    Names that are not a valid step flag (`KILL.`, `KILL.../x`, `KILL.A`)
    target no step and give None.
    """
    if not name.startswith(STEP_FLAG_PREFIX):
        return None
    step_id = name[len(STEP_FLAG_PREFIX) :]
    return step_id if STEP_ID_PATTERN.fullmatch(step_id) else None


def check_extra_paths(extra_paths: Sequence[Path]) -> tuple[Path, ...]:
    """Validate the policy's extra flag paths.

    Returns:
        The paths, unchanged, as a tuple.

    Raises:
        PolicyLoadError: a path is not absolute, names a root directory, or
            holds a NUL byte.
    """
    for path in extra_paths:
        text = os.fspath(path)
        if "\0" in text or not path.is_absolute() or path.name == "":
            raise PolicyLoadError(f"kill_switch extra path {text!r} is not an absolute file path")
    return tuple(extra_paths)


def flag_state(path: Path) -> str | None:
    """Return a description of the flag at `path` if it is set, else None.

    Returns:
        None when no entry exists; the path when an entry of any type exists;
        the path with the reason when it cannot be examined (fails closed).

    Side Effects:
        One lstat; the entry itself is never opened or followed.
    """
    try:
        os.lstat(path)
    except OSError as e:
        if e.errno in _ABSENT_ERRNOS:
            return None
        return f"{path} (cannot be examined: {e.strerror})"
    return str(path)


def global_flag_present(control_dir: Path, extra_paths: Sequence[Path]) -> str | None:
    """Name the global kill flag that is set, if any.

    The engine calls this before it starts a run and refuses with exit 4 when
    it returns a flag (contract section 7; operator extra paths count as
    global, section 12).

    Args:
        control_dir: `<os_root>/control`.
        extra_paths: the policy's `kill_switch.extra_paths` (absolute).

    Returns:
        The first set flag (`control/KILL` first, then the extra paths in
        order) as a path string, or None when none is set.

    Raises:
        PolicyLoadError: an extra path is not absolute.

    Side Effects:
        lstat calls only.
    """
    for path in (control_dir / GLOBAL_FLAG_NAME, *check_extra_paths(extra_paths)):
        state = flag_state(path)
        if state is not None:
            return state
    return None


def engaged_flag(control_dir: Path, extra_paths: Sequence[Path],
                 step_id: str | None = None) -> str | None:
    """The one kill-flag reader: the flag that stops a run or one step, if any.

    Global flags are checked first (they outrank a step's flag), then, when
    `step_id` is given, that step's `KILL.<step_id>`.

    Returns:
        The set flag as `flag_state` describes it (its path), or None.

    Raises:
        PolicyLoadError: an extra path is not absolute.
        InputError: `step_id` is not a valid step id.

    Side Effects:
        lstat calls only.
    """
    flag = global_flag_present(control_dir, extra_paths)
    if flag is not None or step_id is None:
        return flag
    return flag_state(control_dir / step_flag_name(step_id))


def step_flag_present(control_dir: Path, step_id: str) -> bool:
    """Return True when `<control_dir>/KILL.<step_id>` is set.

    Raises:
        InputError: `step_id` is not a valid step id.

    Side Effects:
        One lstat.
    """
    return flag_state(control_dir / step_flag_name(step_id)) is not None
