# SPDX-License-Identifier: Apache-2.0
r"""The hash-chained, append-only audit log `audit.jsonl` (contract section 3).

One line per decision: the RFC 8785 canonical JSON of
`{"fields", "kind", "prev", "seq", "time"}` followed by `"\n"`. `prev` is the
SHA-256 (lowercase hex) of the previous line's exact bytes *including* its
newline, or 64 zeros for the first record. The chain head `(sha256, count)` is
the hash of the last complete line and the number of complete lines; the
engine signs it inside `state.json`, which pins everything up to it.

A crash in the middle of an append can leave a *torn tail*: bytes after the
last newline. Such a tail is a crash artefact when it is short (at most one
record), is a prefix of a record (or only NUL bytes, as some filesystems
leave after power loss), and the signed head lies within the complete
records; it is then cut off, and the cut audited, at the next append.
Anything else is tampering. Records after the signed head verify as a chain
but carry no signature (whoever writes os_root can append well-chained
records); when the engine continues such a log it first records how many it
found, so its next signed head does not vouch for them silently.
`docs/audit.md` gives the full rules.

What this module does not do: decide what to record (the engine publishes
events; `AuditLog.subscriber` records every one), sign the head (the engine
does, in `state.json`), or lock `os_root` against a second writer (the
engine's run lock does).

I/O: `verify_audit_bytes`, `verify_audit_against_head` and `encode_record`
are pure. `AuditLog` opens, reads, appends to and fsyncs the file, relative to
a directory descriptor the caller opened.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import errno
import hashlib
import json
import math
import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn, Self

import rfc8785

from haios.errors import (
    EnvironmentUnavailableError,
    InternalError,
    PathError,
    TamperedError,
)

if TYPE_CHECKING:
    from types import TracebackType

    from haios.events import Event

AUDIT_FILE_NAME: Final = "audit.jsonl"
#: The engine never lets the log grow past this, so a longer file is not its own.
AUDIT_MAX_BYTES: Final = 64 * 1024 * 1024
#: One record, newline included; also the longest torn tail a crash can leave.
AUDIT_RECORD_MAX_BYTES: Final = 64 * 1024
#: Nesting depth of `fields`, as for every JSON input (contract section 12).
AUDIT_FIELDS_MAX_DEPTH: Final = 32
#: `prev` of the first record, and the head of an empty log.
GENESIS_SHA256: Final = "0" * 64
#: The record the engine writes when it cuts a torn tail off.
TORN_TAIL_KIND: Final = "audit.torn_tail"
#: The record the engine writes when it continues past records no signed head covers.
UNSIGNED_RECORDS_KIND: Final = "audit.unsigned_records"

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
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"
_KIND_RE: Final = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS: Final = frozenset({"seq", "time", "kind", "fields", "prev"})
# Canonical JSON sorts keys, and "fields" sorts first: every record starts so.
_RECORD_PREFIX: Final = b'{"fields":'
# Field names that would carry a credential. Defence in depth: publishers
# already put only accessors, never tokens, in events (haios.events).
_SECRET_FIELD_NAMES: Final = frozenset(
    {"token", "secret", "password", "wrap_token", "client_token", "secret_id", "private_key"}
)
_SECRET_FIELD_SUFFIXES: Final = ("_token", "_secret", "_password")
# Errnos meaning "something other than a regular file is at the path".
_WRONG_TYPE_ERRNOS: Final = frozenset({errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR})

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]


@dataclasses.dataclass(frozen=True, slots=True)
class AuditHead:
    """Where a chain ends: what the engine signs in `state.json`.

    Attributes:
        sha256: SHA-256 hex of the last complete line (newline included), or
            `GENESIS_SHA256` for an empty log.
        count: number of complete records; the next record's `seq`.
    """

    sha256: str
    count: int


GENESIS_HEAD: Final = AuditHead(GENESIS_SHA256, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class AuditChain:
    """A verified chain: its head, plus any torn tail after it.

    Attributes:
        head: the head of the complete, verified records.
        torn_tail_bytes: length of the bytes after the last newline (0: none).
            They were checked to look like an interrupted append, nothing more.
    """

    head: AuditHead
    torn_tail_bytes: int

    @property
    def sha256(self) -> str:
        """The head's SHA-256 hex."""
        return self.head.sha256

    @property
    def count(self) -> int:
        """The number of complete records."""
        return self.head.count

    @property
    def torn_tail(self) -> bool:
        """True when an interrupted append left bytes after the last newline."""
        return self.torn_tail_bytes > 0


def record_sha256(line: bytes) -> str:
    """The chain hash of one line.

    Args:
        line: the line's exact bytes, including its terminating newline.

    Returns:
        The lowercase hex SHA-256 the next record carries as `prev`.
    """
    return hashlib.sha256(line).hexdigest()


def format_time(now: dt.datetime) -> str:
    """Format an aware datetime as the record's RFC 3339 UTC `time`.

    Args:
        now: a timezone-aware datetime.

    Returns:
        e.g. `2025-01-31T12:00:00.000000Z` (always microseconds, always `Z`).

    Raises:
        InternalError: `now` is naive (its zone would be a guess).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        msg = "audit time must be timezone-aware"
        raise InternalError(msg)
    return now.astimezone(dt.UTC).strftime(_TIME_FORMAT)


def encode_record(*, seq: int, time: str, kind: str, fields: Mapping[str, Any], prev: str) -> bytes:
    r"""Encode one record as its canonical line. Pure.

    Args:
        seq: the record's 0-based position.
        time: RFC 3339 UTC time, as made by `format_time`.
        kind: the event kind, e.g. `step.started`.
        fields: JSON-compatible values; a finite `Decimal` becomes its string.
        prev: the previous line's `record_sha256`, or `GENESIS_SHA256`.

    Returns:
        The RFC 8785 canonical JSON of the record followed by `b"\n"`.

    Raises:
        InternalError: a bad kind, a field named like a credential, a value
            that is not JSON (NaN, infinity, an unknown type, an integer
            beyond +-2**53), nesting past the limit, or a line over
            `AUDIT_RECORD_MAX_BYTES`. All are publisher bugs.
    """
    if not _KIND_RE.fullmatch(kind):
        msg = f"audit kind {kind!r} is not a lowercase dotted name"
        raise InternalError(msg)
    record: dict[str, JSONValue] = {
        "seq": seq,
        "time": time,
        "kind": kind,
        "fields": _normalise_mapping(fields, kind, depth=1),
        "prev": prev,
    }
    try:
        line = rfc8785.dumps(record) + b"\n"
    except rfc8785.CanonicalizationError as e:
        msg = f"audit record {kind!r}: a field is not canonical JSON ({type(e).__name__})"
        raise InternalError(msg) from e
    if len(line) > AUDIT_RECORD_MAX_BYTES:
        msg = f"audit record {kind!r} is {len(line)} bytes, over {AUDIT_RECORD_MAX_BYTES}"
        raise InternalError(msg)
    return line


def _normalise_mapping(fields: Mapping[Any, Any], kind: str, depth: int) -> dict[str, JSONValue]:
    """Copy `fields` into plain JSON values, refusing credential-like names."""
    result: dict[str, JSONValue] = {}
    for name, value in fields.items():
        if not isinstance(name, str):
            msg = f"audit record {kind!r}: a field name is not a string"
            raise InternalError(msg)
        if _is_secret_name(name):
            # The name only: the value may be the very secret we refuse to write.
            msg = f"audit record {kind!r}: field {name!r} may carry a credential"
            raise InternalError(msg)
        result[name] = _normalise_value(value, kind, depth)
    return result


def _normalise_value(value: object, kind: str, depth: int) -> JSONValue:
    """One JSON value found at nesting `depth` (see `encode_record` for the rules)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | decimal.Decimal):
        return _normalise_number(value, kind)
    if not isinstance(value, Mapping | list | tuple):
        msg = f"audit record {kind!r}: a field of type {type(value).__name__} is not JSON"
        raise InternalError(msg)
    if depth >= AUDIT_FIELDS_MAX_DEPTH:
        msg = f"audit record {kind!r}: fields nest deeper than {AUDIT_FIELDS_MAX_DEPTH}"
        raise InternalError(msg)
    if isinstance(value, Mapping):
        return _normalise_mapping(value, kind, depth + 1)
    return [_normalise_value(item, kind, depth + 1) for item in value]


def _normalise_number(value: float | decimal.Decimal, kind: str) -> JSONValue:
    """Return a finite float as is, and a finite Decimal as its exact text."""
    if isinstance(value, decimal.Decimal):
        if value.is_finite():
            # Money is an exact decimal (contract section 12); a JSON number in
            # RFC 8785 is a binary double, so a Decimal keeps its exact text.
            return str(value)
    elif math.isfinite(value):
        return value
    msg = f"audit record {kind!r}: a number field is NaN or infinite"
    raise InternalError(msg)


def _is_secret_name(name: str) -> bool:
    """True for a field name that would hold a credential (`tokens` is a count)."""
    folded = name.lower().replace("-", "_")
    return folded in _SECRET_FIELD_NAMES or folded.endswith(_SECRET_FIELD_SUFFIXES)


# -- verification (pure) ------------------------------------------------------


def verify_audit_bytes(data: bytes) -> AuditChain:
    """Verify a whole audit log on its own. Pure.

    Every complete line must be a canonical record whose `seq` is its
    position and whose `prev` is the hash of the line before. This detects an
    edited, deleted, reordered or inserted record anywhere except the last
    one: the last record (and records removed from the end) are pinned only
    by the signed head, see `verify_audit_against_head`.

    Args:
        data: the file's bytes.

    Returns:
        The chain's head and the length of its torn tail (0 when none).

    Raises:
        TamperedError: the data is over `AUDIT_MAX_BYTES`, a line (named by its
            1-based number) breaks the chain, or the bytes after the last
            newline cannot be an interrupted append.
    """
    return _walk_chain(data, pin=None)[0]


def verify_audit_against_head(data: bytes, head_sha256: str, count: int) -> AuditChain:
    """Verify a log against the head the engine signed. Pure.

    The chain must verify as in `verify_audit_bytes`, hold at least `count`
    complete records, and its record number `count` must hash to
    `head_sha256` (`count == 0` pins the empty start). Records after the head
    are allowed (appended after the last signed state) and verified like the
    rest. A torn tail after the complete records is a crash artefact here:
    the signed head lies before it.

    Args:
        data: the file's bytes.
        head_sha256: the signed head's SHA-256 hex.
        count: the signed head's record count.

    Returns:
        The verified chain (whose head may lie past the signed one).

    Raises:
        TamperedError: the chain is broken, shorter than the signed head
            (records removed or torn inside the signed part), or rewritten
            (the record at the signed position has another hash).
    """
    if count < 0:
        msg = f"audit.jsonl: the signed head's count {count} is negative"
        raise TamperedError(msg)
    chain, pinned = _walk_chain(data, pin=count)
    if count > chain.count:
        msg = (
            f"audit.jsonl holds {chain.count} complete records but the signed head is "
            f"record {count}: signed records were removed or truncated"
        )
        raise TamperedError(msg)
    if pinned != head_sha256:
        where = f"line {count}" if count else "the empty start"
        msg = f"audit.jsonl {where} does not match the signed head (the chain was rewritten)"
        raise TamperedError(msg)
    return chain


def _walk_chain(data: bytes, pin: int | None) -> tuple[AuditChain, str | None]:
    """Verify every complete line; also return the head after `pin` records."""
    if len(data) > AUDIT_MAX_BYTES:
        msg = f"audit.jsonl is {len(data)} bytes, over the {AUDIT_MAX_BYTES} the engine writes"
        raise TamperedError(msg)
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    _check_torn_tail(tail)
    prev = GENESIS_SHA256
    pinned = prev if pin == 0 else None
    seq = 0
    start = 0
    while start < end:
        stop = data.index(b"\n", start) + 1
        line = data[start:stop]
        _check_record(line, seq=seq, prev=prev)
        prev = record_sha256(line)
        seq += 1
        start = stop
        if seq == pin:
            pinned = prev
    return AuditChain(AuditHead(prev, seq), len(tail)), pinned


def _check_torn_tail(tail: bytes) -> None:
    """Refuse bytes after the last newline that no interrupted append leaves."""
    if len(tail) >= AUDIT_RECORD_MAX_BYTES:
        msg = f"audit.jsonl ends in {len(tail)} bytes without a newline: longer than a record"
        raise TamperedError(msg)
    # A torn append is a prefix of one record; NULs may follow where a
    # filesystem extended the file before the data reached the disk.
    written = tail.rstrip(b"\0")
    if written[: len(_RECORD_PREFIX)] != _RECORD_PREFIX[: len(written)]:
        msg = "audit.jsonl ends in bytes without a newline that do not start a record"
        raise TamperedError(msg)


def _check_record(line: bytes, *, seq: int, prev: str) -> None:
    """Check one complete line (newline included) as record number `seq`."""
    number = seq + 1
    if len(line) > AUDIT_RECORD_MAX_BYTES:
        _tampered(number, f"is {len(line)} bytes, longer than any record")
    record = _parse_canonical(line, number)
    if set(record) != _RECORD_KEYS:
        _tampered(number, f"does not have exactly the keys {sorted(_RECORD_KEYS)}")
    if type(record["seq"]) is not int or record["seq"] != seq:
        _tampered(number, f"does not have seq {seq} (removed, inserted or reordered)")
    if record["prev"] != prev:
        _tampered(number, f"prev does not match the hash of line {seq} (edited or reordered)")
    if not isinstance(record["kind"], str) or not _KIND_RE.fullmatch(record["kind"]):
        _tampered(number, "has an invalid kind")
    if not isinstance(record["fields"], dict):
        _tampered(number, "has fields that are not an object")
    if not isinstance(record["time"], str) or not _is_record_time(record["time"]):
        _tampered(number, "has a time that is not RFC 3339 UTC")


def _parse_canonical(line: bytes, number: int) -> dict[str, Any]:
    """Parse a line strictly and require it to be its own canonical form."""
    try:
        record = json.loads(
            line.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
        canonical = rfc8785.dumps(record) + b"\n"
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError covers JSONDecodeError and rfc8785's errors.
        _tampered(number, "is not valid JSON")
    # Canonical bytes make the hash a function of the content alone: any
    # edit, even whitespace or key order, is visible here or at the next prev.
    if canonical != line:
        _tampered(number, "is not in canonical form")
    if not isinstance(record, dict):
        _tampered(number, "is not a JSON object")
    return record


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse duplicate keys, which the stdlib json accepts (a parse hook)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        msg = "duplicate key"
        raise ValueError(msg)
    return result


def _reject_constant(name: str) -> NoReturn:
    """Refuse NaN and Infinity, which the stdlib json accepts (a parse hook)."""
    msg = f"{name} is not JSON"
    raise ValueError(msg)


def _is_record_time(text: str) -> bool:
    """True when `text` is exactly the format `format_time` writes."""
    try:
        dt.datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return False
    return True


def _tampered(number: int, what: str) -> NoReturn:
    """Raise the TamperedError for line `number` (1-based)."""
    msg = f"audit.jsonl line {number} {what}"
    raise TamperedError(msg)


# -- the writer (I/O) ------------------------------------------------------------


def _utc_now() -> dt.datetime:
    """The wall clock, in UTC."""
    return dt.datetime.now(dt.UTC)


class AuditLog:
    """The engine's writer of `audit.jsonl`. Thread-safe.

    Build with `AuditLog.open`. Each `append` is durable (fsync) before it
    returns, so a record exists before the action it records takes effect.
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
        self._closed = False
        self._broken = False

    @classmethod
    def open(
        cls,
        dir_fd: int,
        name: str = AUDIT_FILE_NAME,
        *,
        signed_head: AuditHead | None = None,
        clock: Callable[[], dt.datetime] = _utc_now,
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
        self.append(event.kind, event.fields)

    def close(self) -> None:
        """Close the file; later appends raise.

        Side Effects:
            Closes the descriptor (once).
        """
        with self._lock:
            if not self._closed:
                self._closed = True
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
