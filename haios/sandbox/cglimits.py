# SPDX-License-Identifier: Apache-2.0
"""Per-step cgroup limits on memory and process count (T-MT05).

What is limited: the memory of a step's whole process tree (anonymous
memory, page cache, tmpfs pages it writes, kernel memory charged to it;
swap is closed so the tree cannot escape the limit by being swapped out)
and the number of processes and threads in the tree. Past the memory limit
the kernel's OOM killer SIGKILLs a process of the step; past the process
limit fork(2) and clone(2) fail with EAGAIN. Both are recorded as counters
that `StepLimits.violations` turns into the violations "memory" and
"processes".

Why cgroups and not rlimits: RLIMIT_AS bounds one process's address space,
so N processes may hold N times it; RLIMIT_NPROC counts the processes of a
uid, not of a tree, and is only checked at fork and setuid. Neither bounds
kernel memory or page cache. A cgroup bounds every process of the step
together, descendants that outlived their parent included, because every
child is born in its parent's cgroup and the step, unprivileged, cannot
move itself out (the directories and their `cgroup.procs` are root-owned,
mode 0755/0644).

Where: `detect` looks for each controller on a cgroup2 mount first (a pure
v2 host: the root's `cgroup.controllers` lists it and haios can enable it in
the root's `cgroup.subtree_control`), then on a mounted v1 hierarchy (a
hybrid host: v1 controllers at /sys/fs/cgroup/<controller> next to a
controller-less cgroup2 hierarchy at /sys/fs/cgroup/unified).

- Hybrid (v1): each controller gets a cgroup of its own,
  `<v1 mount>/haios/<run_id>/<step_id>`, created and removed here. The init
  joins them after the watchdog's v2 kill cgroup; v1 and v2 are separate
  hierarchies, so joining them leaves the step in its kill cgroup.
- Pure v2: a process is in exactly one cgroup of the v2 hierarchy, so a
  separate v2 limit cgroup joined after the kill cgroup would move the step
  out of it and `cgroup.kill` would no longer reach the tree. The limits are
  therefore written into the watchdog's step cgroup itself
  (`<cgroup2 mount>/haios/haios-<run_id>/step-<step_id>`, the `kill_cgroup`
  of `StepLimits.create`), after enabling the controllers in the
  `cgroup.subtree_control` of every ancestor from the cgroup2 root down
  (those hold no processes, so the kernel's no-internal-process rule allows
  it). That cgroup is not among `StepLimits.directories` (the init joins it
  already, as the kill cgroup), and the watchdog, not this module, creates
  and removes it. v2 limits without a kill cgroup are refused.

When a controller is unavailable nothing is weakened: `check_enforceable`
and `StepLimits.create` raise `SandboxSetupError` (exit 6, nothing ran),
naming the controller and why. There is no soft-fail mode.

Limits of the limits:
- Memory the init held before it joined (the forked engine's pages) stays
  charged where it was; what the tree touches afterwards, copy-on-write
  copies included, is charged to the step.
- v1 does not charge TCP socket buffers to `memory.limit_in_bytes` (they
  have their own, unset, `memory.kmem.tcp` counter); v2 does. A kernel
  booted with `cgroup.memory=nokmem` charges no kernel memory in either
  version. Huge pages from hugetlbfs belong to the hugetlb controller and
  are not limited here.
- Without v1 swap accounting (`memory.memsw.*` absent) swap is only
  discouraged (`memory.swappiness` 0); without v2 `memory.swap.max` it is
  not limited.
- The OOM killer kills one process of the tree, not all of it; a process
  with `oom_score_adj` -1000 is never chosen, so the step must not inherit
  that value. Pages of tmpfs files the step wrote stay charged after its
  processes are gone.
- On v2 the controllers stay enabled in the ancestors of the kill cgroup
  after the step (as in the cgroup2 root after `detect`). That limits
  nothing by itself; it only keeps those ancestors free of processes, which
  the watchdog's base and run cgroups are anyway.

What it does not do: it does not join the cgroups (the sandbox child writes
"0" to the kill cgroup's `cgroup.procs`, then to each of
`StepLimits.procs_files`, in its stage 5), does not create, kill or remove
the watchdog's cgroups (`haios.watchdog.cgroups`; on v2 it only writes limit
files into the step's one and enables controllers above it), and does not
limit CPU or I/O. `parse_v1_mounts` is pure; everything else does
file-system I/O under the cgroup mounts, and `StepLimits.remove` may send
SIGKILL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import mmap
import os
import re
import signal
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final, Literal

from haios.errors import InputError, SandboxSetupError
from haios.watchdog.cgroups import RUN_ID_PATTERN, STEP_ID_PATTERN, parse_cgroup2_mount

__all__ = [
    "MEMORY_MIN_BYTES",
    "PIDS_MAX_LIMIT",
    "REMOVE_TIMEOUT_SECONDS",
    "V1_BASE_NAME",
    "CgroupVersion",
    "Controller",
    "ControllerSite",
    "LimitBackend",
    "LimitGroup",
    "StepLimits",
    "Unavailable",
    "check_enforceable",
    "detect",
    "detect_from",
    "parse_v1_mounts",
]

Controller = Literal["memory", "pids"]
CgroupVersion = Literal["v1", "v2"]

MOUNTINFO: Final = Path("/proc/self/mountinfo")
#: the directory under a v1 hierarchy's mount that holds every run's limits
#: (v2 limits live in the watchdog's step cgroups instead)
V1_BASE_NAME: Final = "haios"
#: smallest memory limit accepted, in bytes
MEMORY_MIN_BYTES: Final = 1024 * 1024
#: largest pids.max the kernel accepts (PID_MAX_LIMIT on 64-bit)
PIDS_MAX_LIMIT: Final = 4 * 1024 * 1024
#: how long `StepLimits.remove` kills and retries before it gives up
REMOVE_TIMEOUT_SECONDS: Final = 2.0
_REMOVE_POLL_SECONDS: Final = 0.01
_CONTROL_MAX_BYTES: Final = 1024 * 1024
_DIR_MODE: Final = 0o755
# mountinfo: id, parent id, major:minor, root, mount point, mount options.
_MOUNTINFO_FIELDS: Final = 6
# mountinfo after " - ": file-system type, source, super-block options.
_MOUNTINFO_TAIL_FIELDS: Final = 3
_CONTROLLERS: Final[tuple[Controller, ...]] = ("memory", "pids")
# rmdir of a cgroup that still has members (or child cgroups).
_BUSY_ERRNOS: Final = frozenset({errno.EBUSY, errno.ENOTEMPTY})


# -- detection -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ControllerSite:
    """Where one controller can be enforced.

    Attributes:
        controller: "memory" or "pids".
        version: "v1" (its own hierarchy) or "v2" (the unified hierarchy).
        mount: the hierarchy's mount point.
    """

    controller: Controller
    version: CgroupVersion
    mount: Path


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """A controller this host cannot enforce, and why.

    Attributes:
        controller: "memory" or "pids".
        reason: one line, naming the mount or file at fault.
    """

    controller: Controller
    reason: str


@dataclasses.dataclass(frozen=True)
class LimitBackend:
    """Where memory and process limits can be enforced on this host.

    Attributes:
        memory: the memory controller's site, or why it is unavailable.
        pids: the pids controller's site, or why it is unavailable.
    """

    memory: ControllerSite | Unavailable
    pids: ControllerSite | Unavailable

    def require(self, *, memory: bool, pids: bool) -> tuple[ControllerSite, ...]:
        """Return the sites of the wanted controllers, memory first.

        Raises:
            SandboxSetupError: a wanted controller is unavailable; the message
                names each missing one and why.
        """
        wanted = [site for site, want in ((self.memory, memory), (self.pids, pids)) if want]
        missing = [site for site in wanted if isinstance(site, Unavailable)]
        if missing:
            raise SandboxSetupError(
                "step limits cannot be enforced on this host: "
                + "; ".join(f"{site.controller}: {site.reason}" for site in missing)
            )
        return tuple(site for site in wanted if isinstance(site, ControllerSite))


def _unescape_mountinfo(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_v1_mounts(mountinfo_text: str) -> dict[Controller, Path]:
    """Return the mount point of each v1 hierarchy carrying memory or pids.

    Read-only mounts are skipped (no cgroup can be created there). A mount
    of the whole hierarchy (root "/") is preferred over a bind mount of a
    sub-tree; otherwise the first in mountinfo order wins.

    Args:
        mountinfo_text: the content of `/proc/self/mountinfo`.

    Returns:
        Controller to mount point, for the controllers found.
    """
    found: dict[Controller, tuple[bool, Path]] = {}
    for line in mountinfo_text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rest = left.split(), right.split()
        if (
            len(fields) < _MOUNTINFO_FIELDS
            or len(rest) < _MOUNTINFO_TAIL_FIELDS
            or rest[0] != "cgroup"
        ):
            continue
        if "ro" in fields[5].split(",") or "ro" in rest[2].split(","):
            continue
        options = rest[2].split(",")
        subtree = _unescape_mountinfo(fields[3]) != "/"
        for controller in _CONTROLLERS:
            if controller not in options:
                continue
            known = found.get(controller)
            if known is None or (known[0] and not subtree):
                found[controller] = (subtree, Path(_unescape_mountinfo(fields[4])))
    return {controller: mount for controller, (_, mount) in found.items()}


def _read_control(path: Path) -> str:
    """Read a cgroup interface file (never through a link), capped in size."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > _CONTROL_MAX_BYTES:
                raise SandboxSetupError(f"{path} is larger than {_CONTROL_MAX_BYTES} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii")


def _read(path: Path) -> str:
    """`_read_control` with OS errors translated."""
    try:
        return _read_control(path)
    except (OSError, UnicodeDecodeError) as e:
        raise SandboxSetupError(f"cannot read {path}: {e}") from e


def _write(path: Path, value: str) -> None:
    """Write one value to a cgroup interface file (never through a link).

    Raises:
        SandboxSetupError: the file is missing or the kernel refused the value.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)
    except OSError as e:
        raise SandboxSetupError(f"cannot write {value!r} to {path}: {e.strerror}") from e


def _enable(directory: Path, controllers: Iterable[Controller]) -> None:
    """Make sure `controllers` are enabled in `directory/cgroup.subtree_control`.

    Raises:
        SandboxSetupError: the kernel refuses (controller not available in
            `directory`, or `directory` holds processes and is not the root).
    """
    control = directory / "cgroup.subtree_control"
    missing = [c for c in controllers if c not in _read(control).split()]
    if not missing:
        return
    _write(control, " ".join("+" + c for c in missing))
    still = [c for c in missing if c not in _read(control).split()]
    if still:
        raise SandboxSetupError(f"{control} does not list {' '.join(still)} after enabling")


def _v2_site(controller: Controller, mount: Path) -> ControllerSite | Unavailable | None:
    """The cgroup2 site of `controller`, why it is unusable, or None if not listed."""
    try:
        listed = _read(mount / "cgroup.controllers").split()
    except SandboxSetupError as e:
        return Unavailable(controller, str(e))
    if controller not in listed:
        return None
    try:
        _enable(mount, (controller,))
    except SandboxSetupError as e:
        return Unavailable(controller, f"cgroup2 at {mount} lists it but it cannot be enabled: {e}")
    return ControllerSite(controller, "v2", mount)


def detect_from(mountinfo_text: str) -> LimitBackend:
    """Find where memory and pids can be enforced, given the mount table.

    A controller listed by the cgroup2 root is used there or not at all: the
    kernel binds a controller to one hierarchy, so it cannot also be on v1.

    Args:
        mountinfo_text: the content of `/proc/self/mountinfo`.

    Returns:
        The backend; each controller is a site or an `Unavailable` reason.

    Side Effects:
        Reads the cgroup2 root's `cgroup.controllers`; writes
        `+memory`/`+pids` to its `cgroup.subtree_control` when they are listed
        but not yet enabled (what `StepLimits.create` needs anyway).
    """
    v2_mount = parse_cgroup2_mount(mountinfo_text)
    v1_mounts = parse_v1_mounts(mountinfo_text)

    def site(controller: Controller) -> ControllerSite | Unavailable:
        """v2 if the cgroup2 root lists the controller, else v1, else why not."""
        if v2_mount is not None:
            found = _v2_site(controller, v2_mount)
            if found is not None:
                return found
        if controller in v1_mounts:
            return ControllerSite(controller, "v1", v1_mounts[controller])
        return Unavailable(
            controller,
            "no cgroup2 root lists it and no writable cgroup v1 hierarchy mounts it",
        )

    return LimitBackend(memory=site("memory"), pids=site("pids"))


@functools.cache
def detect() -> LimitBackend:
    """Find where memory and pids can be enforced on this host (cached).

    Returns:
        As `detect_from`, for the running system.

    Raises:
        SandboxSetupError: `/proc/self/mountinfo` is unreadable.

    Side Effects:
        As `detect_from`; reads `/proc/self/mountinfo` (once per process).
    """
    try:
        text = MOUNTINFO.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise SandboxSetupError(f"cannot read {MOUNTINFO}: {e.strerror}") from e
    return detect_from(text)


def check_enforceable(*, memory: bool, pids: bool) -> None:
    """Refuse to run when the host cannot enforce the limits a profile asks for.

    Args:
        memory: the profile limits the step tree's memory.
        pids: the profile limits the step tree's process count.

    Raises:
        SandboxSetupError: a wanted controller is unavailable (named in the
            message, with the reason), or the mount table is unreadable.

    Side Effects:
        As `detect`.
    """
    detect().require(memory=memory, pids=pids)


# -- per-step cgroups ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LimitGroup:
    """One cgroup of a step and the controllers limited in it.

    Attributes:
        version: "v1" (one controller) or "v2" (every v2 controller).
        controllers: the controllers limited here.
        mount: the hierarchy's mount point.
        path: v1: the step's own cgroup, `<mount>/haios/<run_id>/<step_id>`;
            v2: the watchdog's kill cgroup of the step.
    """

    version: CgroupVersion
    controllers: tuple[Controller, ...]
    mount: Path
    path: Path

    @property
    def owned(self) -> bool:
        """True when `StepLimits` created this cgroup and removes it (v1).

        A v2 group is the watchdog's step cgroup: the watchdog creates and
        removes it, and the step's init joins it as its kill cgroup.
        """
        return self.version == "v1"


def _check_names(run_id: str, step_id: str) -> None:
    """Refuse ids that are not safe path components (they become cgroup names)."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise InputError(f"run id {run_id!r} does not match {RUN_ID_PATTERN.pattern}")
    if not STEP_ID_PATTERN.fullmatch(step_id):
        raise InputError(f"step id {step_id!r} does not match {STEP_ID_PATTERN.pattern}")


def _check_limits(memory_max_bytes: int, pids_max: int) -> None:
    """Refuse limits the kernel would reject or that leave nothing to run."""
    if memory_max_bytes < MEMORY_MIN_BYTES:
        raise SandboxSetupError(
            f"memory limit {memory_max_bytes} is below {MEMORY_MIN_BYTES} bytes"
        )
    if not 1 <= pids_max <= PIDS_MAX_LIMIT:
        raise SandboxSetupError(f"process limit {pids_max} is outside 1..{PIDS_MAX_LIMIT}")


def _plan_v1_groups(
    sites: tuple[ControllerSite, ...], run_id: str, step_id: str
) -> list[LimitGroup]:
    """One cgroup of its own per v1 controller."""
    return [
        LimitGroup("v1", (s.controller,), s.mount, s.mount / V1_BASE_NAME / run_id / step_id)
        for s in sites
        if s.version == "v1"
    ]


def _plan_v2_group(
    sites: tuple[ControllerSite, ...], kill_cgroup: Path | None
) -> LimitGroup | None:
    """The kill cgroup as the group of every v2 controller; None without v2."""
    v2 = [s for s in sites if s.version == "v2"]
    if not v2:
        return None
    if kill_cgroup is None:
        # A separate v2 limit cgroup would take the step out of its kill
        # cgroup (one v2 cgroup per process), so there is no fallback.
        raise SandboxSetupError("cgroup v2 limits need the step's kill cgroup")
    mounts = {s.mount for s in v2}
    if len(mounts) != 1:
        raise SandboxSetupError(
            f"v2 controllers on more than one cgroup2 mount: {sorted(map(str, mounts))}"
        )
    mount = v2[0].mount
    _check_kill_cgroup(mount, kill_cgroup)
    return LimitGroup("v2", tuple(s.controller for s in v2), mount, kill_cgroup)


def _check_owned_dir(path: Path) -> None:
    """Refuse an entry that is not a root-owned directory others cannot write."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise SandboxSetupError(f"cannot inspect cgroup {path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxSetupError(f"{path} exists and is not a cgroup directory")
    # A delegated (chowned) or group/other-writable cgroup would let another
    # user move processes in or out of the step's limits.
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise SandboxSetupError(
            f"cgroup {path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}, "
            "not root with mode 0755"
        )


def _check_kill_cgroup(mount: Path, path: Path) -> None:
    """Refuse a kill cgroup that is not a plain cgroup directory below `mount`.

    Controllers are enabled and limits written along this path, so every
    entry from the mount down to `path` must be a root-owned directory that
    others cannot write, on the mount's file system, and none of them a
    symbolic link that could lead the writes elsewhere.
    """
    if (
        not path.is_absolute()
        or ".." in path.parts
        or not path.is_relative_to(mount)
        or path == mount
    ):
        raise SandboxSetupError(f"kill cgroup {path} is not below the cgroup2 mount {mount}")
    try:
        mount_device = os.stat(mount).st_dev
    except OSError as e:
        raise SandboxSetupError(f"cannot inspect the cgroup2 mount {mount}: {e.strerror}") from e
    entry = mount
    for part in path.relative_to(mount).parts:
        entry /= part
        try:
            st = os.lstat(entry)
        except OSError as e:
            raise SandboxSetupError(f"cannot inspect cgroup {entry}: {e.strerror}") from e
        if stat.S_ISLNK(st.st_mode):
            raise SandboxSetupError(f"{entry} is a symbolic link, not a cgroup")
        if st.st_dev != mount_device:
            raise SandboxSetupError(f"{entry} is not on the cgroup2 file system at {mount}")
        _check_owned_dir(entry)


def _enable_above(group: LimitGroup) -> None:
    """Enable the group's controllers in every ancestor, from the mount down.

    The kernel offers a controller to a cgroup only if its parent enabled it
    in `cgroup.subtree_control`, and lets the parent enable it only if its
    own parent did: hence top-down. It refuses this in a non-root cgroup that
    holds processes (the no-internal-process rule); the watchdog's base and
    run cgroups hold none.
    """
    directory = group.mount
    _enable(directory, group.controllers)
    for part in group.path.parent.relative_to(group.mount).parts:
        directory /= part
        _enable(directory, group.controllers)


def _ensure_dir(path: Path) -> None:
    """Create a shared parent (base or run) cgroup, or accept ours from before."""
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        pass
    except OSError as e:
        raise SandboxSetupError(f"cannot create cgroup {path}: {e.strerror}") from e
    _check_owned_dir(path)


def _make_step_dir(path: Path) -> bool:
    """Create the step's cgroup exclusively; False if its run directory vanished.

    An entry of that name is a leftover of a crashed run: an empty cgroup is
    removed and made afresh; anything else (a cgroup with members or child
    cgroups, an interface file such as `tasks`) is refused, never adopted.
    """
    try:
        os.mkdir(path, _DIR_MODE)
    except FileNotFoundError:
        return False
    except FileExistsError:
        _check_owned_dir(path)
        try:
            os.rmdir(path)
        except OSError as e:
            raise SandboxSetupError(
                f"cgroup {path} is left over from an earlier run and is not empty: {e.strerror}"
            ) from e
        try:
            os.mkdir(path, _DIR_MODE)
        except OSError as e:
            raise SandboxSetupError(f"cannot create cgroup {path}: {e.strerror}") from e
    except OSError as e:
        raise SandboxSetupError(f"cannot create cgroup {path}: {e.strerror}") from e
    try:
        _check_owned_dir(path)
    except SandboxSetupError:
        # We made it, so it is ours to remove.
        with contextlib.suppress(OSError):
            os.rmdir(path)
        raise
    return True


def _make_group(group: LimitGroup) -> None:
    """Create the base, run and step directories of a v1 group."""
    run_dir = group.path.parent
    base = run_dir.parent
    # A concurrent `remove` of another step of this run may prune the run
    # directory between our mkdirs: recreate it and retry.
    for _ in range(3):
        _ensure_dir(base)
        _ensure_dir(run_dir)
        if _make_step_dir(group.path):
            return
    raise SandboxSetupError(f"cgroup {run_dir} keeps disappearing")


def _set(path: Path, value: str, expected: str) -> None:
    """Write a limit, then read it back: a limit is only trusted once read back."""
    _write(path, value)
    got = _read(path).strip()
    if got != expected:
        raise SandboxSetupError(f"{path} reads {got!r} after writing {value!r}")


def _flat_keyed(path: Path) -> dict[str, str]:
    """Parse a flat-keyed interface file (`key value` lines)."""
    out: dict[str, str] = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def _counter(path: Path, key: str) -> int:
    """One counter of a flat-keyed file.

    Raises:
        SandboxSetupError: the file or the key is missing, or not a number.
    """
    value = _flat_keyed(path).get(key, "")
    if not value.isdigit():
        raise SandboxSetupError(f"{path} has no {key} counter")
    return int(value)


def _write_limits(group: LimitGroup, memory_max_bytes: int, pids_max: int) -> None:
    """Write and verify the group's limits, and that its violation counters exist."""
    path = group.path
    # The kernel rounds a memory limit down to whole pages.
    memory = str(memory_max_bytes // mmap.PAGESIZE * mmap.PAGESIZE)
    if group.version == "v1" and "memory" in group.controllers:
        # memsw (memory + swap) must never be below the memory limit: set the
        # memory limit first (memsw starts unlimited), then memsw equal to it,
        # so memory and swap together stay within the limit.
        _set(path / "memory.limit_in_bytes", memory, memory)
        if (path / "memory.memsw.limit_in_bytes").exists():
            _set(path / "memory.memsw.limit_in_bytes", memory, memory)
        else:
            # No swap accounting (swapaccount=0): reclaim in this cgroup may
            # then not swap anonymous memory out.
            _set(path / "memory.swappiness", "0", "0")
        # oom_kill_disable is inherited from the parent; with it set a tree at
        # its limit hangs instead of being killed. Written only when needed.
        if _flat_keyed(path / "memory.oom_control").get("oom_kill_disable") != "0":
            _write(path / "memory.oom_control", "0")
        if _flat_keyed(path / "memory.oom_control").get("oom_kill_disable") != "0":
            raise SandboxSetupError(f"{path}/memory.oom_control: the OOM killer stays disabled")
        _counter(path / "memory.oom_control", "oom_kill")
    if group.version == "v2" and "memory" in group.controllers:
        _set(path / "memory.max", memory, memory)
        if (path / "memory.swap.max").exists():
            _set(path / "memory.swap.max", "0", "0")
        _counter(path / "memory.events", "oom_kill")
    if "pids" in group.controllers:
        _set(path / "pids.max", str(pids_max), str(pids_max))
        _counter(path / "pids.events", "max")


def _pids_in(procs: Path) -> set[int]:
    """The members listed by a `cgroup.procs` file; none if the cgroup is gone."""
    try:
        text = _read_control(procs)
    except FileNotFoundError:
        return set()
    except (OSError, UnicodeDecodeError) as e:
        raise SandboxSetupError(f"cannot read {procs}: {e}") from e
    return {int(word) for word in text.split() if word.isdigit()}


def _kill_members(path: Path) -> None:
    """SIGKILL every process listed in the cgroup's `cgroup.procs`.

    Each pid is pinned with a pidfd first, then checked to still be listed:
    a pid that exited and was reused by an unrelated process is not listed
    any more, and a pidfd never signals a process other than the one it
    was opened on, so no bystander can be hit.
    """
    procs = path / "cgroup.procs"
    pidfds: dict[int, int] = {}
    try:
        for pid in _pids_in(procs):
            with contextlib.suppress(ProcessLookupError):
                pidfds[pid] = os.pidfd_open(pid)
        members = _pids_in(procs)
        for pid, fd in pidfds.items():
            if pid in members:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError as e:
        raise SandboxSetupError(f"cannot kill the members of {path}: {e.strerror}") from e
    finally:
        for fd in pidfds.values():
            os.close(fd)


def _remove_group(group: LimitGroup, deadline: float) -> None:
    """Remove a step cgroup, killing its members until it is empty."""
    while True:
        try:
            os.rmdir(group.path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in _BUSY_ERRNOS:
                raise SandboxSetupError(f"cannot remove cgroup {group.path}: {e.strerror}") from e
            if time.monotonic() >= deadline:
                raise SandboxSetupError(
                    f"cgroup {group.path} still has members or child cgroups after SIGKILL"
                ) from e
        _kill_members(group.path)
        time.sleep(_REMOVE_POLL_SECONDS)


def _prune(directory: Path) -> None:
    """Remove a run directory once its last step cgroup is gone."""
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return
    except OSError as e:
        # Another step of the same run still has its cgroup here.
        if e.errno not in _BUSY_ERRNOS:
            raise SandboxSetupError(f"cannot remove cgroup {directory}: {e.strerror}") from e


@dataclasses.dataclass(frozen=True)
class StepLimits:
    """The memory and process limits of one step, as cgroups.

    Build with `create`; the step's init joins its kill cgroup (which holds
    the v2 limits, if any) and then every limit cgroup of its own (write "0"
    to each of `procs_files`) while still root and before it unshares its
    cgroup namespace; read `violations` once the whole tree is dead; then
    `remove`.

    Attributes:
        run_id: the run's id.
        step_id: the step's id.
        memory_max_bytes: the requested memory limit (the kernel applies it
            rounded down to whole pages).
        pids_max: the process (and thread) limit of the tree.
        groups: the cgroups holding the step's limits: v1 ones first
            (memory, then pids), then the v2 one (the kill cgroup).
    """

    run_id: str
    step_id: str
    memory_max_bytes: int
    pids_max: int
    groups: tuple[LimitGroup, ...]

    @property
    def directories(self) -> tuple[Path, ...]:
        """The limit cgroups the step joins after its kill cgroup, in `groups` order.

        Only the cgroups created here (v1). The v2 group is left out: it is
        the kill cgroup itself, which the init has joined already.
        """
        return tuple(group.path for group in self.groups if group.owned)

    @property
    def procs_files(self) -> tuple[str, ...]:
        """Absolute `cgroup.procs` paths of `directories`; the init writes "0" to each.

        Root-owned, under the cgroup mounts, never derived from client input
        except through the validated run and step ids.
        """
        return tuple(str(directory / "cgroup.procs") for directory in self.directories)

    @classmethod
    def create(
        cls,
        run_id: str,
        step_id: str,
        memory_max_bytes: int,
        pids_max: int,
        *,
        backend: LimitBackend | None = None,
        kill_cgroup: Path | None = None,
    ) -> StepLimits:
        """Create the step's cgroups and write its limits.

        A v1 controller gets a cgroup of its own. The v2 controllers are
        limited in `kill_cgroup`, after they are enabled in each of its
        ancestors; it is not created, joined or removed here.

        Args:
            run_id: the run's id (`RUN_ID_PATTERN`).
            step_id: the step's id (`STEP_ID_PATTERN`).
            memory_max_bytes: memory of the whole tree, at least
                `MEMORY_MIN_BYTES`.
            pids_max: processes and threads of the whole tree,
                1..`PIDS_MAX_LIMIT`.
            backend: where to create them; `detect()` when None.
            kill_cgroup: the step's existing cgroup on the cgroup2 mount, made
                by the watchdog (`create_step_cgroup`); required when a
                controller is on v2, ignored when both are on v1.

        Returns:
            The limits, every value written and read back.

        Raises:
            InputError: an id is not a safe cgroup name.
            SandboxSetupError: a controller is unavailable, a limit is out of
                range, a controller is on v2 and `kill_cgroup` is None or is
                not a root-owned directory below the cgroup2 mount (or it or
                an entry above it is a symbolic link), an entry of the step's
                name exists and is not an empty cgroup, a parent is not a
                root-owned directory, or the kernel refused a value (such as
                enabling a controller in an ancestor that holds processes).
                Whatever this call created is removed again.

        Side Effects:
            Creates v1 cgroup directories and writes their limit files; on
            v2 writes `+memory`/`+pids` to the `cgroup.subtree_control` of
            the cgroup2 root and every ancestor of `kill_cgroup` that lacks
            them, and writes the limit files of `kill_cgroup`.
        """
        _check_names(run_id, step_id)
        _check_limits(memory_max_bytes, pids_max)
        sites = (backend if backend is not None else detect()).require(memory=True, pids=True)
        planned = _plan_v1_groups(sites, run_id, step_id)
        # Checked before anything is created, so a refusal leaves nothing.
        on_kill_cgroup = _plan_v2_group(sites, kill_cgroup)
        created: list[LimitGroup] = []
        try:
            for group in planned:
                _make_group(group)
                created.append(group)
                _write_limits(group, memory_max_bytes, pids_max)
            if on_kill_cgroup is not None:
                _enable_above(on_kill_cgroup)
                created.append(on_kill_cgroup)
                _write_limits(on_kill_cgroup, memory_max_bytes, pids_max)
        except SandboxSetupError as e:
            # Only what this call made is removed: a refused leftover stays,
            # and so does the kill cgroup (the watchdog removes it).
            limits = cls(run_id, step_id, memory_max_bytes, pids_max, tuple(created))
            try:
                limits.remove()
                for group in planned:
                    _prune(group.path.parent)
            except SandboxSetupError as cleanup:
                e.add_note(f"cleanup failed too: {cleanup}")
            raise
        return cls(run_id, step_id, memory_max_bytes, pids_max, tuple(created))

    def violations(self) -> tuple[str, ...]:
        """Which limits the step's tree hit, once the tree is dead.

        "memory": the kernel OOM-killed a process because the tree reached
        its memory limit (v1 `memory.oom_control` / v2 `memory.events`
        counter `oom_kill`). Reaching the limit alone is not counted: v1
        `memory.failcnt` also counts charges that reclaim then satisfied,
        and with memsw set it stayed 0 on an OOM kill here, so it proves
        nothing about a kill.
        "processes": a fork or clone failed at `pids.max` (`pids.events`
        counter `max`). On v2 both counters are the kill cgroup's.

        Returns:
            The violations, "memory" before "processes"; empty if none.

        Raises:
            SandboxSetupError: a counter file is missing or unreadable (the
                cgroup was removed or tampered with); an unknown outcome is
                never reported as "no violation".

        Side Effects:
            Reads cgroup files.
        """
        found: list[str] = []
        for group in self.groups:
            if "memory" in group.controllers:
                events = "memory.oom_control" if group.version == "v1" else "memory.events"
                if _counter(group.path / events, "oom_kill") > 0:
                    found.append("memory")
            if "pids" in group.controllers and _counter(group.path / "pids.events", "max") > 0:
                found.append("processes")
        return tuple(sorted(set(found), key=("memory", "processes").index))

    def remove(self, *, timeout_seconds: float = REMOVE_TIMEOUT_SECONDS) -> None:
        """Remove the step's own cgroups and prune run directories left empty.

        The kill cgroup (the v2 group) stays: the watchdog owns and removes
        it. Idempotent: missing cgroups are fine. Normally each cgroup is
        empty (the step's tree is dead); a lingering member is SIGKILLed
        through `cgroup.procs` and the removal retried until
        `timeout_seconds`.

        Raises:
            SandboxSetupError: a cgroup still has members (or child cgroups)
                at the deadline, or a directory cannot be removed.

        Side Effects:
            Removes cgroup directories; may SIGKILL processes of the step.
        """
        deadline = time.monotonic() + timeout_seconds
        owned = [group for group in self.groups if group.owned]
        for group in owned:
            _remove_group(group, deadline)
        for group in owned:
            _prune(group.path.parent)
