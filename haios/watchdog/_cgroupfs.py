# SPDX-License-Identifier: Apache-2.0
"""Low-level access to the cgroup v2 file system, shared by the kill code.

Finds the cgroup2 mount in mountinfo, reads `cgroup.events` and `cpu.stat`,
writes interface files (never through a link), lists a cgroup subtree and
reads a process's cgroup from /proc. It decides nothing.
`parse_cgroup2_mount` and `parse_events_populated` are pure; the rest does
file-system I/O.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Final, Literal

from haios.errors import EnvironmentUnavailableError

MOUNTINFO: Final = Path("/proc/self/mountinfo")
_EVENTS_READ_BYTES: Final = 256
# mountinfo: id, parent id, major:minor, root, mount point, then options.
_MOUNTINFO_FIELDS: Final = 5

KillMethod = Literal["kill", "freeze"]


def _unescape_mountinfo(field: str) -> str:
    """Undo mountinfo's octal escapes."""
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_cgroup2_mount(mountinfo_text: str) -> Path | None:
    """Return the mount point of the cgroup v2 hierarchy, from mountinfo text.

    A mount whose root is "/" (the whole hierarchy) is preferred over a bind
    mount of a sub-tree.

    Args:
        mountinfo_text: the content of `/proc/self/mountinfo`.

    Returns:
        The mount point, or None when no cgroup2 file system is mounted.
    """
    candidates: list[tuple[bool, Path]] = []
    for line in mountinfo_text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < _MOUNTINFO_FIELDS or not rest or rest[0] != "cgroup2":
            continue
        root, mount_point = _unescape_mountinfo(fields[3]), _unescape_mountinfo(fields[4])
        candidates.append((root != "/", Path(mount_point)))
    if not candidates:
        return None
    # Stable sort: whole-hierarchy mounts first, then mountinfo order.
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1]


def find_cgroup2_mount(mountinfo: Path = MOUNTINFO) -> Path:
    """Find where the cgroup v2 hierarchy is mounted.

    Raises:
        EnvironmentUnavailableError: mountinfo is unreadable or shows no
            cgroup2 mount (no safe way to kill whole step trees).

    Side Effects:
        Reads `mountinfo`.
    """
    try:
        text = mountinfo.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise EnvironmentUnavailableError(f"cannot read {mountinfo}: {e.strerror}") from e
    mount = parse_cgroup2_mount(text)
    if mount is None:
        raise EnvironmentUnavailableError("no cgroup2 file system is mounted")
    return mount


def kill_method(path: Path) -> KillMethod:
    """Return how a cgroup can be killed: "kill" if `cgroup.kill` exists.

    Raises:
        EnvironmentUnavailableError: neither `cgroup.kill` nor `cgroup.freeze`
            exists (not a cgroup v2 directory, or a kernel older than 5.2).

    Side Effects:
        Two lstat calls.
    """
    if (path / "cgroup.kill").exists():
        return "kill"
    if (path / "cgroup.freeze").exists():
        return "freeze"
    raise EnvironmentUnavailableError(f"{path} supports neither cgroup.kill nor cgroup.freeze")


def parse_events_populated(text: str) -> bool:
    """Return the `populated` value of a `cgroup.events` text.

    Raises:
        EnvironmentUnavailableError: the text has no `populated` line.
    """
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "populated":
            return value.strip() != "0"
    raise EnvironmentUnavailableError("cgroup.events has no populated line")


def read_populated(events_fd: int) -> bool:
    """Return `populated` from an open cgroup.events descriptor."""
    # pread at offset 0 makes kernfs regenerate the file: no reopen needed.
    return parse_events_populated(os.pread(events_fd, _EVENTS_READ_BYTES, 0).decode("ascii"))


def read_cpu_seconds(path: Path) -> float | None:
    """Return `usage_usec` of cpu.stat in seconds, or None."""
    try:
        text = (path / "cpu.stat").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return int(value) / 1_000_000
    return None


def write_control(path: Path, value: bytes) -> None:
    """Write a value to a cgroup interface file (never through a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)


def subtree(path: Path) -> list[Path]:
    """Return `path` and every descendant cgroup directory, parents first."""
    out = [path]
    index = 0
    while index < len(out):
        # A cgroup removed while we walk simply has no descendants left.
        with contextlib.suppress(FileNotFoundError), os.scandir(out[index]) as entries:
            out.extend(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
        index += 1
    return out


def cgroup_of(pid: int) -> str | None:
    """Return the cgroup v2 path of `pid` as /proc shows it, or None if gone."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None
