# SPDX-License-Identifier: Apache-2.0
"""Tampering with `audit.jsonl` (attack catalog 36, 110; contract sections 3 and 12).

Attacker: whoever can write `os_root` (a client, a functionary, a confused
operator) edits, deletes, reorders, inserts or truncates audit records, or
plants a symlink, FIFO, directory or hardlink at `audit.jsonl`.

Expected refusal: `TamperedError` (exit 3) naming the line where the chain
breaks, from `verify_audit_bytes` for a break inside the chain and from
`verify_audit_against_head` for anything at or before the signed head; a
torn last line left by a crash is not tampering while the signed head lies
before it. A planted non-regular or hardlinked file is a `PathError` (exit 3)
and nothing is written through it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
from typing import TYPE_CHECKING

import pytest
import rfc8785
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haios.audit import (
    AUDIT_FILE_NAME,
    AUDIT_MAX_BYTES,
    AUDIT_RECORD_MAX_BYTES,
    AuditHead,
    AuditLog,
    encode_record,
    format_time,
    record_sha256,
    verify_audit_against_head,
    verify_audit_bytes,
)
from haios.errors import PathError, TamperedError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

START = dt.datetime(2025, 1, 31, 12, 0, 0, tzinfo=dt.UTC)


def build_chain(fields: list[dict[str, object]]) -> tuple[bytes, AuditHead]:
    """A valid log holding one record per entry of `fields`, and its head."""
    lines: list[bytes] = []
    prev = "0" * 64
    for seq, entry in enumerate(fields):
        line = encode_record(
            seq=seq,
            time=format_time(START + dt.timedelta(seconds=seq)),
            kind="step.finished",
            fields=entry,
            prev=prev,
        )
        lines.append(line)
        prev = record_sha256(line)
    return b"".join(lines), AuditHead(prev, len(lines))


def split(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


CHAIN, HEAD = build_chain([{"step_id": f"s{n}", "status": "succeeded"} for n in range(5)])
LINES = split(CHAIN)


def reencode(line: bytes, **changes: object) -> bytes:
    """The line with some keys changed, still canonical (a careful forger)."""
    record = json.loads(line)
    record.update(changes)
    return rfc8785.dumps(record) + b"\n"


# -- detected by verify_audit_bytes alone -------------------------------------------

CHAIN_BREAKS = {
    # an edit that breaks the JSON is named on the edited line itself
    "edit_one_byte_breaking_json": (
        b"".join([*LINES[:2], LINES[2].replace(b"{", b"[", 1), *LINES[3:]]),
        "line 3 is not valid JSON",
    ),
    # a canonical edit is seen by the next line, whose prev no longer matches
    "edit_one_byte_keeping_json": (
        b"".join([*LINES[:2], LINES[2].replace(b'"s2"', b'"s9"'), *LINES[3:]]),
        "line 4 prev does not match the hash of line 3",
    ),
    "edit_whitespace_only": (
        b"".join([*LINES[:1], LINES[1].replace(b",", b", ", 1), *LINES[2:]]),
        "line 2 is not in canonical form",
    ),
    "delete_middle_line": (
        b"".join([*LINES[:2], *LINES[3:]]),
        "line 3 does not have seq 2",
    ),
    "swap_two_lines": (
        b"".join([LINES[0], LINES[2], LINES[1], *LINES[3:]]),
        "line 2 does not have seq 1",
    ),
    "change_a_prev_hash": (
        b"".join([*LINES[:3], reencode(LINES[3], prev="ab" * 32), *LINES[4:]]),
        "line 4 prev does not match the hash of line 3",
    ),
    "insert_forged_record_in_the_middle": (
        b"".join(
            [
                *LINES[:2],
                reencode(LINES[1], seq=2, prev=record_sha256(LINES[1])),
                *LINES[2:],
            ]
        ),
        "line 4 does not have seq 3",
    ),
    "duplicate_a_record": (
        b"".join([*LINES[:3], LINES[2], *LINES[3:]]),
        "line 4 does not have seq 3",
    ),
    "first_record_not_at_genesis": (
        b"".join([reencode(LINES[0], prev="11" * 32), *LINES[1:]]),
        "line 1 prev does not match",
    ),
    "empty_line": (
        b"".join([*LINES[:2], b"\n", *LINES[2:]]),
        "line 3 is not valid JSON",
    ),
    "duplicate_key": (
        LINES[0].replace(b'{"fields":', b'{"fields":{},"fields":', 1) + b"".join(LINES[1:]),
        "line 1 is not valid JSON",
    ),
    "extra_key": (
        b"".join([reencode(LINES[0], extra=1), *LINES[1:]]),
        "line 1 does not have exactly the keys",
    ),
    "bool_seq": (
        b"".join([reencode(LINES[0], seq=False), *LINES[1:]]),
        "line 1 does not have seq 0",
    ),
    "bad_time": (
        b"".join([reencode(LINES[0], time="yesterday"), *LINES[1:]]),
        "line 1 has a time that is not RFC 3339 UTC",
    ),
    "bad_kind": (
        b"".join([reencode(LINES[0], kind="Step Finished"), *LINES[1:]]),
        "line 1 has an invalid kind",
    ),
    "fields_not_an_object": (
        b"".join([reencode(LINES[0], fields=[1]), *LINES[1:]]),
        "line 1 has fields that are not an object",
    ),
    "not_utf8": (
        b"".join([*LINES[:1], LINES[1].replace(b"s1", b"s\xff"), *LINES[2:]]),
        "line 2 is not valid JSON",
    ),
    "nan": (
        b'{"fields":{"x":NaN}}\n',
        "line 1 is not valid JSON",
    ),
    "array_line": (
        b"[]\n",
        "line 1 is not a JSON object",
    ),
    "over_long_line": (
        b'{"fields":{"x":"' + b"a" * AUDIT_RECORD_MAX_BYTES + b'"}}\n',
        "line 1 is .* longer than any record",
    ),
    "deep_nesting": (
        b"[" * 100_000 + b"]" * 100_000 + b"\n",
        "line 1 is .* longer than any record",
    ),
    "tail_not_a_record_start": (
        CHAIN + b"garbage",
        "do not start a record",
    ),
    "tail_longer_than_a_record": (
        CHAIN + b'{"fields":' + b"a" * AUDIT_RECORD_MAX_BYTES,
        "longer than a record",
    ),
}


@pytest.mark.parametrize(("data", "message"), CHAIN_BREAKS.values(), ids=CHAIN_BREAKS.keys())
def test_chain_break_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(TamperedError, match=message):
        verify_audit_bytes(data)
    with pytest.raises(TamperedError, match=message):
        verify_audit_against_head(data, HEAD.sha256, HEAD.count)


def test_a_log_over_the_cap_is_refused_unparsed() -> None:
    with pytest.raises(TamperedError, match="over the"):
        verify_audit_bytes(b"\n" * (AUDIT_MAX_BYTES + 1))


# -- the end of the chain: pinned by the signed head --------------------------------

END_TAMPERING = {
    "edit_last_record": b"".join([*LINES[:-1], LINES[-1].replace(b'"s4"', b'"s9"')]),
    "delete_last_record": b"".join(LINES[:-1]),
    "delete_every_record": b"",
    "truncate_last_line": CHAIN[:-20],
    "truncate_only_the_newline": CHAIN[:-1],
    "rewrite_whole_chain": build_chain([{"step_id": "forged"}] * 5)[0],
    "swap_last_two": b"".join([*LINES[:-2], LINES[-1], LINES[-2]]),
}


@pytest.mark.parametrize("data", END_TAMPERING.values(), ids=END_TAMPERING.keys())
def test_tampering_at_the_signed_head_is_refused(data: bytes) -> None:
    with pytest.raises(TamperedError):
        verify_audit_against_head(data, HEAD.sha256, HEAD.count)


def test_edit_of_the_last_record_passes_the_unpinned_check_as_documented() -> None:
    # Nothing after the last record vouches for it: only the signed head can.
    edited = b"".join([*LINES[:-1], LINES[-1].replace(b'"s4"', b'"s9"')])
    assert verify_audit_bytes(edited).count == HEAD.count


def test_removed_signed_records_are_named() -> None:
    with pytest.raises(TamperedError, match="holds 4 complete records but the signed head is"):
        verify_audit_against_head(b"".join(LINES[:-1]), HEAD.sha256, HEAD.count)


def test_negative_signed_count_is_refused() -> None:
    with pytest.raises(TamperedError, match="negative"):
        verify_audit_against_head(CHAIN, HEAD.sha256, -1)


# -- what is allowed, as documented -------------------------------------------------


def test_torn_tail_after_the_signed_head_is_a_crash_artefact() -> None:
    torn = CHAIN + LINES[0][:25]
    chain = verify_audit_bytes(torn)
    assert (chain.head, chain.torn_tail, chain.torn_tail_bytes) == (HEAD, True, 25)
    assert verify_audit_against_head(torn, HEAD.sha256, HEAD.count).head == HEAD


def test_torn_tail_shorter_than_the_record_prefix_is_a_crash_artefact() -> None:
    assert verify_audit_bytes(CHAIN + b'{"fi').torn_tail_bytes == 4


def test_nul_filled_tail_is_a_crash_artefact() -> None:
    # Some filesystems extend the file before the data lands after power loss.
    assert verify_audit_bytes(CHAIN + b'{"fields":{"st' + b"\0" * 30).torn_tail
    assert verify_audit_bytes(CHAIN + b"\0" * 100).torn_tail


def test_torn_tail_inside_the_signed_part_is_tampering() -> None:
    torn = CHAIN[:-30]
    assert verify_audit_bytes(torn).torn_tail
    with pytest.raises(TamperedError, match="signed records were removed or truncated"):
        verify_audit_against_head(torn, HEAD.sha256, HEAD.count)


def test_records_after_the_signed_head_must_chain() -> None:
    signed_data, signed = build_chain([{"n": 1}, {"n": 2}])
    longer, _ = build_chain([{"n": 1}, {"n": 2}, {"n": 3}])
    assert verify_audit_against_head(longer, signed.sha256, signed.count).count == 3
    broken = b"".join([*split(longer)[:2], reencode(split(longer)[2], prev="cd" * 32)])
    with pytest.raises(TamperedError, match="line 3"):
        verify_audit_against_head(broken, signed.sha256, signed.count)
    assert verify_audit_against_head(signed_data, signed.sha256, signed.count).count == 2


def test_empty_log_against_the_genesis_head() -> None:
    assert verify_audit_against_head(b"", "0" * 64, 0).count == 0
    with pytest.raises(TamperedError, match="empty start"):
        verify_audit_against_head(CHAIN, "ab" * 32, 0)


# -- properties: any single change is detected against the signed head --------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text()
# Keys from an alphabet that cannot spell a credential name (those are refused).
json_keys = st.text(alphabet="abcdefghij_", max_size=8)
json_fields = st.dictionaries(
    json_keys,
    st.recursive(
        json_scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_keys, inner, max_size=3),
        max_leaves=8,
    ),
    max_size=4,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=st.lists(json_fields, min_size=1, max_size=6),
    data=st.data(),
)
def test_any_single_line_mutation_is_detected(
    fields: list[dict[str, object]], data: st.DataObject
) -> None:
    chain, head = build_chain(fields)
    lines = split(chain)
    assert verify_audit_against_head(chain, head.sha256, head.count).head == head
    index = data.draw(st.integers(0, len(lines) - 1), label="line")
    mutation = data.draw(st.sampled_from(["replace", "delete", "duplicate", "swap"]))
    mutated = list(lines)
    if mutation == "replace":
        new = data.draw(st.binary(max_size=200).filter(lambda b: b"\n" not in b)) + b"\n"
        if new == lines[index]:
            return
        mutated[index] = new
    elif mutation == "delete":
        del mutated[index]
    elif mutation == "duplicate":
        mutated.insert(index, lines[index])
    else:
        other = data.draw(st.integers(0, len(lines) - 1), label="other")
        if lines[other] == lines[index]:
            return
        mutated[index], mutated[other] = mutated[other], mutated[index]
    with pytest.raises(TamperedError):
        verify_audit_against_head(b"".join(mutated), head.sha256, head.count)


@settings(max_examples=300)
@given(position=st.integers(0, len(CHAIN) - 1), value=st.integers(0, 255))
def test_any_single_byte_change_is_detected(position: int, value: int) -> None:
    if CHAIN[position] == value:
        return
    mutated = CHAIN[:position] + bytes([value]) + CHAIN[position + 1 :]
    with pytest.raises(TamperedError):
        verify_audit_against_head(mutated, HEAD.sha256, HEAD.count)


# -- planted files at audit.jsonl (contract section 12) -------------------------------


def clock() -> Callable[[], dt.datetime]:
    ticks = itertools.count()
    return lambda: START + dt.timedelta(seconds=next(ticks))


@pytest.fixture
def dir_fd(tmp_path: Path) -> Iterator[int]:
    root = tmp_path / "os_root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def test_symlink_at_audit_path_is_refused_and_not_written_through(
    dir_fd: int, tmp_path: Path
) -> None:
    target = tmp_path / "outside.txt"
    target.write_bytes(b"precious")
    (tmp_path / "os_root" / AUDIT_FILE_NAME).symlink_to(target)
    with pytest.raises(PathError, match="not a regular file"):
        AuditLog.open(dir_fd, clock=clock())
    assert target.read_bytes() == b"precious"


def test_dangling_symlink_at_audit_path_is_refused_and_nothing_created(
    dir_fd: int, tmp_path: Path
) -> None:
    target = tmp_path / "created-through-link"
    (tmp_path / "os_root" / AUDIT_FILE_NAME).symlink_to(target)
    with pytest.raises(PathError):
        AuditLog.open(dir_fd, clock=clock())
    assert not target.exists()


def test_fifo_at_audit_path_is_refused_without_blocking(dir_fd: int, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "os_root" / AUDIT_FILE_NAME)
    with pytest.raises(PathError, match="not a regular file"):
        AuditLog.open(dir_fd, clock=clock())


def test_directory_at_audit_path_is_refused(dir_fd: int, tmp_path: Path) -> None:
    (tmp_path / "os_root" / AUDIT_FILE_NAME).mkdir()
    with pytest.raises(PathError, match="not a regular file"):
        AuditLog.open(dir_fd, clock=clock())


def test_hardlinked_audit_file_is_refused(dir_fd: int, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b"")
    os.link(outside, tmp_path / "os_root" / AUDIT_FILE_NAME)
    with pytest.raises(PathError, match="2 hard links"):
        AuditLog.open(dir_fd, clock=clock())
    assert outside.read_bytes() == b""


def test_oversized_audit_file_is_refused_unread(dir_fd: int, tmp_path: Path) -> None:
    path = tmp_path / "os_root" / AUDIT_FILE_NAME
    with path.open("wb") as f:
        f.truncate(AUDIT_MAX_BYTES + 1)
    with pytest.raises(TamperedError, match="over the"):
        AuditLog.open(dir_fd, clock=clock())


def test_tampered_file_is_refused_on_open(dir_fd: int, tmp_path: Path) -> None:
    (tmp_path / "os_root" / AUDIT_FILE_NAME).write_bytes(b"".join([LINES[0], LINES[2]]))
    with pytest.raises(TamperedError, match="line 2"):
        AuditLog.open(dir_fd, clock=clock())
