# SPDX-License-Identifier: Apache-2.0
"""The audit chain, pure: record encoding and chain verification (no I/O).

The rules are in the package docstring (haios/audit/__init__.py) and in
docs/audit.md. The writer that appends and fsyncs is `haios/audit/log.py`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn

import rfc8785

from haios.errors import (
    InternalError,
    TamperedError,
)

if TYPE_CHECKING:

    pass

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
