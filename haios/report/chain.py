# SPDX-License-Identifier: Apache-2.0
r"""An independent walk of the audit hash chain, as `docs/audit.md` specifies it.

Written from the documented rules, not from `haios.audit`: each complete
line is the RFC 8785 canonical JSON (checked with the `rfc8785` package) of
exactly `{fields, kind, prev, seq, time}` plus ``\n``; `seq` is the line's
position; `prev` is the SHA-256 of the previous line's bytes including its
newline (64 zeros first); the head is the hash of the last complete line
and the number of complete lines. Bytes after the last newline are a torn
tail, acceptable only when shorter than one record and a prefix of one
(after trailing NULs). The head signed in `state.json` must lie within the
complete records and match the hash at its position.

Unlike the engine's verifier, the walk keeps every record before the first
break, so the report can still show them. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Final

import rfc8785

from haios._util.strict_json import StrictJSONError, parse_strict_json

AUDIT_MAX_BYTES: Final = 64 << 20
RECORD_MAX_BYTES: Final = 64 << 10
GENESIS: Final = "0" * 64
_PREFIX: Final = b'{"fields":'
_KEYS: Final = frozenset({"fields", "kind", "prev", "seq", "time"})
_KIND: Final = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_TIME: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


@dataclasses.dataclass(frozen=True)
class Record:
    """One verified record."""

    seq: int
    time: str
    kind: str
    fields: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ChainWalk:
    """The outcome of a walk.

    Attributes:
        records: every record verified before the first break (all when none).
        hashes: `hashes[n]` is the head after `n` records (`hashes[0]` genesis).
        torn_tail_bytes: bytes after the last newline.
        error: the first break, or None when the whole chain verified.
    """

    records: list[Record]
    hashes: list[str]
    torn_tail_bytes: int
    error: str | None

    @property
    def head_sha256(self) -> str:
        """Hash of the last verified line (genesis for none)."""
        return self.hashes[-1]


def walk_chain(data: bytes) -> ChainWalk:
    """Verify `data` record by record; stop at the first break.

    Args:
        data: the bytes of audit.jsonl.

    Returns:
        The verified records and, when something is wrong, the first error.
    """
    records: list[Record] = []
    hashes = [GENESIS]
    if len(data) > AUDIT_MAX_BYTES:
        return ChainWalk(records, hashes, 0, f"larger than {AUDIT_MAX_BYTES} bytes, "
                         "which the engine never writes")
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    start = 0
    while start < end:
        stop = data.index(b"\n", start) + 1
        line = data[start:stop]
        problem = _check_line(line, len(records), hashes[-1])
        if isinstance(problem, str):
            return ChainWalk(records, hashes, len(tail), f"line {len(records) + 1} {problem}")
        records.append(problem)
        hashes.append(hashlib.sha256(line).hexdigest())
        start = stop
    return ChainWalk(records, hashes, len(tail), _check_tail(tail))


def _check_tail(tail: bytes) -> str | None:
    """Why the bytes after the last newline cannot be a torn append, or None."""
    if not tail:
        return None
    if len(tail) >= RECORD_MAX_BYTES:
        return f"ends in {len(tail)} bytes without a newline, longer than a record"
    written = tail.rstrip(b"\0")
    if written[: len(_PREFIX)] != _PREFIX[: len(written)]:
        return "ends in bytes without a newline that do not start a record"
    return None


def _check_line(line: bytes, seq: int, prev: str) -> Record | str:
    """The record on `line`, or why it breaks the chain."""
    if len(line) > RECORD_MAX_BYTES:
        return "is longer than any record"
    try:
        record = parse_strict_json(line[:-1])
    except StrictJSONError:
        return "is not valid JSON"
    if not isinstance(record, dict) or set(record) != _KEYS:
        return "does not have exactly the five record keys"
    try:
        canonical = rfc8785.dumps(record) + b"\n"
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        return "cannot be canonicalised"
    if canonical != line:
        return "is not in RFC 8785 canonical form"
    if type(record["seq"]) is not int or record["seq"] != seq:
        return f"does not have seq {seq} (a record was removed, inserted or moved)"
    if record["prev"] != prev:
        return f"prev does not match the hash of line {seq} (edited or reordered)"
    kind, time, fields = record["kind"], record["time"], record["fields"]
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        return "has an invalid kind"
    if not isinstance(time, str) or not _TIME.fullmatch(time):
        return "has a time that is not RFC 3339 UTC"
    if not isinstance(fields, dict):
        return "has fields that are not an object"
    return Record(seq, time, kind, fields)


def check_signed_head(walk: ChainWalk, sha256: str, count: int) -> str | None:
    """Why the signed head (`sha256`, `count`) does not pin `walk`, or None.

    The records up to `count` must all have verified and the hash after
    record `count` must equal `sha256`. Verified records after it are
    allowed (they are reported as unsigned).
    """
    if count < 0:
        return "the signed head's count is negative"
    if count >= len(walk.hashes):
        if walk.error is not None:
            return f"the chain breaks inside the signed part: {walk.error}"
        return (f"holds {len(walk.hashes) - 1} complete records but the signed head is "
                f"record {count}: signed records were removed or truncated")
    if walk.hashes[count] != sha256:
        return f"record {count} does not match the signed head (the chain was rewritten)"
    return None
