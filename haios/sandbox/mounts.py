# SPDX-License-Identifier: Apache-2.0
"""The step's filesystem view: planned once per profile, built in the child.

`plan_read_only_paths` (engine side, once per profile) inspects the profile's
host paths with lstat and decides, for each, whether the view binds a
directory, binds a file, or recreates a symlink. `apply_view` (child side, in
the init after unshare(CLONE_NEWNS)) builds the view:

1. make every mount private, so nothing propagates to or from the host;
2. clone each source as a detached mount tree (open_tree) *before* anything
   is mounted over host paths, and set it read-only/nosuid/nodev recursively
   (mount_setattr), so submounts are read-only too;
3. mount a fresh tmpfs root on the staging directory and attach the clones,
   symlinks, /proc (hidepid=invisible, subset=pid), a minimal /dev (null,
   zero, full, random, urandom; no tty, no pts), /dev/shm and a private
   /tmp (both capped in bytes and inodes), the workspace and cost
   filesystems read-write and the secret filesystem read-only (detached
   tmpfs mounts the engine made, received as descriptors: no host path, see
   stepfs.py), generated /etc/passwd and /etc/group naming only the step,
   and a generated /etc/hosts naming only localhost and the host names the
   step may reach (netns.py);
4. pivot_root into it, detach the old root, remount the root read-only.

`apply_view` is `prepare_view` (1 to 3 without the step's filesystems and
generated files: everything that comes from the host, `host_part`) then
`finish_view` (the rest of 3, and 4). An init forked ahead by the launcher
runs `prepare_view` for the previous request while it waits and, once its
request is in, `finish_view` when the request's `host_part` is the same, or
`discard_prepared_view` and `apply_view` when it is not. The host's mount
table under the bound paths is thus up to the launcher's waiting limit
(0.5 s) older than the step; what is inside the bound directories is live.

Nothing else of the host exists in the view. This module does no I/O at
import; its functions touch the filesystem and mount table.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Final

from haios.errors import SandboxSetupError
from haios.sandbox import _libc
from haios.sandbox.spec import VIEW_COST_DIR, VIEW_SECRET_DIR, VIEW_WORKSPACE

#: where the new root is assembled before pivot_root; any existing directory
#: works because every source is cloned before the tmpfs covers it.
STAGING_DIR: Final = "/tmp"
PROC_OPTIONS: Final = "hidepid=invisible,subset=pid"
ROOT_TMPFS_OPTIONS: Final = "size=1m,nr_inodes=4096,mode=0755"
DEV_TMPFS_OPTIONS: Final = "size=64k,nr_inodes=64,mode=0755"

#: (name, major, minor) of the character devices in /dev; no tty, no pts.
DEVICES: Final = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
)
DEV_SYMLINKS: Final = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)

RO_ATTRS: Final = _libc.MOUNT_ATTR_RDONLY | _libc.MOUNT_ATTR_NOSUID | _libc.MOUNT_ATTR_NODEV
RW_ATTRS: Final = _libc.MOUNT_ATTR_NOSUID | _libc.MOUNT_ATTR_NODEV
SECRET_ATTRS: Final = RO_ATTRS | _libc.MOUNT_ATTR_NOEXEC


@dataclasses.dataclass(frozen=True)
class ViewEntry:
    """One read-only host path in the view.

    Attributes:
        kind: "dir" or "file" (bound read-only) or "symlink" (recreated).
        path: absolute path, the same on the host and in the view.
        target: the symlink's target (symlinks only).
    """

    kind: str
    path: str
    target: str = ""


@dataclasses.dataclass(frozen=True)
class ViewPlan:
    """Everything `apply_view` needs; plain values so it crosses a socket.

    Attributes:
        entries: the profile's read-only paths, in profile order.
        tmp_size_bytes: size of /tmp and /dev/shm, each.
        tmp_inodes: inode cap of /tmp and /dev/shm, each.
        has_secret: a secret filesystem is shown read-only at VIEW_SECRET_DIR.
        uid: the step's uid (for the generated /etc/passwd).
        gid: the step's gid (for the generated /etc/group).
        hosts: (address, name) lines of the generated /etc/hosts.
    """

    entries: tuple[ViewEntry, ...]
    tmp_size_bytes: int
    tmp_inodes: int
    has_secret: bool
    uid: int
    gid: int
    hosts: tuple[tuple[str, str], ...] = (("127.0.0.1", "localhost"),)


def plan_read_only_paths(paths: tuple[tuple[str, bool], ...]) -> tuple[ViewEntry, ...]:
    """Decide how each (path, optional) pair appears in the view.

    Args:
        paths: the profile's read-only paths with their `optional` flag.

    Returns:
        One entry per present path; absent optional paths are left out.

    Raises:
        SandboxSetupError: a required path is missing or is not a directory,
            regular file or symlink.

    Side Effects:
        lstat and readlink on host paths.
    """
    entries: list[ViewEntry] = []
    for path, optional in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError as exc:
            if optional:
                continue
            raise SandboxSetupError(f"profile path {path} does not exist on this host") from exc
        except OSError as exc:
            raise SandboxSetupError(f"profile path {path}: {exc.strerror}") from exc
        if stat.S_ISLNK(info.st_mode):
            entries.append(ViewEntry("symlink", path, os.readlink(path)))
        elif stat.S_ISDIR(info.st_mode):
            entries.append(ViewEntry("dir", path))
        elif stat.S_ISREG(info.st_mode):
            entries.append(ViewEntry("file", path))
        else:
            raise SandboxSetupError(f"profile path {path} is not a directory, file or symlink")
    return tuple(entries)


def _relative(path: str) -> str:
    return path.lstrip("/")


def _make_mountpoint(path: str, *, is_dir: bool) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    if is_dir:
        os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))


def _clone_sources(plan: ViewPlan) -> list[tuple[int, str, bool]]:
    """Detached, attribute-locked copies of every bound host source.

    Returns:
        (mount fd, view path relative to the new root, is_dir) triples.
    """
    clones: list[tuple[int, str, bool]] = []
    for entry in plan.entries:
        if entry.kind != "symlink":
            fd = _libc.open_tree_clone(entry.path)
            clones.append((fd, _relative(entry.path), entry.kind == "dir"))
            _libc.mount_setattr_fd(fd, RO_ATTRS)
    return clones


def _step_mounts(plan: ViewPlan, step_fs: StepFsFds) -> list[tuple[int, str, bool]]:
    """The step's own filesystems (detached mounts received as descriptors;
    used as they are, never looked up by path), attributes set."""
    owned = [(step_fs.workspace, VIEW_WORKSPACE, RW_ATTRS),
             (step_fs.cost, VIEW_COST_DIR, RW_ATTRS)]
    if plan.has_secret:
        owned.append((step_fs.secret, VIEW_SECRET_DIR, SECRET_ATTRS))
    mounts: list[tuple[int, str, bool]] = []
    for fd, view_path, attrs in owned:
        if fd < 0:
            raise OSError(9, f"no filesystem for {view_path}")
        _libc.mount_setattr_fd(fd, attrs)
        mounts.append((fd, _relative(view_path), True))
    return mounts


def _attach(mounts: list[tuple[int, str, bool]]) -> None:
    for fd, view_path, is_dir in mounts:
        _make_mountpoint(view_path, is_dir=is_dir)
        _libc.move_mount_fd(fd, view_path)
        os.close(fd)


def _build_dev(plan: ViewPlan) -> None:
    os.mkdir("dev", 0o755)
    _libc.mount("tmpfs", "dev", "tmpfs", _libc.MS_NOSUID | _libc.MS_NOEXEC, DEV_TMPFS_OPTIONS)
    for name, major, minor in DEVICES:
        os.mknod(f"dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    for name, target in DEV_SYMLINKS:
        os.symlink(target, f"dev/{name}")
    os.mkdir("dev/shm", 0o1777)
    _libc.mount(
        "tmpfs",
        "dev/shm",
        "tmpfs",
        _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC,
        f"size={plan.tmp_size_bytes},nr_inodes={plan.tmp_inodes},mode=1777",
    )
    # Read-only /dev: the step cannot add nodes or names next to the devices.
    _libc.mount(
        None,
        "dev",
        None,
        _libc.MS_REMOUNT | _libc.MS_RDONLY | _libc.MS_NOSUID | _libc.MS_NOEXEC,
        None,
    )


def _write_identity_files(plan: ViewPlan) -> None:
    os.makedirs("etc", mode=0o755, exist_ok=True)
    passwd = (
        "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
        f"haios:x:{plan.uid}:{plan.gid}:haios step:{VIEW_WORKSPACE}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\nhaios:x:{plan.gid}:\nnogroup:x:65534:\n"
    hosts = "".join(f"{address} {name}\n" for address, name in plan.hosts)
    for name, text in (("etc/passwd", passwd), ("etc/group", group), ("etc/hosts", hosts)):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


@dataclasses.dataclass(frozen=True)
class StepFsFds:
    """Descriptors of the step's detached filesystems in the child (-1: none)."""

    workspace: int
    cost: int
    secret: int


def host_part(plan: ViewPlan) -> tuple[object, ...]:
    """What `prepare_view` builds from a plan: equal host parts, equal builds."""
    return (plan.entries, plan.tmp_size_bytes, plan.tmp_inodes)


def apply_view(plan: ViewPlan, step_fs: StepFsFds) -> None:
    """Build the step's filesystem view and make it the root (child side).

    Must run after unshare(CLONE_NEWNS) and, for /proc to show the step's PID
    namespace, in a process of that namespace. The same as `prepare_view`
    then `finish_view`.

    Args:
        plan: what to show.
        step_fs: the step's own filesystems, attached (and so consumed) here.

    Raises:
        OSError: any mount, clone or file operation failed.

    Side Effects:
        Replaces the calling process's root and mount table; leaves the
        working directory at "/" and the umask at 0.
    """
    prepare_view(plan)
    finish_view(plan, step_fs)


def prepare_view(plan: ViewPlan) -> None:
    """Assemble everything of the view that comes from the host (`host_part`)
    in the staging directory, without entering it.

    Steps 1 to 3 of the module docstring but the step's own filesystems and
    generated files. A forked-ahead init runs this while it waits; it holds
    no descriptor of the step then. Same preconditions as `apply_view`.

    Raises:
        OSError: any mount, clone or file operation failed.

    Side Effects:
        Mounts in the calling process's (private) mount namespace; leaves the
        working directory at "/" and the umask at 0.
    """
    # (1) Private propagation first: later mounts must never reach the host.
    _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_PRIVATE, None)
    # (2) Clone every source before the staging tmpfs can hide any of them.
    clones = _clone_sources(plan)
    # (3) Assemble the new root.
    _libc.mount(
        "tmpfs",
        STAGING_DIR,
        "tmpfs",
        _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC,
        ROOT_TMPFS_OPTIONS,
    )
    os.chdir(STAGING_DIR)
    os.umask(0)
    for entry in plan.entries:
        if entry.kind == "symlink":
            parent = os.path.dirname(_relative(entry.path))
            if parent:
                os.makedirs(parent, mode=0o755, exist_ok=True)
            os.symlink(entry.target, _relative(entry.path))
    _attach(clones)
    os.mkdir("proc", 0o555)
    _libc.mount(
        "proc", "proc", "proc", _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC, PROC_OPTIONS
    )
    _build_dev(plan)
    os.mkdir("tmp", 0o1777)
    _libc.mount(
        "tmpfs",
        "tmp",
        "tmpfs",
        _libc.MS_NOSUID | _libc.MS_NODEV,
        f"size={plan.tmp_size_bytes},nr_inodes={plan.tmp_inodes},mode=1777",
    )
    # Nothing later may resolve a relative path inside the staging root by accident.
    os.chdir("/")


def discard_prepared_view() -> None:
    """Drop what `prepare_view` assembled (the staging tmpfs and all under it).

    Side Effects:
        Lazily unmounts the staging directory in the calling process's
        private mount namespace.
    """
    _libc.umount2(STAGING_DIR, _libc.MNT_DETACH)


def finish_view(plan: ViewPlan, step_fs: StepFsFds) -> None:
    """Attach the step's filesystems, write its generated files, enter the view.

    After `prepare_view` of a plan with the same `host_part`, in the same
    process: steps 3 (the step's part) and 4 of the module docstring.

    Args:
        plan: what to show.
        step_fs: the step's own filesystems, attached (and so consumed) here.

    Raises:
        OSError: any mount or file operation failed.

    Side Effects:
        Replaces the calling process's root and mount table; leaves the
        working directory at "/" and the umask at 0.
    """
    os.chdir(STAGING_DIR)
    os.umask(0)
    _attach(_step_mounts(plan, step_fs))
    _write_identity_files(plan)
    # (4) Enter it. pivot_root(".", ".") stacks the old root on top of the
    # new one; detaching it leaves only the view (no old-root directory).
    _libc.pivot_root(".", ".")
    _libc.umount2(".", _libc.MNT_DETACH)
    os.chdir("/")
    _libc.mount(
        None,
        "/",
        None,
        _libc.MS_REMOUNT | _libc.MS_RDONLY | _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC,
        None,
    )
