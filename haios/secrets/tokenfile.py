# SPDX-License-Identifier: Apache-2.0
"""The step's token file: created before the step, removed after it.

Layout on the host (the runner shows the directory read-only at
`/haios/secret`, so the step reads `/haios/secret/token`):

    secret_dir/        owner: the engine, group: the step's gid, mode 0o550
        token          owner: the step's uid and gid, mode 0o400, no newline

The directory belongs to the engine, not the step, so a step cannot change
its mode or add entries even if the runner's read-only mount were missing;
other users cannot enter it and other uids cannot read the file (threat
T-V04, attack catalog case 81).

Does file-system I/O only; no Vault calls. Does not choose `secret_dir`: the
engine picks a private location, preferably on a tmpfs (see below).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Final

from haios.errors import InternalError, SandboxSetupError
from haios.secrets.provider import IssuedToken

#: the file's name inside the secret directory (`VIEW_TOKEN_FILE` is /haios/secret/token)
TOKEN_FILE_NAME: Final = "token"
TOKEN_FILE_MODE: Final = 0o400
TOKEN_DIR_MODE: Final = 0o550

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
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


def write_token_file(secret_dir: Path, token: IssuedToken, uid: int, gid: int) -> None:
    """Create `secret_dir` holding the step's token file.

    The directory must not exist: a leftover one (a crash) or a planted one
    is refused, never reused. Everything is created relative to a directory
    descriptor opened with O_NOFOLLOW, and the file with O_EXCL|O_NOFOLLOW,
    so no symlink is followed. The file is not fsync'ed: durability buys
    nothing for a token that dies with the step, and a flushed copy could
    outlive the unlink on a disk-backed file system; put `secret_dir` on a
    tmpfs so the token never reaches a disk.

    Args:
        secret_dir: host path of the directory to create (its parent must
            exist and be private to the engine).
        token: the step's token.
        uid: the step's uid (owner of the file).
        gid: the step's gid (owner of the file, group of the directory).

    Raises:
        SandboxSetupError: the directory exists already, or any file-system
            call failed (what was created is removed again). The caller still
            holds the token and must revoke it.
        InternalError: uid or gid is 0 (a step never runs as root).

    Side Effects:
        Creates `secret_dir` and `secret_dir/token`, changes their owners.
    """
    if uid <= 0 or gid <= 0:
        raise InternalError("a token file is never owned by root or a negative id")
    try:
        os.mkdir(secret_dir, 0o700)
    except FileExistsError as exc:
        raise SandboxSetupError(
            f"token directory {secret_dir} already exists (stale or planted); not reused"
        ) from exc
    except OSError as exc:
        raise SandboxSetupError(
            f"cannot create token directory {secret_dir}: {exc.strerror}"
        ) from exc
    try:
        _fill_token_dir(secret_dir, token, uid, gid)
    except OSError as exc:
        error = SandboxSetupError(f"cannot write the token file in {secret_dir}: {exc.strerror}")
        try:
            shred_token_dir(secret_dir)
        except SandboxSetupError as cleanup:
            error.add_note(f"cleanup failed too: {cleanup}")
        raise error from exc


def _fill_token_dir(secret_dir: Path, token: IssuedToken, uid: int, gid: int) -> None:
    """Write the token file into the fresh directory, then hand both over.

    Args:
        secret_dir: the directory just created by this process.
        token: the step's token.
        uid: the step's uid.
        gid: the step's gid.

    Raises:
        OSError: any call failed, or the directory was swapped (EPERM).

    Side Effects:
        Creates the file; sets owners and modes.
    """
    dir_fd = os.open(secret_dir, _DIR_FLAGS)
    try:
        # The directory we opened must be the one we made (not a swapped-in
        # one): owned by us, still private.
        info = os.fstat(dir_fd)
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise PermissionError(1, "token directory changed under us")
        os.fchmod(dir_fd, 0o700)  # a strict umask must not lock the owner out
        fd = os.open(TOKEN_FILE_NAME, _FILE_FLAGS, TOKEN_FILE_MODE, dir_fd=dir_fd)
        try:
            os.fchmod(fd, TOKEN_FILE_MODE)  # the umask could only narrow it; be exact
            os.fchown(fd, uid, gid)
            token.write_to(fd)
        finally:
            os.close(fd)
        # Opened to the step's group only once the file is complete, so the
        # step never sees a partial token.
        os.fchown(dir_fd, -1, gid)
        os.fchmod(dir_fd, TOKEN_DIR_MODE)
    finally:
        os.close(dir_fd)


def shred_token_dir(secret_dir: Path) -> None:
    """Remove the step's token directory and everything in it.

    Call it after the token was revoked. The file is unlinked, not
    overwritten: a revoked token is worthless, and overwriting does not reach
    old copies on journaling or copy-on-write file systems or SSDs anyway
    (hence the tmpfs advice in `write_token_file`). Nothing is followed: the
    directory is opened with O_NOFOLLOW and entries are removed relative to
    it. A missing directory is not an error, so the call is idempotent.

    Args:
        secret_dir: the directory `write_token_file` created.

    Raises:
        SandboxSetupError: `secret_dir` is a symlink or not a directory, or
            removal failed.

    Side Effects:
        Deletes `secret_dir` and its entries.
    """
    try:
        dir_fd = os.open(secret_dir, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SandboxSetupError(
            f"cannot open token directory {secret_dir} for removal: {exc.strerror}"
        ) from exc
    try:
        # A non-root engine owns the directory but left it 0o550: it needs
        # write permission again to unlink.
        os.fchmod(dir_fd, 0o700)
        for name in os.listdir(dir_fd):
            _remove_entry(dir_fd, name)
        os.close(dir_fd)
        dir_fd = -1
        os.rmdir(secret_dir)
    except OSError as exc:
        raise SandboxSetupError(
            f"cannot remove token directory {secret_dir}: {exc.strerror}"
        ) from exc
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)


def _remove_entry(dir_fd: int, name: str) -> None:
    """Remove one entry of the token directory without following links.

    Only `token` is expected; anything else would be a runner bug, and is
    removed too so no secret lingers.

    Args:
        dir_fd: the open token directory.
        name: the entry's name.

    Raises:
        OSError: removal failed.

    Side Effects:
        Unlinks the entry (recursively for a directory, symlink-safe).
    """
    if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
