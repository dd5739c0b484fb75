# SPDX-License-Identifier: Apache-2.0
"""Host-wide leases of step identities (uid == gid) from the operator's range (T-MT03).

Every engine on a host that shares one state_dir leases each step's uid from
the same pool, `[base, base + count)`, instead of deriving it from the step's
position in its plan; two tenants' steps therefore never share a uid, so
neither can exhaust the other's RLIMIT_NPROC (counted per uid), read the
other's files, or signal the other's processes.

What a lease guarantees, among engines that share the lease directory and
see the same /proc (one PID namespace):

- no two live leases name the same uid: each lease is an exclusive
  flock(2) on the file `<uid>` in the lease directory, and flock conflicts
  between any two open file descriptions, so two engines, or two threads
  of one engine, never hold the same uid;
- a uid is not handed out while any live process on the host has it as a
  real, effective, saved or filesystem uid, or as a real, effective, saved,
  filesystem or supplementary gid: the pool scans /proc *after* taking the
  lock (a process with the uid can then only be a survivor of an earlier
  holder, never a new one), so the dying tree of a crashed engine keeps its
  uid out of use for as long as any process of it lives. A step's namespace
  init runs as the step's uid and the kernel keeps it in /proc until its
  PID namespace is empty, so a tree cannot hide between two /proc entries.

What it does not guarantee:

- uids in the range used by unrelated software (a local user, a service
  account, a rootless container's subordinate ids, files left on disk by
  an earlier owner of the uid) are not detected beyond the live-process
  scan. **The operator must reserve the range for haios**;
  `check_pool_range` refuses a range that overlaps a user or group the host
  knows, a subordinate-id range or the kernel's overflow id, but it cannot
  see ids that exist only in files.
- engines that do not share the lease directory, or that run in another
  PID namespace (they do not see each other's processes in /proc), are not
  coordinated.
- deleting a lease file while engines run breaks the exclusion (a new file
  gets a new lock); haios never deletes one, and neither may the operator.

Why flock: the kernel drops the lock when the last descriptor of the
holder's open file description closes, including when the engine is
SIGKILLed, so there is no stale-lock cleanup, no pid file to trust, and no
window in which a dead holder's lease looks alive. The pid and time written
into the lease file are for operators only.

One thing is read back: a holder that releases its lease writes `released`
into the file, and only after its step's whole tree is gone (the engine
releases after the runner has reaped the namespace init, which the kernel
reports only once every process of the PID namespace has exited). The next
lease of that uid then skips the /proc scan, which costs milliseconds on a
busy host. A lease file without that word (new, or left by a holder that
died) is scanned as before. Only root engines can write the file: it is
root-owned, mode 0600, in a root-owned 0700 directory.

Does I/O: opens, locks and writes lease files under the lease directory,
and reads /proc and /etc; it never unlinks a lease file.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import grp
import logging
import math
import os
import pwd
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from haios._util.clock import wall_clock
from haios._util.safedir import SafeDir
from haios.errors import InputError, InternalError, SandboxSetupError

_log = logging.getLogger(__name__)

#: the largest uid a step may get: (uid_t)-1 means "leave unchanged" to set*id(2)
UID_MAX: Final = 2**32 - 2
#: the kernel's default overflow uid/gid (/proc/sys/kernel/overflowuid): the
#: id shown for unmapped users in user namespaces and for NFS-squashed files
OVERFLOW_ID: Final = 65534
#: pause between two sweeps of a fully leased pool
RETRY_SLEEP_SECONDS: Final = 0.05

_LEASE_FLAGS: Final = (
    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
)
_PROC: Final = "/proc"
_STATUS_MAX_BYTES: Final = 64 * 1024
#: a status Uid/Gid line: real, effective, saved, filesystem
_IDS_PER_LINE: Final = 4
_SUBID_FILES: Final = ("/etc/subuid", "/etc/subgid")
_SUBID_MAX_BYTES: Final = 4 * 1024 * 1024
#: errnos of an open that met something other than a regular file at the name
_NOT_A_FILE_ERRNOS: Final = frozenset(
    {errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EWOULDBLOCK}
)


class _Skip(enum.Enum):
    """Why a candidate uid was passed over without a lock."""

    HELD = "held"  # another open file description holds the lock
    UNUSABLE = "unusable"  # something other than a plain root-owned file is there


class UidLease:
    """One held step identity; uid == gid. Release only after the step's tree is gone.

    Made by `UidPool.lease`, never directly. The lease is the exclusive flock
    on the open lease file; releasing truncates the operator note, unlocks
    and closes. A lease that is never released stays held until the engine
    exits (the kernel then drops the lock).

    Attributes:
        uid: the leased user id.
        gid: the leased group id (always equal to `uid`).
    """

    def __init__(self, uid: int, fd: int,
                 on_release: Callable[[int], None] | None = None) -> None:
        self.uid: Final = uid
        self.gid: Final = uid
        self._fd = fd
        self._guard = threading.Lock()
        self._on_release = on_release

    @property
    def released(self) -> bool:
        """True once `release` ran."""
        with self._guard:
            return self._fd < 0

    def release(self) -> None:
        """Give the uid back to the pool (idempotent, thread-safe).

        Call it only when no process of the step that ran as this uid is
        left; if one is, the pool's /proc scan still keeps the uid out of use
        until it is gone.

        Side Effects:
            Empties the lease file, drops the flock and closes the descriptor.
        """
        with self._guard:
            fd, self._fd = self._fd, -1
        if fd < 0:
            return
        # The guard makes the close happen once: closing a number twice could
        # close a descriptor another thread has opened since.
        _unlock_and_close(fd, clear_note=True)
        if self._on_release is not None:
            self._on_release(self.uid)

    def __enter__(self) -> UidLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"UidLease(uid={self.uid}, gid={self.gid}, {state})"


class UidPool:
    """The host's pool of step uids `[base, base + count)`, shared through `lease_dir`.

    Thread-safe: any number of threads (and engines) may call `lease` at
    once; the pool keeps no per-lease state of its own, only a short list
    of the uids it released cleanly, tried first (they need no /proc scan).

    Attributes:
        base: the first uid of the range.
        count: how many uids the range holds.
    """

    def __init__(self, lease_dir: SafeDir, base: int, count: int) -> None:
        """Check the range and the lease directory; take nothing yet.

        Args:
            lease_dir: the open lease directory, shared by every engine on
                the host; it must be a root-owned directory with no group or
                other access (0700). The caller keeps ownership and closes it
                after every lease is released.
            base: the first uid of the range (at least 1).
            count: the number of uids (at least 1; the range ends at or
                below `UID_MAX`).

        Raises:
            SandboxSetupError: the range is empty or out of bounds, or the
                lease directory is not a root-owned 0700 directory.

        Side Effects:
            fstat of the lease directory.
        """
        _check_bounds(base, count)
        try:
            info = os.fstat(lease_dir.fd)
        except OSError as exc:
            raise SandboxSetupError(
                f"{lease_dir.label}: cannot stat the uid lease "
                f"directory ({os.strerror(exc.errno or 0)})"
            ) from exc
        if not stat.S_ISDIR(info.st_mode):
            raise SandboxSetupError(
                f"{lease_dir.label}: the uid lease directory is not a directory"
            )
        # Anyone who can open a lease file can flock it; only root may.
        if info.st_uid != 0 or stat.S_IMODE(info.st_mode) & 0o077:
            raise SandboxSetupError(
                f"{lease_dir.label}: the uid lease directory must be owned by root with mode "
                f"0700 (owner {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})"
            )
        self.base: Final = base
        self.count: Final = count
        self._dir = lease_dir
        self._warned_lock = threading.Lock()
        #: uids this pool released cleanly, oldest first (at most _WARM_MAX)
        self._warm: list[int] = []
        self._warm_lock = threading.Lock()
        self._warned: set[int] = set()

    def lease(self, timeout_seconds: float) -> UidLease:
        """Lease a uid no live step and no live process on the host has.

        Sweeps the range from a random offset (so engines spread out),
        taking the first uid whose lease file it can lock and that no
        process uses; a fully leased pool is swept again every
        `RETRY_SLEEP_SECONDS` until the timeout. A timeout of 0 sweeps once.

        Args:
            timeout_seconds: how long to wait for a uid to come free.

        Returns:
            The held lease; the caller releases it after the step's whole
            process tree is gone.

        Raises:
            SandboxSetupError: every uid stayed taken (or unusable) until the
                timeout, a lease file or /proc could not be read, or the
                lease directory refuses new files.
            InternalError: `timeout_seconds` is negative or not finite.

        Side Effects:
            Creates lease files, takes and drops flocks, reads /proc, writes
            the holder's pid and the time into the leased file.
        """
        if not math.isfinite(timeout_seconds) or timeout_seconds < 0:
            raise InternalError(
                f"uid lease timeout must be finite and >= 0, not {timeout_seconds!r}"
            )
        deadline = time.monotonic() + timeout_seconds
        while True:
            lease, unusable = self._sweep()
            if lease is not None:
                return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(RETRY_SLEEP_SECONDS, remaining))
        detail = (
            f"; {unusable} lease files are not plain root-owned 0600 files in {self._dir.label}"
            if unusable
            else ""
        )
        raise SandboxSetupError(
            f"the uid pool of {self.count} uids ({self.base}-{self.base + self.count - 1}) is "
            f"exhausted on this host: every uid is leased by a running step or used by a live "
            f"process (waited {timeout_seconds:g}s){detail}"
        )

    def _note_released(self, uid: int) -> None:
        """Remember a uid this pool released cleanly, to try it first next time."""
        with self._warm_lock:
            if uid in self._warm:
                self._warm.remove(uid)
            self._warm.append(uid)
            del self._warm[:-_WARM_MAX]

    def _candidates(self) -> Iterator[int]:
        """The uids to try, in order: this pool's recently released ones (the
        newest first: their lease file says released, so no /proc scan is
        needed), then the whole range from a random offset (so engines
        spread out)."""
        with self._warm_lock:
            warm = self._warm[::-1]
        yield from warm
        tried = set(warm)
        start = secrets.randbelow(self.count)
        for step in range(self.count):
            uid = self.base + (start + step) % self.count
            if uid not in tried:
                yield uid

    def _sweep(self) -> tuple[UidLease | None, int]:
        """One pass over the range; (a lease or None, unusable lease files seen)."""
        unusable = 0
        for uid in self._candidates():
            fd = self._lock(uid)
            if fd is _Skip.UNUSABLE:
                unusable += 1
            if isinstance(fd, _Skip):
                continue
            # Only now, with the lock held, can no new process get this uid
            # (only a holder starts one), so a clean scan stays true. A
            # holder that released after its tree ended said so: no scan.
            try:
                user = None if _released_cleanly(fd) else _pid_using_id(uid)
            except BaseException:
                _unlock_and_close(fd, clear_note=False)
                raise
            if user is not None:
                _log.info(
                    "uid %d is free in the pool but process %d still uses it; skipped", uid, user
                )
                _unlock_and_close(fd, clear_note=False)
                continue
            _write_note(fd)
            return UidLease(uid, fd, self._note_released), unusable
        return None, unusable

    def _lock(self, uid: int) -> int | _Skip:
        """The locked lease file's descriptor, or why there is none.

        Raises:
            SandboxSetupError: the lease directory refuses the open or lock
                for a reason other than a planted non-file.
        """
        name = str(uid)
        label = f"{self._dir.label}/{name}"
        try:
            before = self._dir.lstat(name)
        except OSError as exc:
            raise SandboxSetupError(
                f"{label}: cannot stat lease file ({os.strerror(exc.errno or 0)})"
            ) from exc
        # Never open a device, FIFO or socket: opening alone can block or act.
        if before is not None and not stat.S_ISREG(before.st_mode):
            return self._unusable(uid, label, "not a regular file")
        try:
            fd = os.open(name, _LEASE_FLAGS, 0o600, dir_fd=self._dir.fd)
        except OSError as exc:
            if exc.errno in _NOT_A_FILE_ERRNOS:
                return self._unusable(uid, label, os.strerror(exc.errno or 0))
            raise SandboxSetupError(
                f"{label}: cannot open lease file ({os.strerror(exc.errno or 0)})"
            ) from exc
        outcome: int | _Skip = _Skip.HELD
        try:
            outcome = self._check_and_lock(fd, uid, name, label)
        except OSError as exc:
            raise SandboxSetupError(
                f"{label}: cannot lock lease file ({os.strerror(exc.errno or 0)})"
            ) from exc
        finally:
            if isinstance(outcome, _Skip):
                _unlock_and_close(fd, clear_note=False)
        return outcome

    def _check_and_lock(self, fd: int, uid: int, name: str, label: str) -> int | _Skip:
        """Lock the opened lease file if it is a plain root-owned 0600 file.

        Raises:
            OSError: fstat, flock or the re-check failed.
        """
        info = os.fstat(fd)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != 0
            or info.st_nlink != 1
            or stat.S_IMODE(info.st_mode) & 0o077
        ):
            return self._unusable(uid, label, "not a plain root-owned 0600 file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _Skip.HELD
        # A lease file replaced between open and lock would give two holders
        # two different locks for one uid.
        after = self._dir.lstat(name)
        if after is None or (after.st_dev, after.st_ino) != (info.st_dev, info.st_ino):
            return _Skip.HELD
        return fd

    def _unusable(self, uid: int, label: str, why: str) -> _Skip:
        """Skip a uid whose lease file is not ours to lock; warn once per uid."""
        with self._warned_lock:
            first = uid not in self._warned
            self._warned.add(uid)
        if first:
            _log.warning("%s: %s; uid %d is never leased while it is there", label, why, uid)
        return _Skip.UNUSABLE


#: how many recently released uids a pool tries before sweeping the range
_WARM_MAX: Final = 64

#: what a holder writes when it releases after its step's tree is gone
RELEASED: Final = b"released\n"


def _unlock_and_close(fd: int, *, clear_note: bool) -> None:
    """Drop the flock first, then close.

    The explicit unlock matters: a process forked by another engine thread
    shares this open file description until it execs or closes its copies,
    and a bare close would leave the lock held through that copy.
    """
    try:
        if clear_note:
            # Before the unlock, so the next holder's note is never erased.
            # Without it (a failed write) the next lease scans /proc: safe.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, RELEASED, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _released_cleanly(fd: int) -> bool:
    """True when the previous holder released the uid after its tree ended."""
    try:
        return os.pread(fd, len(RELEASED), 0) == RELEASED
    except OSError:
        return False


def _write_note(fd: int) -> None:
    """Write the holder's pid and the time for operators (read back only
    as "not released": a holder that died keeps its note, so the next lease
    scans /proc)."""
    note = f"pid {os.getpid()} leased {wall_clock().isoformat(timespec='seconds')}\n"
    # Informational only: a full disk must not fail a lease already held.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)


def _pid_using_id(ident: int) -> int | None:
    """A live pid that has `ident` among its uids or gids, or None.

    Reads the Uid (real, effective, saved, filesystem), Gid (same four) and
    Groups lines of /proc/<pid>/status for every process; a process that
    exits during the scan is not a user. Thread credentials are not read
    separately: glibc changes them for the whole process, and steps cannot
    change them at all (seccomp).

    Raises:
        SandboxSetupError: /proc cannot be listed, or a status cannot be
            read or parsed (fail closed: an unread process might use it).

    Side Effects:
        Reads /proc.
    """
    try:
        proc = os.open(_PROC, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxSetupError(f"{_PROC}: cannot open ({os.strerror(exc.errno or 0)})") from exc
    try:
        for name in os.listdir(proc):
            if not name.isdigit():
                continue
            status = _read_status(proc, name)
            if status is not None and ident in _status_ids(status, name):
                return int(name)
    finally:
        os.close(proc)
    return None


def _read_status(proc: int, pid: str) -> bytes | None:
    """/proc/<pid>/status, or None when the process is gone."""
    try:
        fd = os.open(f"{pid}/status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        raise SandboxSetupError(
            f"{_PROC}/{pid}/status: cannot open ({os.strerror(exc.errno or 0)})"
        ) from exc
    try:
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, _STATUS_MAX_BYTES)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > _STATUS_MAX_BYTES:
                raise SandboxSetupError(
                    f"{_PROC}/{pid}/status: larger than {_STATUS_MAX_BYTES} bytes"
                )
            chunks.append(chunk)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        raise SandboxSetupError(
            f"{_PROC}/{pid}/status: cannot read ({os.strerror(exc.errno or 0)})"
        ) from exc
    finally:
        os.close(fd)


def _status_ids(status: bytes, pid: str) -> set[int]:
    """Every uid and gid in a status file (Uid, Gid, Groups).

    Raises:
        SandboxSetupError: the Uid or Gid line is missing or malformed.
    """
    ids: set[int] = set()
    seen: set[bytes] = set()
    for line in status.splitlines():
        key, _, rest = line.partition(b":")
        if key not in (b"Uid", b"Gid", b"Groups"):
            continue
        fields = rest.split()
        if key != b"Groups" and len(fields) != _IDS_PER_LINE:
            raise SandboxSetupError(f"{_PROC}/{pid}/status: malformed {key.decode()} line")
        try:
            ids.update(int(field) for field in fields)
        except ValueError as exc:
            raise SandboxSetupError(f"{_PROC}/{pid}/status: malformed {key.decode()} line") from exc
        seen.add(key)
    if not {b"Uid", b"Gid"} <= seen:
        raise SandboxSetupError(f"{_PROC}/{pid}/status: no Uid/Gid lines")
    return ids


def _check_bounds(base: int, count: int) -> None:
    """Refuse an empty range, uid 0, or one that runs past `UID_MAX`."""
    if count < 1:
        raise SandboxSetupError(f"the uid pool must hold at least one uid, not {count}")
    if base < 1 or base + count - 1 > UID_MAX:
        raise SandboxSetupError(
            f"the uid pool {base}-{base + count - 1} must lie within 1-{UID_MAX}"
        )


def check_pool_range(base: int, count: int) -> None:
    """Refuse a uid range the host already uses for something else.

    The pool's ids double as uids and gids, so the range must hold no user
    and no group the host knows (every entry of pwd.getpwall() and
    grp.getgrall(), i.e. /etc/passwd, /etc/group and any enumerable NSS
    source, not a sample), no subordinate id range (/etc/subuid,
    /etc/subgid: rootless containers run as those), and not the kernel's
    overflow id 65534. The engine calls it once at start; it does not make
    the range reserved: **the operator must reserve the range for haios**
    (no user, group, container mapping or file owner may use it, now or
    later), because ids used only by files on disk, or by NSS sources that
    do not enumerate, cannot be seen here.

    Args:
        base: the first uid of the range.
        count: how many uids the range holds.

    Raises:
        SandboxSetupError: the range is empty or out of bounds, or overlaps
            a user, group, subordinate-id range or the overflow id (the
            message names the first overlap found in each source).

    Side Effects:
        Reads the user and group databases and /etc/subuid, /etc/subgid.
    """
    _check_bounds(base, count)
    end = base + count
    overlaps: list[str] = []
    if base <= OVERFLOW_ID < end:
        overlaps.append(f"the kernel's overflow id {OVERFLOW_ID}")
    user = next((entry for entry in pwd.getpwall() if base <= entry.pw_uid < end), None)
    if user is not None:
        overlaps.append(f"user {user.pw_name!r} (uid {user.pw_uid})")
    group = next((entry for entry in grp.getgrall() if base <= entry.gr_gid < end), None)
    if group is not None:
        overlaps.append(f"group {group.gr_name!r} (gid {group.gr_gid})")
    for path in _SUBID_FILES:
        for owner, first, size in _subid_ranges(path):
            if first < end and base < first + size:
                overlaps.append(f"{path} range of {owner!r} ({first}-{first + size - 1})")
                break
    if overlaps:
        raise SandboxSetupError(
            f"the uid pool {base}-{end - 1} overlaps "
            + ", ".join(overlaps)
            + "; reserve a range no user, group or container mapping uses"
        )


def _subid_ranges(path: str) -> list[tuple[str, int, int]]:
    """(owner, first, count) per line of a subuid/subgid file; [] when absent.

    Raises:
        SandboxSetupError: the file is unsafe, oversize or malformed.
    """
    directory, _, name = path.rpartition("/")
    try:
        with SafeDir.open(directory) as parent:
            if parent.lstat(name) is None:
                return []
            data = parent.read_bytes(name, max_bytes=_SUBID_MAX_BYTES)
    except InputError as exc:
        raise SandboxSetupError(f"cannot check subordinate ids: {exc}") from exc
    ranges: list[tuple[str, int, int]] = []
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        owner, _, rest = line.partition(":")
        first, _, size = rest.partition(":")
        if not (first.isdigit() and size.isdigit()):
            raise SandboxSetupError(f"{path}:{number}: malformed subordinate-id line")
        ranges.append((owner, int(first), int(size)))
    return ranges
