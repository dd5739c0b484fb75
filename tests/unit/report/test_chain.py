# SPDX-License-Identifier: Apache-2.0
"""The report's own audit-chain walk, against logs the engine's encoder writes."""

from __future__ import annotations

import hashlib

import pytest

from haios.audit import GENESIS_SHA256, encode_record, record_sha256
from haios.report.chain import GENESIS, check_signed_head, walk_chain

TIME = "2026-01-31T12:00:00.000000Z"


def log(count: int) -> bytes:
    lines, prev = [], GENESIS_SHA256
    for seq in range(count):
        line = encode_record(seq=seq, time=TIME, kind="step.started",
                             fields={"step_id": f"s{seq}", "attempt": 1}, prev=prev)
        lines.append(line)
        prev = record_sha256(line)
    return b"".join(lines)


def test_engine_written_log_verifies_and_heads_agree() -> None:
    data = log(5)
    walk = walk_chain(data)
    assert walk.error is None and len(walk.records) == 5
    assert walk.head_sha256 == hashlib.sha256(data.splitlines(keepends=True)[-1]).hexdigest()
    assert check_signed_head(walk, walk.head_sha256, 5) is None
    assert check_signed_head(walk, walk.hashes[3], 3) is None  # records after it: unsigned


def test_empty_log_is_the_genesis_head() -> None:
    walk = walk_chain(b"")
    assert walk.error is None and walk.head_sha256 == GENESIS
    assert check_signed_head(walk, GENESIS, 0) is None


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


EDITS = {
    "value_changed_canonically": (lambda ls: [*ls[:2], ls[2].replace(b'"s2"', b'"s9"'), *ls[3:]],
                                  "line 4 prev"),
    "line_not_canonical": (lambda ls: [*ls[:2], ls[2].replace(b"{", b"{ ", 1), *ls[3:]],
                           "line 3 is not in RFC 8785"),
    "line_deleted": (lambda ls: [*ls[:2], *ls[3:]], "line 3 does not have seq 2"),
    "lines_swapped": (lambda ls: [ls[1], ls[0], *ls[2:]], "line 1 does not have seq 0"),
    "not_json": (lambda ls: [*ls[:1], b"garbage\n", *ls[2:]], "line 2 is not valid JSON"),
    "duplicate_key": (lambda ls: [*ls[:1], ls[1].replace(b'{"fields"', b'{"seq":1,"fields"'),
                                  *ls[2:]], "line 2 is not valid JSON"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_chain_breaks_at_the_right_line(edit: str) -> None:
    change, expected = EDITS[edit]
    walk = walk_chain(b"".join(change(_lines(log(5)))))
    assert walk.error is not None and walk.error.startswith(expected), walk.error


def test_removed_last_records_are_caught_by_the_signed_head() -> None:
    data = log(5)
    head = walk_chain(data).head_sha256
    shorter = walk_chain(b"".join(_lines(data)[:4]))
    assert shorter.error is None  # alone, the chain cannot tell
    assert "removed or truncated" in (check_signed_head(shorter, head, 5) or "")


def test_rewritten_last_record_is_caught_by_the_signed_head() -> None:
    lines = _lines(log(5))
    record = encode_record(seq=4, time=TIME, kind="step.started", fields={"step_id": "evil"},
                           prev=record_sha256(lines[3]))
    signed = walk_chain(b"".join(lines)).head_sha256
    walk = walk_chain(b"".join([*lines[:4], record]))
    assert "rewritten" in (check_signed_head(walk, signed, 5) or "")


@pytest.mark.parametrize(("tail", "ok"), [(b'{"fiel', True), (b"\0\0\0", True),
                                          (b'{"fields":{"a', True), (b"evil", False),
                                          (b"x" * 70_000, False)])
def test_torn_tail_is_a_crash_artefact_only_when_it_could_be_one(tail: bytes, ok: bool) -> None:
    walk = walk_chain(log(3) + tail)
    assert (walk.error is None) is ok
    assert walk.torn_tail_bytes == len(tail)


def test_oversize_log_is_refused_unread() -> None:
    assert "larger than" in (walk_chain(b" " * ((64 << 20) + 1)).error or "")
