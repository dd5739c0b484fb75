# SPDX-License-Identifier: Apache-2.0
"""The list of checks a report accumulates, and safe reads of os_root files.

`CheckList` records one `Check` per verification; `run` turns a raised
`HaiosError` into a failed check with its (escaped) message, so a hostile
file can fail a check but never stop the report. `Reader` reads os_root
entries as hostile: relative to a directory descriptor, no symlink
followed, regular single-linked files only, size capped. Does I/O (reads
only) in `Reader`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from typing import Final, TypeVar

from haios._util.safedir import SafeDir
from haios._util.strict_json import printable
from haios.errors import HaiosError, InputError, PathError
from haios.report.model import Check, CheckCategory, CheckResult

T = TypeVar("T")
DETAIL_MAX_CHARS: Final = 2000
_CHUNK_BYTES: Final = 1 << 20


class CheckList:
    """Checks in the order they ran."""

    def __init__(self) -> None:
        """No checks yet."""
        self.items: list[Check] = []

    def add(self, category: CheckCategory, check_id: str, subject: str, result: CheckResult,
            detail: str) -> None:
        """Record one check; untrusted text is escaped and bounded."""
        self.items.append(Check(
            id=printable(check_id)[:512], category=category, subject=printable(subject)[:512],
            result=result, detail=printable(detail)[:DETAIL_MAX_CHARS]))

    def run(self, category: CheckCategory, check_id: str, subject: str,
            action: Callable[[], T], ok: Callable[[T], str]) -> T | None:
        """Run `action`; record `ok(result)` on success or the error on failure.

        Returns:
            What `action` returned, or None when it raised a `HaiosError`.
        """
        try:
            value = action()
        except HaiosError as exc:
            self.add(category, check_id, subject, "fail", str(exc))
            return None
        self.add(category, check_id, subject, "ok", ok(value))
        return value

    @property
    def failed(self) -> bool:
        """True when any check failed."""
        return any(check.result == "fail" for check in self.items)


class Reader:
    """Hostile-safe reads below one opened os_root directory."""

    def __init__(self, root: SafeDir) -> None:
        """Hold the opened os_root directory."""
        self.root = root
        self._subs: dict[str, SafeDir | None] = {}

    def close(self) -> None:
        """Close every descriptor."""
        for sub in self._subs.values():
            if sub is not None:
                sub.close()
        self.root.close()

    def sub(self, name: str) -> SafeDir | None:
        """The subdirectory `name`, None when absent.

        Raises:
            PathError: it exists but is not a real directory (e.g. a symlink).
        """
        if name not in self._subs:
            info = self.root.lstat(name)
            if info is None:
                self._subs[name] = None
            elif not stat.S_ISDIR(info.st_mode):
                raise PathError(f"{name}/ is not a directory (a symlink or a file)")
            else:
                self._subs[name] = self.root.sub(name)
        return self._subs[name]

    def where(self, directory: str) -> SafeDir:
        """The root (`""`) or an existing subdirectory.

        Raises:
            PathError: the subdirectory is missing or not a real directory.
        """
        if not directory:
            return self.root
        sub = self.sub(directory)
        if sub is None:
            raise PathError(f"{directory}/: missing")
        return sub

    def exists(self, directory: str, name: str) -> bool:
        """True when `directory/name` has an entry of any type (never followed)."""
        try:
            return self.where(directory).lstat(name) is not None
        except PathError:
            return False

    def read(self, directory: str, name: str, *, max_bytes: int) -> bytes:
        """The whole file, refused past `max_bytes`.

        Raises:
            PathError: missing, a symlink, special or hard-linked file.
            InputError: larger than `max_bytes`.
        """
        return self.where(directory).read_bytes(name, max_bytes=max_bytes)

    def digest(self, directory: str, name: str, *, max_bytes: int) -> tuple[str, int]:
        """(SHA-256, size) of a regular file, hashed as read through its descriptor.

        Read, not mapped: a client truncating the file meanwhile must not
        crash the report (SIGBUS on a shrunk mapping).

        Raises:
            PathError, InputError: as `read`; InputError also when the file
            grows past `max_bytes` while being read.
        """
        fd, _ = self.where(directory).open_regular(name, max_bytes=max_bytes)
        digest = hashlib.sha256()
        size = 0
        try:
            while chunk := os.read(fd, _CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise InputError(f"{directory}/{name}: grew past {max_bytes} bytes")
                digest.update(chunk)
        finally:
            os.close(fd)
        return digest.hexdigest(), size

    def head(self, directory: str, name: str, *, max_bytes: int) -> tuple[bytes, int]:
        """The first `max_bytes` of a regular file of any size, and its size.

        Raises:
            PathError: missing, a symlink, special or hard-linked file.
        """
        fd, size = self.where(directory).open_regular(name)
        try:
            return os.read(fd, max_bytes), size
        finally:
            os.close(fd)
