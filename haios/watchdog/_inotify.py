# SPDX-License-Identifier: Apache-2.0
"""A minimal inotify(7) binding over ctypes, for the kill-switch watchdog.

The standard library has no inotify, and the watchdog must not pull in a
dependency, so this module calls libc's `inotify_init1`, `inotify_add_watch`
and `inotify_rm_watch` through ctypes and parses the kernel's event records.

What it does not do: it never opens or reads a watched file (inotify watches
are taken by path, on directories and on cgroup interface files only), and it
does not decide what an event means; the callers do. `parse_events` is pure;
the `Inotify` class does I/O (system calls on its own descriptor).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import struct
from typing import Final

# Event bits from <sys/inotify.h>; only those the watchdog uses.
IN_MODIFY: Final = 0x00000002
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_UNMOUNT: Final = 0x00002000
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_DONT_FOLLOW: Final = 0x02000000
IN_ISDIR: Final = 0x40000000

_IN_CLOEXEC: Final = 0o2000000
_IN_NONBLOCK: Final = 0o4000

# struct inotify_event { int wd; uint32_t mask, cookie, len; char name[]; }
_HEADER: Final = struct.Struct("iIII")

#: one read returns at most this many bytes of records; more stay queued
READ_CHUNK_BYTES: Final = 64 * 1024


@dataclasses.dataclass(frozen=True)
class InotifyEvent:
    """One decoded inotify record.

    Attributes:
        wd: the watch descriptor the event belongs to (-1 for IN_Q_OVERFLOW).
        mask: the event bits.
        name: the entry name inside a watched directory ("" when none). Bytes
            that are not UTF-8 are kept as surrogate escapes (`os.fsdecode`).
    """

    wd: int
    mask: int
    name: str


def parse_events(data: bytes) -> list[InotifyEvent]:
    """Decode a buffer of inotify records as returned by read(2).

    Args:
        data: the bytes read from an inotify descriptor.

    Returns:
        The events, in kernel order. A truncated trailing record (which the
        kernel never produces) is dropped rather than misread.
    """
    events: list[InotifyEvent] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + length
        if end > len(data):
            break
        # The name is NUL-padded to an alignment boundary.
        raw_name = data[start:end].split(b"\0", 1)[0]
        events.append(InotifyEvent(wd=wd, mask=mask, name=os.fsdecode(raw_name)))
        offset = end
    return events


def _load_libc() -> ctypes.CDLL:
    """Return libc with inotify symbols, without importing ctypes.util."""
    # dlopen(NULL) sees the interpreter's own libc without ctypes.util, whose
    # import pulls in subprocess and slows the watchdog's start.
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "inotify_init1"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return libc


class Inotify:
    """An inotify instance: a non-blocking, close-on-exec descriptor.

    Not thread-safe; each user owns its instance.
    """

    def __init__(self) -> None:
        """Create the instance.

        Raises:
            OSError: inotify is unavailable (no libc symbol, ENOSYS, EMFILE,
                or the per-user instance limit was reached).

        Side Effects:
            Opens one file descriptor.
        """
        try:
            self._libc = _load_libc()
            init1 = self._libc.inotify_init1
        except (OSError, AttributeError) as e:
            raise OSError(errno.ENOSYS, f"inotify unavailable: {e}") from e
        init1.argtypes = [ctypes.c_int]
        init1.restype = ctypes.c_int
        self._libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._libc.inotify_add_watch.restype = ctypes.c_int
        self._libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self._libc.inotify_rm_watch.restype = ctypes.c_int
        fd = init1(_IN_CLOEXEC | _IN_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd: int = int(fd)

    def fileno(self) -> int:
        """Return the descriptor, for poll(2)."""
        return self._fd

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch `path` for `mask` events; return the watch descriptor.

        Watching the same inode twice returns the same descriptor (the kernel
        replaces the mask), so calling this again to refresh is harmless.

        Raises:
            OSError: the path cannot be watched (ENOENT, ENOTDIR with
                IN_ONLYDIR, EACCES, ENOSPC when out of watches).

        Side Effects:
            Adds a kernel watch (a path lookup; the target is not opened).
        """
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fspath(path))
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        """Remove a watch; a watch the kernel already dropped is not an error.

        Side Effects:
            Removes a kernel watch (the kernel queues IN_IGNORED for it).
        """
        if self._libc.inotify_rm_watch(self._fd, wd) < 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                raise OSError(err, os.strerror(err))

    def read_events(self) -> list[InotifyEvent]:
        """Read every queued event without blocking.

        Returns:
            The decoded events; empty when none is queued.

        Side Effects:
            Reads from the descriptor (consumes the queue).
        """
        events: list[InotifyEvent] = []
        while True:
            try:
                data = os.read(self._fd, READ_CHUNK_BYTES)
            except BlockingIOError:
                return events
            if not data:
                return events
            events.extend(parse_events(data))

    def close(self) -> None:
        """Close the descriptor (drops every watch); idempotent.

        Side Effects:
            Closes one file descriptor.
        """
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
