# SPDX-License-Identifier: Apache-2.0
"""Watching the kill-switch flags: inotify on the fast path, lstat as backstop.

inotify watches are put on the directories that hold flags (never on a flag:
a flag may be a FIFO or a dangling symlink): `control/` for `KILL` and
`KILL.<step_id>`, the parent of `control/` (to notice `control/` being
created or replaced), and the parent of each operator extra path. A create
or rename-into event whose name is a flag is a hit even if the entry is gone
by the time it is handled: a flag that flickers still engages (attack
catalog case 97).

inotify misses some things: a directory renamed or replaced above a watch,
network and FUSE file systems, a queue overflow. So the owner also calls
`scan()` at a bounded interval, which re-resolves every path, re-adds the
watches, and lstat's every flag (case 96). Without inotify, `scan()` is the
only mechanism and runs at the polling interval.

What it does not do: it does not decide what a hit does (the daemon latches
and kills). I/O: inotify system calls and lstat.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from haios.watchdog import _inotify
from haios.watchdog.flags import (
    GLOBAL_FLAG_NAME,
    flag_state,
    step_flag_name,
    step_id_of_flag_name,
)

_DIR_MASK: Final = (
    _inotify.IN_CREATE
    | _inotify.IN_MOVED_TO
    | _inotify.IN_DELETE_SELF
    | _inotify.IN_MOVE_SELF
    | _inotify.IN_ONLYDIR
)
# These mean a watch no longer sits on the path it was added for.
_LOST_MASK: Final = (
    _inotify.IN_DELETE_SELF | _inotify.IN_MOVE_SELF | _inotify.IN_IGNORED | _inotify.IN_UNMOUNT
)
_ENTRY_MASK: Final = _inotify.IN_CREATE | _inotify.IN_MOVED_TO

_ROLE_CONTROL: Final = "control"
_ROLE_CONTROL_PARENT: Final = "control_parent"
_ROLE_EXTRA_PARENT: Final = "extra_parent"


@dataclasses.dataclass(frozen=True)
class FlagHit:
    """A flag the watcher saw set.

    Attributes:
        scope: "global" or "step".
        flag: the flag's path (with the reason when it could not be examined).
        step_id: the step a per-step flag names; None for a global flag.
    """

    scope: str
    flag: str
    step_id: str | None


@dataclasses.dataclass(frozen=True)
class _Role:
    """Why a directory is watched: `kind` and the directory's path."""

    kind: str
    directory: Path


class FlagWatcher:
    """Watches `control/` and the operator extra paths. Not thread-safe."""

    def __init__(
        self, control_dir: Path, extra_paths: tuple[Path, ...], *, use_inotify: bool
    ) -> None:
        """Set up the watcher; inotify failing to start silently means polling.

        Args:
            control_dir: `<os_root>/control` (it may not exist yet).
            extra_paths: absolute operator flag paths.
            use_inotify: False forces polling only.

        Side Effects:
            Opens an inotify descriptor and adds watches (when enabled).
        """
        self._control_dir = control_dir
        self._extra_paths = extra_paths
        self._roles: list[_Role] = [
            _Role(_ROLE_CONTROL, control_dir),
            _Role(_ROLE_CONTROL_PARENT, control_dir.parent),
        ]
        self._roles.extend(_Role(_ROLE_EXTRA_PARENT, p.parent) for p in extra_paths)
        self._wds: dict[int, list[_Role]] = {}
        self._inotify: _inotify.Inotify | None = None
        if use_inotify:
            try:
                self._inotify = _inotify.Inotify()
            except OSError:
                self._inotify = None
        self.refresh_watches()

    @property
    def inotify_active(self) -> bool:
        """True when inotify runs (the polling backstop runs regardless)."""
        return self._inotify is not None

    def fileno(self) -> int | None:
        """Return the inotify descriptor to poll for readability, or None."""
        return None if self._inotify is None else self._inotify.fileno()

    def refresh_watches(self) -> None:
        """Re-resolve every watched directory and watch what is there now.

        A directory that does not exist (yet) is not watched; its parent's
        watch or the next scan catches its creation.

        Side Effects:
            inotify_add_watch / inotify_rm_watch calls.
        """
        if self._inotify is None:
            return
        fresh: dict[int, list[_Role]] = {}
        for role in self._roles:
            try:
                wd = self._inotify.add_watch(role.directory, _DIR_MASK)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ENOSPC):
                    continue  # the scan covers it (and fails closed on EACCES)
                raise
            fresh.setdefault(wd, []).append(role)
        for wd in set(self._wds) - set(fresh):
            self._inotify.rm_watch(wd)
        self._wds = fresh

    def drain(self) -> tuple[list[FlagHit], bool]:
        """Read queued inotify events.

        Returns:
            The flags the events name, and whether a rescan is needed (queue
            overflow, a watched directory moved or deleted, `control/`
            created or replaced).

        Side Effects:
            Reads the inotify descriptor; may remove stale watches.
        """
        if self._inotify is None:
            return [], False
        hits: list[FlagHit] = []
        rescan = False
        for event in self._inotify.read_events():
            if event.mask & _inotify.IN_Q_OVERFLOW:
                rescan = True
                continue
            if event.mask & _LOST_MASK:
                # Events after these come from an inode no longer at the path
                # (a renamed control/), so they must not count as flags.
                self._forget(event.wd)
                rescan = True
                continue
            for role in self._wds.get(event.wd, ()):
                hit, needs_rescan = self._classify(role, event.name)
                if hit is not None:
                    hits.append(hit)
                rescan = rescan or needs_rescan
        return hits, rescan

    def _forget(self, wd: int) -> None:
        """Drop a watch that no longer sits on its path."""
        if self._wds.pop(wd, None) is not None and self._inotify is not None:
            self._inotify.rm_watch(wd)

    def _classify(self, role: _Role, name: str) -> tuple[FlagHit | None, bool]:
        """Return the flag an entry name means for a role, and whether to rescan."""
        if role.kind == _ROLE_CONTROL:
            if name == GLOBAL_FLAG_NAME:
                return FlagHit("global", str(role.directory / name), None), False
            step_id = step_id_of_flag_name(name)
            if step_id is not None:
                return FlagHit("step", str(role.directory / name), step_id), False
            return None, False
        if role.kind == _ROLE_CONTROL_PARENT:
            return None, name == self._control_dir.name
        for path in self._extra_paths:
            if path.parent == role.directory and path.name == name:
                return FlagHit("global", str(path), None), False
        return None, False

    def scan(self, step_ids: Iterable[str]) -> list[FlagHit]:
        """Check every flag by lstat: the global ones and those of `step_ids`.

        Returns:
            Every flag set now (or that cannot be examined: fails closed).

        Side Effects:
            lstat calls.
        """
        hits: list[FlagHit] = []
        for path in (self._control_dir / GLOBAL_FLAG_NAME, *self._extra_paths):
            state = flag_state(path)
            if state is not None:
                hits.append(FlagHit("global", state, None))
        for step_id in step_ids:
            state = flag_state(self._control_dir / step_flag_name(step_id))
            if state is not None:
                hits.append(FlagHit("step", state, step_id))
        return hits

    def close(self) -> None:
        """Release the inotify descriptor.

        Side Effects:
            Closes a file descriptor.
        """
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
