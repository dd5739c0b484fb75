# SPDX-License-Identifier: Apache-2.0
"""Thin ctypes bindings for the Linux calls the sandbox needs and `os` lacks.

Each wrapper makes exactly one system call and raises `OSError` with the
kernel's errno on failure; none of them allocates more than a few small ctypes
objects, so they are safe to call in a child forked from a threaded process.
Constants are the x86_64 values from the kernel UAPI headers; the sandbox runs
only on x86_64 (the seccomp filter is pinned to it).

This module does no I/O when imported beyond loading libc. Its functions touch
the OS (namespaces, mounts, capabilities, seccomp) and are meant for the
sandbox child and for the preflight checks only.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Final

# -- namespaces (linux/sched.h) ----------------------------------------------
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWCGROUP: Final = 0x02000000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

# -- mounts (linux/mount.h) --------------------------------------------------
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
MNT_DETACH: Final = 0x2
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MOUNT_ATTR_NOEXEC: Final = 0x8
OPEN_TREE_CLONE: Final = 0x1
AT_FDCWD: Final = -100
AT_SYMLINK_NOFOLLOW: Final = 0x100
AT_EMPTY_PATH: Final = 0x1000
AT_RECURSIVE: Final = 0x8000
MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
FSOPEN_CLOEXEC: Final = 0x1
FSMOUNT_CLOEXEC: Final = 0x1
FSCONFIG_SET_STRING: Final = 1
FSCONFIG_CMD_CREATE: Final = 6

# -- prctl (linux/prctl.h) ---------------------------------------------------
PR_SET_PDEATHSIG: Final = 1
PR_SET_DUMPABLE: Final = 4
PR_GET_SECCOMP: Final = 21
PR_CAPBSET_DROP: Final = 24
PR_SET_NO_NEW_PRIVS: Final = 38
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4

# -- seccomp, capabilities, close_range --------------------------------------
SECCOMP_SET_MODE_FILTER: Final = 1
LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
CLOSE_RANGE_CLOEXEC: Final = 0x4

# -- posix_spawn (spawn.h) ------------------------------------------------------
POSIX_SPAWN_SETSIGDEF: Final = 0x04
POSIX_SPAWN_SETSIGMASK: Final = 0x08
SIGSET_BYTES: Final = 128
#: glibc's posix_spawnattr_t is 336 bytes on x86_64; leave room
SPAWNATTR_BYTES: Final = 512

# -- x86_64 system call numbers used through syscall(2) ----------------------
SYS_CAPGET: Final = 125
SYS_CAPSET: Final = 126
SYS_PIVOT_ROOT: Final = 155
SYS_SECCOMP: Final = 317
SYS_OPEN_TREE: Final = 428
SYS_MOVE_MOUNT: Final = 429
SYS_FSOPEN: Final = 430
SYS_FSCONFIG: Final = 431
SYS_FSMOUNT: Final = 432
SYS_CLOSE_RANGE: Final = 436
SYS_MOUNT_SETATTR: Final = 442

_libc = ctypes.CDLL(None, use_errno=True)

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_mount = _libc.mount
_mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_mount.restype = ctypes.c_int

_umount2 = _libc.umount2
_umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_umount2.restype = ctypes.c_int

_unshare = _libc.unshare
_unshare.argtypes = (ctypes.c_int,)
_unshare.restype = ctypes.c_int

_setns = _libc.setns
_setns.argtypes = (ctypes.c_int, ctypes.c_int)
_setns.restype = ctypes.c_int

_sethostname = _libc.sethostname
_sethostname.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
_sethostname.restype = ctypes.c_int

_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int

_signal = _libc.signal
_signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
_signal.restype = ctypes.c_void_p


# fork(3) called with the GIL held and without CPython's at-fork work
# (see `fork_single_threaded`).
_fork = ctypes.PyDLL(None, use_errno=True).fork
_fork.argtypes = ()
_fork.restype = ctypes.c_int

_posix_spawn = _libc.posix_spawn
_posix_spawn.argtypes = (
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
)
_posix_spawn.restype = ctypes.c_int
_spawnattr_init = _libc.posix_spawnattr_init
_spawnattr_init.argtypes = (ctypes.c_void_p,)
_spawnattr_setflags = _libc.posix_spawnattr_setflags
_spawnattr_setflags.argtypes = (ctypes.c_void_p, ctypes.c_short)
_spawnattr_setsigdefault = _libc.posix_spawnattr_setsigdefault
_spawnattr_setsigdefault.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
_spawnattr_setsigmask = _libc.posix_spawnattr_setsigmask
_spawnattr_setsigmask.argtypes = (ctypes.c_void_p, ctypes.c_void_p)


class _MountAttr(ctypes.Structure):
    """`struct mount_attr` (linux/mount.h, MOUNT_ATTR_SIZE_VER0 = 32)."""

    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


class _CapHeader(ctypes.Structure):
    """`struct __user_cap_header_struct`."""

    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    """`struct __user_cap_data_struct`; version 3 takes an array of two."""

    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


class SockFprog(ctypes.Structure):
    """`struct sock_fprog`: the classic-BPF program handed to seccomp(2)."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def _check(result: int, what: str, detail: object = None) -> int:
    """Turn a -1 libc return into `OSError` carrying errno and `what` (and
    `detail`, formatted only then: these calls sit on the launch path)."""
    if result < 0:
        err = ctypes.get_errno()
        if detail is not None:
            what = f"{what} {detail}"
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _path(value: str) -> bytes:
    return os.fsencode(value)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    """mount(2).

    Side Effects:
        Changes the calling process's mount namespace.
    """
    _check(
        _mount(
            None if source is None else _path(source),
            _path(target),
            None if fstype is None else fstype.encode(),
            flags,
            None if data is None else data.encode(),
        ),
        "mount",
        target,
    )


def umount2(target: str, flags: int) -> None:
    """umount2(2).

    Side Effects:
        Detaches a mount in the calling process's mount namespace.
    """
    _check(_umount2(_path(target), flags), "umount", target)


def unshare(flags: int) -> None:
    """unshare(2).

    Side Effects:
        Moves the calling thread into new namespaces.
    """
    _check(_unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    """setns(2).

    Side Effects:
        Moves the calling thread (or its future children, for PID) into `fd`.
    """
    _check(_setns(fd, nstype), "setns")


def sethostname(name: str) -> None:
    """sethostname(2) in the current UTS namespace.

    Side Effects:
        Changes the hostname of the calling process's UTS namespace.
    """
    raw = name.encode()
    _check(_sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    """prctl(2) with up to two arguments.

    Side Effects:
        Whatever `option` changes for the calling thread.
    """
    return _check(_prctl(option, arg2, arg3, 0, 0), "prctl", option)


def reset_signal_disposition(signum: int) -> None:
    """Set `signum` to SIG_DFL with libc's signal(3), bypassing Python's table.

    Side Effects:
        Changes the calling process's signal disposition.
    """
    # SIG_ERR is (void *)-1; ctypes returns it as the largest pointer value.
    if _signal(signum, 0) == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"signal {signum}: {os.strerror(err)}")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2).

    Side Effects:
        Changes the root mount of the calling process's mount namespace.
    """
    _check(_syscall(ctypes.c_long(SYS_PIVOT_ROOT), _path(new_root), _path(put_old)), "pivot_root")


def open_tree_clone(path: str) -> int:
    """open_tree(2) with OPEN_TREE_CLONE|AT_RECURSIVE: a detached copy of a mount.

    The copy is taken before any mount hides `path`, and the final component
    is not followed, so a later change of the host path cannot redirect it.

    Returns:
        A close-on-exec file descriptor for the detached mount tree.

    Side Effects:
        Creates a detached mount (freed when the descriptor is closed).
    """
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE | AT_SYMLINK_NOFOLLOW
    return _check(
        _syscall(
            ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD), _path(path), ctypes.c_uint(flags)
        ),
        "open_tree",
        path,
    )


def open_tree_clone_fd(fd: int) -> int:
    """open_tree(2) with OPEN_TREE_CLONE on a mount given by descriptor.

    Returns:
        A close-on-exec descriptor for a detached copy of that mount.
    """
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH
    return _check(
        _syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(fd), b"", ctypes.c_uint(flags)),
        "open_tree (clone)",
    )


# statx(2): the birth time is not in os.stat on Linux.
_STATX_BTIME: Final = 0x800
_STATX_SIZE: Final = 256
_STX_BTIME_OFFSET: Final = 80  # struct statx: stx_btime {s64 tv_sec; u32 tv_nsec}


def statx_btime_ns(fd: int) -> int | None:
    """statx(2) birth time of the file behind `fd`, in nanoseconds, or None
    where the file system keeps none.

    Raises:
        OSError: statx failed.
    """
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    _check(_libc.statx(fd, b"", AT_EMPTY_PATH, _STATX_BTIME, buf), "statx")
    mask: int = struct.unpack_from("<I", buf, 0)[0]
    if not mask & _STATX_BTIME:
        return None
    seconds, nanos = struct.unpack_from("<qI", buf, _STX_BTIME_OFFSET)
    return int(seconds) * 1_000_000_000 + int(nanos)


def fsmount_tmpfs(options: dict[str, str], attrs: int) -> int:
    """A new tmpfs as a detached mount (fsopen, fsconfig, fsmount), never attached.

    Args:
        options: tmpfs options (size, nr_inodes, mode, uid, gid, source).
        attrs: MOUNT_ATTR_* flags of the mount.

    Returns:
        A close-on-exec descriptor of the mount's root directory.

    Side Effects:
        Creates a tmpfs superblock, freed when the last reference goes.
    """
    fs_fd = _check(_syscall(ctypes.c_long(SYS_FSOPEN), b"tmpfs", ctypes.c_uint(FSOPEN_CLOEXEC)),
                   "fsopen tmpfs")
    try:
        for key, value in options.items():
            _check(_syscall(ctypes.c_long(SYS_FSCONFIG), ctypes.c_int(fs_fd),
                            ctypes.c_uint(FSCONFIG_SET_STRING), key.encode(), value.encode(),
                            ctypes.c_int(0)), f"fsconfig {key}")
        _check(_syscall(ctypes.c_long(SYS_FSCONFIG), ctypes.c_int(fs_fd),
                        ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0)),
               "fsconfig create")
        return _check(_syscall(ctypes.c_long(SYS_FSMOUNT), ctypes.c_int(fs_fd),
                               ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attrs)), "fsmount")
    finally:
        os.close(fs_fd)


def mount_setattr_fd(fd: int, attr_set: int, attr_clr: int = 0) -> None:
    """mount_setattr(2) on a whole mount tree given by descriptor.

    Side Effects:
        Changes per-mount flags (read-only, nosuid, nodev) recursively.
    """
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(
        _syscall(
            ctypes.c_long(SYS_MOUNT_SETATTR),
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        "mount_setattr",
    )


def move_mount_fd(fd: int, target: str) -> None:
    """move_mount(2) of a detached tree onto `target` (relative to cwd).

    Side Effects:
        Attaches the mount at `target`.
    """
    _check(
        _syscall(
            ctypes.c_long(SYS_MOVE_MOUNT),
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(AT_FDCWD),
            _path(target),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        "move_mount",
        target,
    )


def close_range(first: int, last: int, flags: int = 0) -> None:
    """close_range(2).

    Side Effects:
        Closes (or marks close-on-exec) descriptors `first`..`last`.
    """
    _check(
        _syscall(
            ctypes.c_long(SYS_CLOSE_RANGE),
            ctypes.c_uint(first),
            ctypes.c_uint(last),
            ctypes.c_uint(flags),
        ),
        "close_range",
    )


def capset_zero() -> None:
    """capset(2): empty the effective, permitted and inheritable sets.

    Side Effects:
        Drops every capability of the calling thread.
    """
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(header), ctypes.byref(data)), "capset")


def capget_self() -> tuple[int, int, int]:
    """capget(2) for the calling thread.

    Returns:
        The (effective, permitted, inheritable) sets as 64-bit masks.
    """
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_syscall(ctypes.c_long(SYS_CAPGET), ctypes.byref(header), ctypes.byref(data)), "capget")
    return (
        data[0].effective | (data[1].effective << 32),
        data[0].permitted | (data[1].permitted << 32),
        data[0].inheritable | (data[1].inheritable << 32),
    )


def seccomp_set_filter(program: SockFprog) -> None:
    """seccomp(SECCOMP_SET_MODE_FILTER): install one classic-BPF program.

    Side Effects:
        Irreversibly adds a system-call filter to the calling thread.
    """
    _check(
        _syscall(
            ctypes.c_long(SYS_SECCOMP),
            ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(0),
            ctypes.byref(program),
        ),
        "seccomp",
    )


def make_fprog(bpf: bytes) -> tuple[SockFprog, ctypes.Array[ctypes.c_char]]:
    """Wrap exported BPF bytes in a `sock_fprog`.

    Returns:
        The program structure and the buffer it points into; keep both alive
        until seccomp(2) has been called.
    """
    buffer = ctypes.create_string_buffer(bpf, len(bpf))
    return SockFprog(len(bpf) // 8, ctypes.addressof(buffer)), buffer


def fork_single_threaded() -> int:
    """fork(3) for a process that runs a single thread.

    os.fork() also re-initialises the interpreter in the child (thread
    states, locks, the threading module, signal flags, at-fork callbacks),
    which writes to hundreds of pages the child then copies one fault at a
    time. With one thread none of that state can be stale, so a process
    that never starts a thread (the launcher) forks with glibc alone.

    Returns:
        0 in the child, the child's pid in the parent.

    Raises:
        OSError: fork failed.

    Side Effects:
        Creates a process.
    """
    return _check(_fork(), "fork")


def _string_array(values: list[str]) -> ctypes.Array[ctypes.c_char_p]:
    array = (ctypes.c_char_p * (len(values) + 1))()
    for index, value in enumerate(values):
        array[index] = os.fsencode(value)
    return array


class SpawnRequest:
    """A posix_spawn(3) call prepared in advance (argv, envp, attributes).

    Every signal, glibc's internal SIGCANCEL and SIGSETXID included, starts
    at SIG_DFL in the new program with an empty mask. glibc's sigaddset
    refuses those two, and without them in the "set default" list
    posix_spawn would hand them to the program as SIG_IGN; the set is
    therefore filled byte by byte.

    Preparing allocates; `spawn` only calls libc, which clones with
    CLONE_VM|CLONE_VFORK and execs: no Python runs in the new process.
    """

    def __init__(self, path: str, argv: list[str], env: list[str]) -> None:
        """Build the C arrays and the attribute object.

        Raises:
            OSError: posix_spawnattr_* refused a setting.
        """
        self._path = os.fsencode(path)
        self._argv = _string_array(argv)
        self._envp = _string_array(env)
        self._attr = ctypes.create_string_buffer(SPAWNATTR_BYTES)
        self._all_signals = ctypes.create_string_buffer(b"\xff" * SIGSET_BYTES, SIGSET_BYTES)
        self._no_signals = ctypes.create_string_buffer(SIGSET_BYTES)
        for result, what in (
            (_spawnattr_init(self._attr), "posix_spawnattr_init"),
            (
                _spawnattr_setflags(self._attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK),
                "setflags",
            ),
            (_spawnattr_setsigdefault(self._attr, self._all_signals), "setsigdefault"),
            (_spawnattr_setsigmask(self._attr, self._no_signals), "setsigmask"),
        ):
            if result != 0:
                raise OSError(result, f"{what}: {os.strerror(result)}")
        self._pid = ctypes.c_int(0)

    def spawn(self) -> int:
        """posix_spawn(3) the prepared program.

        Returns:
            The new process's pid.

        Raises:
            OSError: the process could not be created or execve failed
                (glibc reports the execve errno as the return value).

        Side Effects:
            Creates a process running the program.
        """
        result = _posix_spawn(
            ctypes.byref(self._pid),
            self._path,
            None,
            ctypes.addressof(self._attr),
            ctypes.addressof(self._argv),
            ctypes.addressof(self._envp),
        )
        if result != 0:
            raise OSError(result, f"execve {self._path!r}: {os.strerror(result)}")
        return self._pid.value
