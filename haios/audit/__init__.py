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

What this package does not do: decide what to record (the engine publishes
events; `AuditLog.subscriber` records every one), sign the head (the engine
does, in `state.json`), or lock `os_root` against a second writer (the
engine's run lock does).

- `chain`: pure: `encode_record`, `verify_audit_bytes`,
  `verify_audit_against_head` (also what the offline report uses);
- `log`: `AuditLog` opens, reads, appends to and fsyncs the file, relative
  to a directory descriptor the caller opened.
"""

from haios.audit.chain import (
    AUDIT_FIELDS_MAX_DEPTH,
    AUDIT_FILE_NAME,
    AUDIT_MAX_BYTES,
    AUDIT_RECORD_MAX_BYTES,
    GENESIS_HEAD,
    GENESIS_SHA256,
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
from haios.audit.log import AuditLog

__all__ = [
    "AUDIT_FIELDS_MAX_DEPTH",
    "AUDIT_FILE_NAME",
    "AUDIT_MAX_BYTES",
    "AUDIT_RECORD_MAX_BYTES",
    "GENESIS_HEAD",
    "GENESIS_SHA256",
    "TORN_TAIL_KIND",
    "UNSIGNED_RECORDS_KIND",
    "AuditChain",
    "AuditHead",
    "AuditLog",
    "encode_record",
    "format_time",
    "record_sha256",
    "verify_audit_against_head",
    "verify_audit_bytes",
]
