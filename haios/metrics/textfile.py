# SPDX-License-Identifier: Apache-2.0
"""`metrics.prom` and textfile-collector files: one atomic writer, the safe directory's.

The directory arrives as a descriptor the caller keeps; the file is
published with `SafeDir.write_atomic` (temp file with O_EXCL and no-follow,
exact mode, fsync, rename, fsync of the directory), which refuses a
symlink, FIFO, device, directory or hard-linked file at the name.
"""

from __future__ import annotations

import os

from haios._util.safedir import SafeDir


def write_atomically(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600,
                     label: str = "os_root") -> None:
    """Replace `name` in the directory behind `dir_fd` (borrowed) with `data`.

    Raises:
        PathError: `name` is not a plain file name, or something other than
            a lone regular file is at it.
        CopyError: a write, rename or sync failed (an EnvironmentUnavailableError).
    """
    with SafeDir(os.dup(dir_fd), label) as directory:
        directory.write_atomic(name, data, mode=mode)
