# SPDX-License-Identifier: Apache-2.0
"""The engine's private run area: outside os_root, under the operator's state_dir.

`os_root` is owned and written by the client, who keeps acting during the
run: a same-directory rename needs write access to os_root only. So nothing
the engine keeps for itself (verified input copies, the watchdog's journal,
uid leases) lives there (threat T-MT01). It lives here:

    <state_dir>/                root-owned, 0700, no link followed on the way
        uids/                   the host-wide uid lease pool (sandbox/uidpool.py)
        roots/<dev>-<ino>-<btime>/  one area per os_root, locked while a run holds it
            store/              verified copies of inputs and products
            watchdog.jsonl      kills the watchdog did while the engine was dead
            audit.unsigned      the engine made os_root's audit.jsonl; no state yet
            audit.set-aside.jsonl  such a log left by a crash, kept for operators

An area is named by the device, inode and birth time of the os_root
directory the engine holds open, so no other os_root can name or collide
with it, and a renamed os_root keeps its area. The inode cannot be reused
while the run holds the descriptor; the birth time keeps a directory made
later on a reused inode (the client deleted its os_root and made another)
from inheriting the old one's area, its journal or its leftover marker.
The exclusive flock on the area's directory is the os_root lock (exit
7): it sits where the client cannot unlink or replace it (threat T-MT04).

Every component of state_dir must be a real directory owned by root (or
the engine's euid) and not writable by group or others (a root-owned
sticky directory such as /tmp may be a parent); anything else is exit 6.
Does I/O.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path
from typing import Final, Self

from haios._util.safedir import SafeDir
from haios.errors import BusyError, EnvironmentUnavailableError
from haios.sandbox import _libc

ROOTS_DIR: Final = "roots"
UIDS_DIR: Final = "uids"
STORE_DIR: Final = "store"
#: present while os_root's audit.jsonl was created by the engine and no
#: signed state covers it yet (a crash then leaves an unsignable log)
UNSIGNED_AUDIT: Final = "audit.unsigned"
#: where such a leftover log is kept once set aside
SET_ASIDE_AUDIT: Final = "audit.set-aside.jsonl"
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _check_private(fd: int, shown: str, *, sticky_ok: bool = False) -> None:
    """Owned by root (or us), writable by nobody else.

    With `sticky_ok`, a root-owned sticky directory such as /tmp passes:
    others may add entries there but never rename or remove ours, and every
    component below it is checked in turn.
    """
    info = os.fstat(fd)
    if info.st_uid not in (0, os.geteuid()):
        raise EnvironmentUnavailableError(f"state_dir {shown}: owned by uid {info.st_uid}, "
                                          "not root")
    if sticky_ok and info.st_mode & stat.S_ISVTX:
        return
    if info.st_mode & 0o022:
        raise EnvironmentUnavailableError(f"state_dir {shown}: writable by group or others "
                                          f"(mode {stat.S_IMODE(info.st_mode):o})")


def open_state_dir(path: Path) -> SafeDir:
    """Open (creating missing parts 0700) the operator's state_dir, checking every part.

    Raises:
        EnvironmentUnavailableError: a component is a link, not a directory,
            not root's, or writable by others (exit 6).
    """
    if not path.is_absolute():
        raise EnvironmentUnavailableError(f"state_dir {path}: not an absolute path")
    fd = os.open("/", _DIR_FLAGS)
    shown = ""
    parts = path.parts[1:]
    try:
        for index, part in enumerate(parts):
            shown = f"{shown}/{part}"
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise EnvironmentUnavailableError(
                    f"state_dir {shown}: not a directory we may enter ({exc.strerror})") from exc
            os.close(fd)
            fd = child
            _check_private(fd, shown, sticky_ok=index < len(parts) - 1)
    except BaseException:
        os.close(fd)
        raise
    return SafeDir(fd, "state_dir")


class RunArea:
    """One os_root's private area, locked for the life of the object."""

    def __init__(self, state: SafeDir, area: SafeDir, path: Path) -> None:
        self.state = state
        self.dir = area
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path, os_root_fd: int) -> Self:
        """Open and lock the area of the os_root open at `os_root_fd`.

        Raises:
            EnvironmentUnavailableError: state_dir is unusable (exit 6).
            BusyError: another run holds this os_root (exit 7).
        """
        name = area_name(os_root_fd)
        state = open_state_dir(state_dir)
        try:
            roots = state.sub(ROOTS_DIR, create=True, mode=0o700)
            try:
                area = roots.sub(name, create=True, mode=0o700)
            finally:
                roots.close()
            _check_private(area.fd, f"{ROOTS_DIR}/{name}")
            _lock(area)
        except BaseException:
            state.close()
            raise
        return cls(state, area, state_dir / ROOTS_DIR / name)

    def fresh_store(self) -> SafeDir:
        """An empty `store/`: copies from an earlier run are never trusted."""
        self.drop_store()
        return self.dir.sub(STORE_DIR, create=True, mode=0o700)

    def drop_store(self) -> None:
        """Remove `store/` (it holds only flat files the engine copied)."""
        if self.dir.lstat(STORE_DIR) is not None:
            shutil.rmtree(STORE_DIR, dir_fd=self.dir.fd)

    def mark_unsigned_audit(self) -> None:
        """Durably note, before the engine creates audit.jsonl, that it is ours."""
        self.dir.write_atomic(UNSIGNED_AUDIT, b"", mode=0o600)

    def has_unsigned_audit(self) -> bool:
        """True when the engine created os_root's audit.jsonl and signed no state yet."""
        return self.dir.lstat(UNSIGNED_AUDIT) is not None

    def clear_unsigned_audit(self) -> None:
        """A signed state now covers the log: a missing state is tampering again."""
        if self.has_unsigned_audit():
            self.dir.unlink(UNSIGNED_AUDIT)
            os.fsync(self.dir.fd)

    def set_aside(self, data: bytes) -> None:
        """Keep an unsignable leftover audit log for operators (root-only)."""
        self.dir.write_atomic(SET_ASIDE_AUDIT, data, mode=0o600)

    def uid_dir(self) -> SafeDir:
        """The host-wide uid lease directory (shared by every engine)."""
        return self.state.sub(UIDS_DIR, create=True, mode=0o700)

    def journal_path(self, name: str) -> Path:
        """A host path inside the area, for the watchdog process.

        Safe to hand out by path: every component is root's and not
        writable by others (checked when the area was opened).
        """
        return self.path / name

    def close(self) -> None:
        """Release the lock and every descriptor."""
        self.dir.close()
        self.state.close()


def _lock(area: SafeDir) -> None:
    try:
        fcntl.flock(area.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise BusyError("os_root busy: another haios run holds it") from exc
        raise EnvironmentUnavailableError(f"cannot lock the run area ({exc.strerror})") from exc


def area_name(os_root_fd: int) -> str:
    """`<dev>-<ino>-<btime ns>` of the directory (`<dev>-<ino>` where the file
    system keeps no birth time), in hex."""
    info = os.fstat(os_root_fd)
    name = f"{info.st_dev:x}-{info.st_ino:x}"
    try:
        birth = _libc.statx_btime_ns(os_root_fd)
    except OSError as exc:
        raise EnvironmentUnavailableError(f"os_root: cannot statx ({exc.strerror})") from exc
    return name if birth is None else f"{name}-{birth:x}"
