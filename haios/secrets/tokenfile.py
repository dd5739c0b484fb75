# SPDX-License-Identifier: Apache-2.0
"""The step's token file, written into the step's own secret filesystem.

Layout (the runner shows the filesystem read-only at `/haios/secret`, so the
step reads `/haios/secret/token`):

    <secret tmpfs root>  owner: the engine, group: the step's gid, mode 0o550
        token            owner: the step's uid and gid, mode 0o400, no newline

The filesystem is a fresh, detached tmpfs (sandbox/stepfs.py): no host path
names it, so nothing can be planted where the token goes, and it never
reaches a disk; it is dropped after the token is revoked. The root belongs
to the engine, not the step, so a step cannot change its mode or add
entries even if the read-only mount were missing; other uids cannot read
the file (threats T-V04, T-MT02, attack catalog case 81).

Does file-system I/O only; no Vault calls.
"""

from __future__ import annotations

import os
import stat
from typing import Final

from haios.errors import InternalError, SandboxSetupError
from haios.secrets.provider import IssuedToken

#: the file's name inside the secret directory (`VIEW_TOKEN_FILE` is /haios/secret/token)
TOKEN_FILE_NAME: Final = "token"
TOKEN_FILE_MODE: Final = 0o400

_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_token_into(secret_fd: int, token: IssuedToken, uid: int, gid: int) -> None:
    """Write the step's token into its secret filesystem, given by descriptor.

    This is what the engine uses: `secret_fd` is the root of a fresh,
    detached tmpfs (sandbox/stepfs.py) that no host path names, owned by
    the engine, group the step's gid, mode 0o550. The token never reaches a
    disk, and it is gone when the filesystem is closed after the step.

    Raises:
        SandboxSetupError: the directory is not empty, not the engine's, or
            open to others; or the write failed. The caller still holds the
            token and must revoke it.
        InternalError: uid or gid is 0.
    """
    if uid <= 0 or gid <= 0:
        raise InternalError("a token file is never owned by root or a negative id")
    info = os.fstat(secret_fd)
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid()
            or stat.S_IMODE(info.st_mode) & 0o027 or os.listdir(secret_fd)):
        raise SandboxSetupError("the step's secret filesystem is not fresh and private")
    try:
        fd = os.open(TOKEN_FILE_NAME, _FILE_FLAGS, TOKEN_FILE_MODE, dir_fd=secret_fd)
        try:
            os.fchmod(fd, TOKEN_FILE_MODE)
            os.fchown(fd, uid, gid)
            token.write_to(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SandboxSetupError(f"cannot write the token file: {exc.strerror}") from exc
