# SPDX-License-Identifier: Apache-2.0
"""The writer of `audit.jsonl`: opens, verifies, continues and appends the chain.

Every path is relative to a directory descriptor the caller opened; the
existing chain is read through the very descriptor that appends. The pure
rules (encoding, verification) are in `haios/audit/chain.py`.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn, Self

from haios._util.clock import wall_clock
from haios.audit.chain import (
    AUDIT_FILE_NAME,
    AUDIT_MAX_BYTES,
    TORN_TAIL_KIND,
    UNSIGNED_RECORDS_KIND,
    AuditChain,
    AuditHead,
    encode_record,
    format_time,
    record_sha256,
    verify_audit_against_head,
    verify_audit_bytes,
)
from haios.errors import (
    EnvironmentUnavailableError,
    InternalError,
    PathError,
    TamperedError,
)

if TYPE_CHECKING:
    from types import TracebackType

    from haios._util.durability import Barrier
    from haios.events import Event

_FILE_MODE: Final = 0o600
_OPEN_FLAGS: Final = (
    # O_RDWR, not O_WRONLY: the existing chain is read through the very
    # descriptor that appends, so nothing can be swapped in between.
    os.O_RDWR
    | os.O_APPEND
    | os.O_CREAT
    | os.O_NOFOLLOW
    | os.O_CLOEXEC
    | os.O_NOCTTY
    # a FIFO planted at the path must not block the open; fstat refuses it
    | os.O_NONBLOCK
)
_READ_CHUNK_BYTES: Final = 1024 * 1024
# Errnos meaning "something other than a regular file is at the path".
_WRONG_TYPE_ERRNOS: Final = frozenset({errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR})


class AuditLog:
    """The engine's writer of `audit.jsonl`. Thread-safe.

    Build with `AuditLog.open`. Each `append` is durable (fsync) before it
    returns, so a record exists before the action it records takes effect;
    after `defer_to(barrier)` the engine batches that fsync into the
    barrier it flushes before any such effect (haios/_util/durability.py).
    After any write or fsync failure the log refuses every later append: the
    file's tail is unknown, and retrying after a failed fsync can report
    success for data that never reached the disk.
    """

    def __init__(
        self,
        fd: int,
        chain: AuditChain,
        size: int,
        clock: Callable[[], dt.datetime],
        signed_count: int | None,
    ) -> None:
        """Wrap an opened, verified log; use `AuditLog.open` instead.

        Args:
            fd: the open descriptor, now owned by this object.
            chain: the verified chain read from it.
            size: the file's size in bytes, torn tail included.
            clock: returns the current aware datetime.
            signed_count: the signed head's count, when one was checked.
        """
        self._fd = fd
        self._head = chain.head
        self._torn_tail_bytes = chain.torn_tail_bytes
        # Records past the signed head carry no signature: say so in the chain
        # before continuing it, so a later signed head does not vouch for them.
        self._unsigned_from = (
            signed_count if signed_count is not None and chain.count > signed_count else None
        )
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        #: appends wait for a barrier's flush instead of an fsync each
        self._deferred = False
        self._dirty = False
        self._closed = False
        self._broken = False

    @classmethod
    def open(
        cls,
        dir_fd: int,
        name: str = AUDIT_FILE_NAME,
        *,
        signed_head: AuditHead | None = None,
        clock: Callable[[], dt.datetime] = wall_clock,
    ) -> Self:
        """Open (or create) the log in `dir_fd`, verify it, and continue its chain.

        Args:
            dir_fd: an open `O_DIRECTORY|O_NOFOLLOW` descriptor of os_root.
            name: the file name inside it (a single path component).
            signed_head: the head from the engine's signed `state.json`, when
                there is one; the log must then contain it (see
                `verify_audit_against_head`). Without it the chain is only
                checked for internal consistency: pass it whenever a signed
                state exists.
            clock: returns the current aware datetime (tests inject one).

        Returns:
            The open log, positioned after its last complete record.

        Raises:
            PathError: `name` is not a plain file name, or a symlink, FIFO,
                device, directory or hardlinked file is at the path.
            TamperedError: the existing content does not verify.
            EnvironmentUnavailableError: the file cannot be opened or read
                for another reason (permissions, I/O error).

        Side Effects:
            Creates the file (mode 0o600) when absent, reads it whole, and
            fsyncs `dir_fd` when the file is empty so its entry is durable.
            Never follows a symlink.
        """
        _check_file_name(name)
        before = _lstat_or_none(dir_fd, name)
        if before is not None:
            _check_regular_single_link(before, name)
        try:
            fd = os.open(name, _OPEN_FLAGS, _FILE_MODE, dir_fd=dir_fd)
        except OSError as e:
            _raise_os_error(e, f"cannot open {name}")
        try:
            size, chain = _read_and_verify(fd, name, before, signed_head)
            if size == 0:
                os.fsync(dir_fd)
        except OSError as e:
            os.close(fd)
            _raise_os_error(e, f"cannot read {name}")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, chain, size, clock, None if signed_head is None else signed_head.count)

    @property
    def head(self) -> AuditHead:
        """The head after the last complete record: what the engine signs."""
        with self._lock:
            return self._head

    def append(self, kind: str, fields: Mapping[str, Any]) -> str:
        """Write one record and make it durable.

        Args:
            kind: the event kind (a lowercase dotted name).
            fields: the event's JSON-compatible fields, never a secret.

        Returns:
            The new head's SHA-256 hex.

        Raises:
            InternalError: the record is invalid (see `encode_record`) or the
                log is closed.
            TamperedError: the file changed under the log (another writer,
                a new hardlink) since the last append.
            EnvironmentUnavailableError: the write or fsync failed, a
                previous one did, or the log reached `AUDIT_MAX_BYTES`.

        Side Effects:
            Before the first record after `open`, cuts a torn tail off and
            records that (`TORN_TAIL_KIND`), and records any records found
            past the signed head (`UNSIGNED_RECORDS_KIND`). Appends to the
            file and fsyncs it before returning.
        """
        with self._lock:
            self._check_writable()
            if self._torn_tail_bytes:
                self._cut_torn_tail()
            if self._unsigned_from is not None:
                self._note_unsigned_records(self._unsigned_from)
            return self._append_locked(kind, fields)

    def defer_to(self, barrier: Barrier) -> None:
        """From now on, appends are made durable at `barrier`'s flush, not one by one.

        The engine flushes the barrier before any effect a record describes
        can be observed outside it (docs/durability.md).
        """
        with self._lock:
            self._deferred = True
        barrier.add_flusher(self.sync)

    def sync(self) -> None:
        """Make every record appended so far durable (a no-op when they are).

        Raises:
            EnvironmentUnavailableError: the fsync failed; the log refuses
                every later append.
        """
        with self._lock:
            if not self._closed:
                self._sync_locked()

    def _sync_locked(self) -> None:
        """fsync pending records; the lock is held and the file open."""
        if not self._dirty:
            return
        try:
            os.fsync(self._fd)
        except OSError as e:
            self._broken = True
            _raise_os_error(e, "cannot make audit.jsonl durable")
        self._dirty = False

    def subscriber(self, event: Event) -> None:
        """Record `event`; pass this method to `EventBus.subscribe`.

        Args:
            event: any event; its kind and fields become one record.

        Raises:
            The errors of `append`: a record that cannot be made durable
            stops the action it describes.

        Side Effects:
            As `append`.
        """
        self.append(event.KIND, event.fields())

    def close(self) -> None:
        """Make pending records durable, close the file; later appends raise.

        Raises:
            EnvironmentUnavailableError: the pending records could not be
                made durable (the file is closed all the same).

        Side Effects:
            fsyncs when records are pending; closes the descriptor (once).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._sync_locked()
            finally:
                os.close(self._fd)

    def __enter__(self) -> Self:
        """Use the log as a context manager that closes it."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the log."""
        self.close()

    def _check_writable(self) -> None:
        """Refuse to append to a closed, failed or externally changed file."""
        if self._closed:
            msg = "audit.jsonl is closed"
            raise InternalError(msg)
        if self._broken:
            msg = "audit.jsonl: an earlier write failed; no further record can be trusted"
            raise EnvironmentUnavailableError(msg)
        try:
            st = os.fstat(self._fd)
        except OSError as e:
            self._broken = True
            _raise_os_error(e, "cannot stat audit.jsonl")
        # The engine is the only writer (it holds the os_root lock): any other
        # size means someone else wrote, and our next prev would lie.
        if st.st_size != self._size or st.st_nlink != 1:
            self._broken = True
            msg = "audit.jsonl changed under the engine (size or link count)"
            raise TamperedError(msg)

    def _cut_torn_tail(self) -> None:
        """Truncate the torn tail and record its length and hash."""
        tail_start = self._size - self._torn_tail_bytes
        try:
            tail = os.pread(self._fd, self._torn_tail_bytes, tail_start)
            os.ftruncate(self._fd, tail_start)
        except OSError as e:
            self._broken = True
            _raise_os_error(e, "cannot truncate the torn tail of audit.jsonl")
        self._size = tail_start
        self._torn_tail_bytes = 0
        # The record's own fsync also makes the truncation durable.
        self._append_locked(
            TORN_TAIL_KIND,
            {"discarded_bytes": len(tail), "discarded_sha256": hashlib.sha256(tail).hexdigest()},
        )

    def _note_unsigned_records(self, signed_count: int) -> None:
        """Record that the records from `signed_count` on were found unsigned."""
        self._append_locked(
            UNSIGNED_RECORDS_KIND, {"signed_count": signed_count, "count": self._head.count}
        )
        self._unsigned_from = None

    def _append_locked(self, kind: str, fields: Mapping[str, Any]) -> str:
        """Encode, write and fsync one record; the lock is held."""
        line = encode_record(
            seq=self._head.count,
            time=format_time(self._clock()),
            kind=kind,
            fields=fields,
            prev=self._head.sha256,
        )
        if self._size + len(line) > AUDIT_MAX_BYTES:
            # Refuse now rather than write a log the next open rejects.
            msg = f"audit.jsonl would exceed {AUDIT_MAX_BYTES} bytes"
            raise EnvironmentUnavailableError(msg)
        try:
            _write_all(self._fd, line)
            if self._deferred:
                self._dirty = True
            else:
                os.fsync(self._fd)
        except OSError as e:
            self._broken = True
            _raise_os_error(e, "cannot append to audit.jsonl")
        self._size += len(line)
        self._head = AuditHead(record_sha256(line), self._head.count + 1)
        return self._head.sha256


def _check_file_name(name: str) -> None:
    """Refuse anything but one plain path component."""
    if name in {"", ".", ".."} or "/" in name or "\0" in name:
        msg = f"{name!r} is not a plain file name"
        raise PathError(msg)


def _lstat_or_none(dir_fd: int, name: str) -> os.stat_result | None:
    """Stat `name` in `dir_fd` without following links, or None when it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        _raise_os_error(e, f"cannot stat {name}")


def _check_regular_single_link(st: os.stat_result, name: str) -> None:
    """Refuse a non-regular or hardlinked file (contract section 12)."""
    if not stat.S_ISREG(st.st_mode):
        msg = f"{name} is not a regular file"
        raise PathError(msg)
    if st.st_nlink != 1:
        msg = f"{name} has {st.st_nlink} hard links"
        raise PathError(msg)


def _read_and_verify(
    fd: int, name: str, before: os.stat_result | None, signed_head: AuditHead | None
) -> tuple[int, AuditChain]:
    """Check what `fd` is, read it (bounded) and verify its chain."""
    st = os.fstat(fd)
    _check_regular_single_link(st, name)
    if before is not None and (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        msg = f"{name} was replaced while being opened"
        raise PathError(msg)
    if st.st_size > AUDIT_MAX_BYTES:
        # Refused before reading: the engine never writes a log this long.
        msg = f"{name} is {st.st_size} bytes, over the {AUDIT_MAX_BYTES} the engine writes"
        raise TamperedError(msg)
    data = _read_bounded(fd, AUDIT_MAX_BYTES)
    if signed_head is None:
        chain = verify_audit_bytes(data)
    else:
        chain = verify_audit_against_head(data, signed_head.sha256, signed_head.count)
    return len(data), chain


def _read_bounded(fd: int, limit: int) -> bytes:
    """Read `fd` from offset 0 to EOF; refuse past `limit` while reading."""
    chunks: list[bytes] = []
    offset = 0
    while chunk := os.pread(fd, _READ_CHUNK_BYTES, offset):
        offset += len(chunk)
        if offset > limit:
            msg = f"audit.jsonl grew past {limit} bytes while being read"
            raise TamperedError(msg)
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte; os.write may write less than asked."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _raise_os_error(e: OSError, what: str) -> NoReturn:
    """Translate an OSError: a wrong file type is a PathError, the rest environment."""
    reason = os.strerror(e.errno) if e.errno is not None else type(e).__name__
    msg = f"{what}: {reason}"
    if e.errno in _WRONG_TYPE_ERRNOS:
        raise PathError(msg) from e
    raise EnvironmentUnavailableError(msg) from e
