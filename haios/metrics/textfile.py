# SPDX-License-Identifier: Apache-2.0
"""`metrics.prom`: written atomically through a directory descriptor.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from typing import TYPE_CHECKING

from haios.errors import EnvironmentUnavailableError, PathError

if TYPE_CHECKING:

    pass

_log = logging.getLogger(__name__)

# -- metrics.prom (I/O) ----------------------------------------------------------


def _check_replaceable(dir_fd: int, name: str) -> None:
    """Refuse a bad name, or anything but a lone regular file at it (contract 12)."""
    if name in {"", ".", ".."} or "/" in name or "\0" in name:
        msg = f"{name!r} is not a plain file name"
        raise PathError(msg)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as e:
        msg = f"cannot stat {name}: {e.strerror or type(e).__name__}"
        raise EnvironmentUnavailableError(msg) from e
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        msg = f"{name} is not a regular file with a single link"
        raise PathError(msg)


def write_atomically(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600) -> None:
    """Temp file, write, fsync, rename over `name`, fsync the directory.

    The file gets exactly `mode`, whatever the umask. The temporary name
    never ends in `.prom`, so a textfile collector never reads a partial file.

    Raises:
        PathError: a directory was planted at `name`.
        EnvironmentUnavailableError: any other write, rename or sync failure.
    """
    temp = f".{name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, mode, dir_fd=dir_fd)
    except OSError as e:
        msg = f"cannot create a temporary file for {name}: {e.strerror or type(e).__name__}"
        raise EnvironmentUnavailableError(msg) from e
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # rename replaces a symlink or FIFO planted after the check without
        # following it; a directory planted since makes it fail (EISDIR).
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        _remove_quietly(dir_fd, temp)
        msg = f"cannot write {name}: {e.strerror or type(e).__name__}"
        if isinstance(e, IsADirectoryError):
            raise PathError(msg) from e
        raise EnvironmentUnavailableError(msg) from e
    try:
        os.fsync(dir_fd)
    except OSError as e:
        msg = f"cannot sync the directory of {name}: {e.strerror or type(e).__name__}"
        raise EnvironmentUnavailableError(msg) from e


def _remove_quietly(dir_fd: int, name: str) -> None:
    """Best-effort removal of a temporary file after a failure (logged, not raised)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError as e:
        # The original error is the one to report; this one is only logged.
        _log.warning("cannot remove temporary file %s: %s", name, e.strerror)


def write_textfile(dir_fd: int, name: str, data: bytes) -> None:
    """Replace `name` in `dir_fd` with `data`, refusing anything but a plain file there.

    Raises:
        PathError: a symlink, FIFO, device, directory or hardlinked file is at the path.
        EnvironmentUnavailableError: writing, syncing or renaming failed.
    """
    _check_replaceable(dir_fd, name)
    write_atomically(dir_fd, name, data)
