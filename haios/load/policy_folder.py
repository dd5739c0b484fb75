# SPDX-License-Identifier: Apache-2.0
"""One reader, one rule, for every file of the operator's policy folder.

The policy folder is the only source of trust (contract sections 1 and 11),
so `policy.toml`, the key files and `profiles/*.toml` are all read here, under
the same checks: each directory on the way (the folder itself, `profiles/`,
every directory leading to a key file) and the file itself must be a real
directory or regular file reached without following a symlink (each step is
an `openat` with O_NOFOLLOW relative to the descriptor already checked),
owned by root or the engine's effective uid, and not writable by group or
others; a file's size is checked on its descriptor before it is read, and the
read itself is capped. Anything else is a `PolicyLoadError` (exit 6) naming
the path relative to the folder.

The directories above the folder itself are the operator's to secure (as
for /etc); only the folder's own last component must not be a symlink.
Does I/O on the policy folder only; interprets no content.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Final

from haios.errors import PolicyLoadError

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted in the folder opens at once and is refused by
# fstat instead of blocking the engine.
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_UNSAFE_BITS: Final = stat.S_IWGRP | stat.S_IWOTH


def _check_owner_and_mode(info: os.stat_result, label: str) -> None:
    """Refuse an entry that someone other than root or the engine could have written."""
    if info.st_mode & _UNSAFE_BITS:
        raise PolicyLoadError(f"{label}: writable by group or others "
                              f"(mode {stat.S_IMODE(info.st_mode):04o})")
    if info.st_uid not in (0, os.geteuid()):
        raise PolicyLoadError(f"{label}: owned by uid {info.st_uid}, "
                              "not by root or the engine's user")


def _open_error(label: str, exc: OSError) -> PolicyLoadError:
    # ELOOP (a symlink as last component) and ENOTDIR (a symlink or file where
    # a directory is expected) are how O_NOFOLLOW and O_DIRECTORY refuse a link.
    hint = "; symlinks are refused" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else ""
    return PolicyLoadError(f"{label}: cannot open ({exc.strerror}{hint})")


def _components(relative: str) -> list[str]:
    """The components of a relative path inside the folder; refuse anything else."""
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise PolicyLoadError(f"policy {relative!r}: not a normalised path inside the "
                              "policy folder")
    return parts


class PolicyFolder:
    """The policy folder, opened and checked once; every read goes through it.

    Attributes:
        path: the folder as given (for messages and `Policy.directory`).
        fd: the folder's checked directory descriptor.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: Path) -> PolicyFolder:
        """Open `path` as the policy folder.

        Raises:
            PolicyLoadError: missing, not a directory, a symlink, writable by
                group or others, or owned by another user.

        Side Effects:
            Opens a directory descriptor (closed by `close`).
        """
        label = f"policy folder {path}"
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            raise _open_error(label, exc) from exc
        try:
            _check_owner_and_mode(os.fstat(fd), label)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def close(self) -> None:
        """Close the folder's descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PolicyFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_dir(self, parts: list[str]) -> int:
        """Walk `parts` from the folder, checking each directory; return the last fd.

        The caller closes the returned descriptor (the folder's own is never
        returned: a duplicate is).
        """
        current = os.dup(self.fd)
        walked: list[str] = []
        try:
            for part in parts:
                walked.append(part)
                label = f"policy {'/'.join(walked)}/"
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=current)
                except OSError as exc:
                    raise _open_error(label, exc) from exc
                os.close(current)
                current = child
                _check_owner_and_mode(os.fstat(current), label)
        except BaseException:
            os.close(current)
            raise
        return current

    def names(self, relative_dir: str) -> list[str]:
        """Entry names of a checked directory inside the folder, sorted.

        Raises:
            PolicyLoadError: a directory on the way is unsafe or missing.

        Side Effects:
            Lists one directory.
        """
        fd = self._open_dir(_components(relative_dir))
        try:
            return sorted(os.listdir(fd))
        except OSError as exc:
            raise PolicyLoadError(f"policy {relative_dir}/: cannot list "
                                  f"({exc.strerror})") from exc
        finally:
            os.close(fd)

    def read(self, relative: str, *, max_bytes: int, label: str | None = None) -> bytes:
        """Read the file `relative` (e.g. ``keys/planner.pub.pem``) under the rules.

        Args:
            relative: a normalised path inside the folder.
            max_bytes: refuse a larger file without reading it.
            label: how messages name the file (default ``policy <relative>``).

        Returns:
            The file's bytes.

        Raises:
            PolicyLoadError: a directory on the way or the file is missing, a
                symlink, not a directory / regular file, writable by group or
                others, owned by another user, or larger than `max_bytes`.

        Side Effects:
            Opens and reads one file.
        """
        shown = label or f"policy {relative}"
        *directories, name = _components(relative)
        parent = self._open_dir(directories)
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _open_error(shown, exc) from exc
        finally:
            os.close(parent)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PolicyLoadError(f"{shown}: not a regular file")
            _check_owner_and_mode(info, shown)
            if info.st_size > max_bytes:
                raise PolicyLoadError(f"{shown}: larger than {max_bytes} bytes")
            data = _read_capped(fd, max_bytes)
        except OSError as exc:
            raise PolicyLoadError(f"{shown}: cannot read ({exc.strerror})") from exc
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise PolicyLoadError(f"{shown}: larger than {max_bytes} bytes")
        return data


def _read_capped(fd: int, max_bytes: int) -> bytes:
    """Read at most `max_bytes + 1` bytes (one more shows the file grew)."""
    chunks: list[bytes] = []
    left = max_bytes + 1
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
