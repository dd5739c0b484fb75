# SPDX-License-Identifier: Apache-2.0
"""Directory-descriptor I/O that never follows a link (contract section 12).

Every file under os_root is reached relative to an open directory
descriptor with O_NOFOLLOW, checked with fstat to be a regular file (or a
directory), and read with a hard byte cap through the descriptor, so a
symlink, FIFO, device or oversize file planted by a client is refused
without being followed, blocked on, or read whole. Writes are atomic
(temp file, fsync, rename, fsync of the directory) and never open through
an existing entry. This module does I/O; it holds no policy.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import secrets
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from haios.errors import CopyError, InputError, PathError

if TYPE_CHECKING:
    from haios._util.durability import Barrier

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK: Final = 1 << 20


def _describe(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class SafeDir:
    """An open directory; every operation is relative to its descriptor.

    Attributes:
        fd: the directory's descriptor (O_DIRECTORY|O_NOFOLLOW).
        label: a display name used in error messages (never a secret).
    """

    def __init__(self, fd: int, label: str) -> None:
        self.fd = fd
        self.label = label

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], label: str | None = None) -> SafeDir:
        """Open a directory by path; the final component must not be a symlink.

        Raises:
            PathError: the path is missing, a symlink, or not a directory.
        """
        shown = label or os.fspath(path)
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            raise PathError(f"{shown}: cannot open directory ({_reason(exc)})") from exc
        return cls(fd, shown)

    def sub(self, name: str, *, create: bool = False, mode: int = 0o755) -> SafeDir:
        """Open (optionally create) the subdirectory `name`, never through a link.

        Raises:
            PathError: `name` exists and is not a real directory, or cannot be made.
        """
        label = f"{self.label}/{name}"
        if create:
            try:
                os.mkdir(name, mode, dir_fd=self.fd)
            except FileExistsError:
                pass  # an existing entry is checked by the no-follow open below
            except OSError as exc:
                raise PathError(f"{label}: cannot create ({_reason(exc)})") from exc
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise PathError(f"{label}: not a directory we may enter ({_reason(exc)})") from exc
        return SafeDir(fd, label)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inspecting ----------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result | None:
        """lstat an entry; None when absent. Never follows a link."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        """The directory's entry names, sorted."""
        return sorted(os.listdir(self.fd))

    # -- reading -------------------------------------------------------------

    def open_regular(self, name: str, *, max_bytes: int | None = None) -> tuple[int, int]:
        """Open `name` for reading; return (fd, size). Caller closes fd.

        Raises:
            PathError: missing, a link, or not a regular file (or hard-linked).
            InputError: larger than `max_bytes` (checked on the descriptor).
        """
        label = f"{self.label}/{name}"
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except FileNotFoundError as exc:
            raise PathError(f"{label}: missing") from exc
        except OSError as exc:
            raise PathError(f"{label}: cannot open ({_reason(exc)})") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PathError(f"{label}: {_describe(info.st_mode)}, not a regular file")
            if info.st_nlink != 1:
                raise PathError(f"{label}: has {info.st_nlink} hard links")
            if max_bytes is not None and info.st_size > max_bytes:
                raise InputError(f"{label}: {info.st_size} bytes exceeds the {max_bytes} limit")
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_size

    def read_bytes(self, name: str, *, max_bytes: int) -> bytes:
        """Read a whole regular file, refusing more than `max_bytes`.

        Raises:
            PathError, InputError: as `open_regular`; InputError also when the
            file grows past the cap while being read.
        """
        fd, _ = self.open_regular(name, max_bytes=max_bytes)
        try:
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - total))
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise InputError(f"{self.label}/{name}: exceeds the {max_bytes} limit")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    # -- writing -------------------------------------------------------------

    def check_replaceable(self, name: str) -> None:
        """Refuse an existing entry that is not a plain, singly-linked file.

        Raises:
            PathError: a symlink, FIFO, device, directory or hardlink is there.
        """
        info = self.lstat(name)
        if info is None:
            return
        if not stat.S_ISREG(info.st_mode):
            raise PathError(f"{self.label}/{name}: {_describe(info.st_mode)} at an engine path")
        if info.st_nlink != 1:
            raise PathError(f"{self.label}/{name}: hard-linked file at an engine path")

    def write_atomic(self, name: str, data: bytes, *, mode: int = 0o644,
                     barrier: Barrier | None = None) -> None:
        """Publish `data` as `name` atomically: temp, fsync, rename, fsync dir.

        A crash at any instant leaves the old or the new file, never a torn one.
        With a `barrier`, both fsyncs wait for its flush (many files, one
        journal commit); until then the file is in place but not yet durable.

        Raises:
            PathError: an unexpected entry occupies `name`, or the write failed.

        Side Effects:
            Creates and renames a temp file in this directory; fsyncs.
        """
        self._publish(name, mode, lambda fd: _write_all(fd, data), barrier)

    def write_atomic_durable_with(self, name: str, data: bytes, barrier: Barrier, *,
                                  mode: int = 0o644) -> None:
        """Publish `data` as `name` atomically and durably, with `barrier`'s pending writes.

        The temp file joins the barrier, one flush makes it and everything
        pending durable, then the rename and an fsync of the directory:
        the contract's temp, sync, rename, directory sync, with one sync
        for the whole batch.

        Raises:
            PathError: an unexpected entry occupies `name`.
            CopyError: the write or a sync failed.
        """
        self._publish(name, mode, lambda fd: _write_all(fd, data), barrier, flush=True)

    def write_atomic_from(self, name: str, src_fd: int, size: int, *, mode: int = 0o644,
                          barrier: Barrier | None = None) -> None:
        """Publish the first `size` bytes behind `src_fd` as `name`, atomically.

        Raises:
            PathError: an unexpected entry occupies `name`, or the source shrank.

        Side Effects:
            As `write_atomic`; the copy is made in-kernel.
        """

        def fill(fd: int) -> None:
            copied = 0
            while copied < size:
                n = copy_chunk(src_fd, fd, size - copied, offset_src=copied)
                if n == 0:
                    raise PathError(f"{self.label}/{name}: source shrank while copying")
                copied += n

        self._publish(name, mode, fill, barrier)

    def _publish(self, name: str, mode: int, fill: Callable[[int], None],
                 barrier: Barrier | None, *, flush: bool = False) -> None:
        """Temp file (O_EXCL, no-follow), fill, fsync, rename over `name`, fsync dir.

        With a `barrier`, the fsyncs are deferred to it; with `flush` too, the
        barrier is flushed (this file's data with everything pending) before
        the rename, and the directory fsynced after it.
        """
        _check_name(self.label, name)
        self.check_replaceable(name)
        # The temp name never ends like the real one (a collector reading
        # `*.prom` never sees a partial file).
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, _NEW_FLAGS, mode, dir_fd=self.fd)
        except OSError as exc:
            raise PathError(f"{self.label}/{name}: cannot create ({_reason(exc)})") from exc
        try:
            try:
                os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
                fill(fd)
                if barrier is None:
                    os.fsync(fd)
                else:
                    barrier.defer_file(fd)
                    if flush:
                        barrier.flush()  # this file and everything pending, together
            except OSError as exc:
                # A full or failing disk is the environment, not the input.
                raise CopyError(f"{self.label}/{name}: cannot write ({_reason(exc)})") from exc
            finally:
                os.close(fd)
            try:
                # rename replaces a symlink or FIFO planted after the check
                # without following it; a directory planted since fails.
                os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            except IsADirectoryError as exc:
                raise PathError(f"{self.label}/{name}: a directory is at an engine path"
                                ) from exc
            except OSError as exc:
                raise CopyError(f"{self.label}/{name}: cannot rename ({_reason(exc)})") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        try:
            if barrier is None or flush:
                os.fsync(self.fd)
            else:
                barrier.defer_dir(self.fd)
        except OSError as exc:
            raise CopyError(f"{self.label}: cannot sync the directory ({_reason(exc)})") from exc

    def unlink(self, name: str) -> None:
        """Remove `name` if present (never follows it)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

def copy_chunk(src: int, dst: int, count: int, *, offset_src: int | None = None) -> int:
    """Copy up to `count` bytes in the kernel; return how many were copied.

    copy_file_range refuses between file systems of different types (a
    step's tmpfs and the store's disk, the store and os_root); sendfile
    does not.
    """
    try:
        return os.copy_file_range(src, dst, count, offset_src=offset_src)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    return os.sendfile(dst, src, offset_src, count)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symlink"
    if exc.errno == errno.ENOTDIR:
        return "not a directory"
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


def sha256_fd(fd: int, size: int) -> str:
    """SHA-256 of the first `size` bytes behind `fd`, through a page-aligned mmap.

    mmap hands hashlib page-aligned memory, which keeps the SHA-NI path at
    full speed (a misaligned read buffer costs about a third here).
    """
    digest = hashlib.sha256()
    if size > 0:
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
            digest.update(mapped)
    return digest.hexdigest()


def _check_name(label: str, name: str) -> None:
    """Refuse anything but one plain path component."""
    if name in {"", ".", ".."} or "/" in name or "\0" in name:
        raise PathError(f"{label}: {name!r} is not a plain file name")
