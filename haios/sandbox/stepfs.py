# SPDX-License-Identifier: Apache-2.0
"""The step's writable filesystems: private tmpfs mounts that no host path names.

Each step gets fresh, size- and inode-capped tmpfs mounts for its workspace,
its cost report and (with a Vault scope) its token. They are created with
fsopen/fsmount as *detached* mounts: they are never attached anywhere in
the host's mount table, so no path exists that a client could rename,
replace with a symlink or aim at another tenant (threat T-MT01). The engine
fills and reads them through the mount descriptor only; the sandbox child
receives a clone of the descriptor and attaches it inside the step's own
mount namespace. The mount source is the neutral name `haios`, so the
step's /proc/self/mountinfo shows no host path (T-MT06).

When the step's tree is dead and its products copied out, closing the
descriptor frees the whole filesystem: whatever the step left (deep trees,
millions of files, a full disk) cannot outlive the step or wedge a later
run (T-MT05). Does I/O (mounts, files).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Final, Self

from haios._util.safedir import SafeDir
from haios.errors import SandboxSetupError
from haios.sandbox import _libc

SOURCE: Final = "haios"
#: the cost report is at most 4 KiB (contract section 12); room for one file
COST_FS_BYTES: Final = 64 * 1024
COST_FS_INODES: Final = 16
SECRET_FS_BYTES: Final = 64 * 1024
SECRET_FS_INODES: Final = 8
_ATTRS: Final = _libc.MOUNT_ATTR_NOSUID | _libc.MOUNT_ATTR_NODEV


def open_capture(name: str) -> int:
    """An anonymous in-memory file for one output stream (caller closes it).

    The supervisor keeps at most `output_limit_bytes` of each stream, so
    the file is bounded; nothing of it exists on a disk or under a path.
    """
    return os.memfd_create(f"haios-{name}", os.MFD_CLOEXEC)


def read_capture(fd: int, max_bytes: int) -> bytes:
    """Everything written to a capture (at most `max_bytes`)."""
    return os.pread(fd, max_bytes, 0)


class StepFs:
    """One detached tmpfs; `dir` reads and writes it through its descriptor."""

    def __init__(self, mount_fd: int, dir_fd: int, label: str) -> None:
        self._mount_fd = mount_fd
        self.dir = SafeDir(dir_fd, label)

    @classmethod
    def create(cls, label: str, *, size_bytes: int, inodes: int, mode: int, uid: int,
               gid: int) -> Self:
        """Make a fresh tmpfs whose root has `mode` and belongs to uid:gid.

        Raises:
            SandboxSetupError: the kernel refused (no new mount API, no room).
        """
        options = {"source": SOURCE, "size": str(size_bytes), "nr_inodes": str(inodes),
                   "mode": f"{mode:04o}", "uid": str(uid), "gid": str(gid)}
        try:
            mount_fd = _libc.fsmount_tmpfs(options, _ATTRS)
        except OSError as exc:
            raise SandboxSetupError(f"cannot create the step's {label} filesystem "
                                    f"({exc.strerror})") from exc
        # fsmount gives an O_PATH descriptor: it owns the detached mount
        # (closing it dissolves the mount, after which it can no longer be
        # cloned), so keep it, and open the root as a real directory for I/O.
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mount_fd)
        except OSError as exc:
            os.close(mount_fd)
            raise SandboxSetupError(f"cannot open the step's {label} filesystem "
                                    f"({exc.strerror})") from exc
        return cls(mount_fd, fd, label)

    def clone_fd(self) -> int:
        """A detached copy of the mount for the sandbox child (caller closes it).

        Raises:
            SandboxSetupError: the kernel refused the clone.
        """
        try:
            return _libc.open_tree_clone_fd(self._mount_fd)
        except OSError as exc:
            raise SandboxSetupError(f"cannot hand over the step's {self.dir.label} "
                                    f"({exc.strerror})") from exc

    def close(self) -> None:
        """Drop the engine's references; the filesystem dies with the last one."""
        self.dir.close()
        if self._mount_fd >= 0:
            os.close(self._mount_fd)
            self._mount_fd = -1


@dataclasses.dataclass
class StepMounts:
    """The step's three filesystems (secret only with a Vault scope)."""

    workspace: StepFs
    cost: StepFs
    secret: StepFs | None = None

    @classmethod
    def create(cls, uid: int, gid: int, *, workspace_bytes: int, workspace_inodes: int,
               with_secret: bool) -> StepMounts:
        """Fresh filesystems for one attempt of a step.

        The secret filesystem's root is root-owned, group the step's gid,
        mode 0550: the step can read the token but add nothing next to it.
        """
        made: list[StepFs] = []
        try:
            made.append(StepFs.create("workspace", size_bytes=workspace_bytes,
                                      inodes=workspace_inodes, mode=0o700, uid=uid, gid=gid))
            made.append(StepFs.create("cost dir", size_bytes=COST_FS_BYTES,
                                      inodes=COST_FS_INODES, mode=0o700, uid=uid, gid=gid))
            if with_secret:
                made.append(StepFs.create("secret dir", size_bytes=SECRET_FS_BYTES,
                                          inodes=SECRET_FS_INODES, mode=0o550, uid=0, gid=gid))
        except BaseException:
            for fs in made:
                fs.close()
            raise
        return cls(*made)

    def clone_fds(self) -> tuple[int, int, int]:
        """Clones for the child: (workspace, cost, secret or -1). Caller closes them."""
        clones: list[int] = []
        try:
            for fs in (self.workspace, self.cost, self.secret):
                clones.append(-1 if fs is None else fs.clone_fd())
        except BaseException:
            for fd in clones:
                if fd >= 0:
                    os.close(fd)
            raise
        work, cost, secret = clones
        return work, cost, secret

    def close(self) -> None:
        """Close every filesystem (idempotent)."""
        for fs in (self.workspace, self.cost, self.secret):
            if fs is not None:
                fs.close()
