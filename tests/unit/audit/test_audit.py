# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.audit: record format, appends, durability, concurrency."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import errno
import hashlib
import itertools
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from haios.audit import (
    AUDIT_FILE_NAME,
    GENESIS_HEAD,
    GENESIS_SHA256,
    TORN_TAIL_KIND,
    UNSIGNED_RECORDS_KIND,
    AuditHead,
    AuditLog,
    encode_record,
    format_time,
    record_sha256,
    verify_audit_against_head,
    verify_audit_bytes,
)
from haios.audit import chain as audit
from haios.audit import log as audit_log
from haios.errors import EnvironmentUnavailableError, InternalError, PathError, TamperedError
from haios.events import Event, EventBus, StepStarted, VaultTokenIssued

START = dt.datetime(2025, 1, 31, 12, 0, 0, tzinfo=dt.UTC)


def fake_clock() -> Callable[[], dt.datetime]:
    """A clock that ticks one millisecond per read."""
    ticks = itertools.count()
    return lambda: START + dt.timedelta(milliseconds=next(ticks))


@pytest.fixture
def dir_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def log(dir_fd: int) -> Iterator[AuditLog]:
    with AuditLog.open(dir_fd, clock=fake_clock()) as opened:
        yield opened


def lines_of(tmp_path: Path) -> list[bytes]:
    return (tmp_path / AUDIT_FILE_NAME).read_bytes().splitlines(keepends=True)


def records_of(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(tmp_path)]


# -- record format ----------------------------------------------------------------


def test_first_record_known_answer() -> None:
    line = encode_record(
        seq=0,
        time=format_time(START),
        kind="step.started",
        fields={"step_id": "s1", "attempt": 1, "profile": "default"},
        prev=GENESIS_SHA256,
    )
    assert line == (
        b'{"fields":{"attempt":1,"profile":"default","step_id":"s1"},"kind":"step.started",'
        b'"prev":"' + b"0" * 64 + b'","seq":0,"time":"2025-01-31T12:00:00.000000Z"}\n'
    )
    assert record_sha256(line) == hashlib.sha256(line).hexdigest()


def test_time_is_rfc3339_utc_with_z() -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert format_time(dt.datetime(2025, 1, 31, 14, 0, tzinfo=plus_two)) == (
        "2025-01-31T12:00:00.000000Z"
    )


def test_naive_time_is_refused() -> None:
    with pytest.raises(InternalError, match="timezone-aware"):
        format_time(dt.datetime.fromisoformat("2025-01-31T00:00:00"))


def test_decimal_is_recorded_as_its_exact_text() -> None:
    line = encode_record(
        seq=0, time="t", kind="cost.recorded", fields={"usd": decimal.Decimal("0.10")}, prev="p"
    )
    assert b'"usd":"0.10"' in line


@pytest.mark.parametrize(
    "name",
    ["token", "secret", "password", "wrap_token", "Client-Token", "vault_token", "secret_id"],
)
def test_credential_field_names_are_refused(name: str) -> None:
    planted = "hvs.CAESIJ-not-a-real-credential"
    with pytest.raises(InternalError, match="may carry a credential") as raised:
        encode_record(seq=0, time="t", kind="x", fields={name: planted}, prev="p")
    assert planted not in str(raised.value)


def test_nested_credential_field_names_are_refused() -> None:
    with pytest.raises(InternalError, match="may carry a credential"):
        encode_record(seq=0, time="t", kind="x", fields={"auth": [{"client_token": "x"}]}, prev="p")


def test_tokens_count_and_accessor_are_allowed() -> None:
    line = encode_record(
        seq=0, time="t", kind="x", fields={"tokens": 12, "accessor": "acc"}, prev="p"
    )
    assert b'"tokens":12' in line


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        decimal.Decimal("NaN"),
        decimal.Decimal("Infinity"),
        b"bytes",
        {1, 2},
        Path("/etc/passwd"),
        object(),
        2**53 + 1,
        {1: "non-string key"},
    ],
    ids=lambda v: type(v).__name__ + ":" + repr(v)[:20],
)
def test_non_json_values_are_refused(value: object) -> None:
    with pytest.raises(InternalError):
        encode_record(seq=0, time="t", kind="x", fields={"v": value}, prev="p")


def test_nesting_past_the_limit_is_refused() -> None:
    deep: Any = "leaf"
    for _ in range(audit.AUDIT_FIELDS_MAX_DEPTH):
        deep = [deep]
    with pytest.raises(InternalError, match="nest deeper"):
        encode_record(seq=0, time="t", kind="x", fields={"v": deep}, prev="p")


def test_nesting_at_the_limit_is_accepted() -> None:
    deep: Any = "leaf"
    for _ in range(audit.AUDIT_FIELDS_MAX_DEPTH - 1):
        deep = {"d": deep}
    encode_record(seq=0, time="t", kind="x", fields={"v": deep}, prev="p")


def test_record_over_the_size_cap_is_refused() -> None:
    with pytest.raises(InternalError, match="bytes, over"):
        encode_record(
            seq=0, time="t", kind="x", fields={"m": "a" * audit.AUDIT_RECORD_MAX_BYTES}, prev="p"
        )


@pytest.mark.parametrize("kind", ["", "Step", "a b", "x\n", "../x", "a" * 65])
def test_bad_kinds_are_refused(kind: str) -> None:
    with pytest.raises(InternalError, match="kind"):
        encode_record(seq=0, time="t", kind=kind, fields={}, prev="p")


def test_control_characters_are_escaped_on_one_line() -> None:
    line = encode_record(
        seq=0, time="t", kind="rejection", fields={"message": "a\nb\r\x1b[31m"}, prev="p"
    )
    assert line.count(b"\n") == 1
    assert b"\x1b" not in line
    assert b"\\u001b" in line


# -- appending ----------------------------------------------------------------------


def test_new_log_starts_at_genesis(log: AuditLog, tmp_path: Path) -> None:
    assert log.head == GENESIS_HEAD
    assert (tmp_path / AUDIT_FILE_NAME).read_bytes() == b""


def test_created_file_is_private(log: AuditLog, tmp_path: Path) -> None:
    assert stat.S_IMODE((tmp_path / AUDIT_FILE_NAME).stat().st_mode) == 0o600
    assert log.head.count == 0


def test_append_round_trip(log: AuditLog, tmp_path: Path) -> None:
    heads = [log.append("step.started", {"step_id": f"s{n}", "attempt": 1}) for n in range(5)]
    lines = lines_of(tmp_path)
    records = records_of(tmp_path)
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS_SHA256
    for before, record in zip(lines, records[1:], strict=False):
        assert record["prev"] == hashlib.sha256(before).hexdigest()
    assert heads == [hashlib.sha256(line).hexdigest() for line in lines]
    assert log.head == AuditHead(heads[-1], 5)
    chain = verify_audit_bytes((tmp_path / AUDIT_FILE_NAME).read_bytes())
    assert chain.head == log.head
    assert not chain.torn_tail


def test_reopen_continues_the_chain(dir_fd: int, tmp_path: Path) -> None:
    with AuditLog.open(dir_fd, clock=fake_clock()) as first:
        first.append("run.started", {"plan_id": "p"})
        head = first.head
    with AuditLog.open(dir_fd, signed_head=head, clock=fake_clock()) as second:
        assert second.head == head
        second.append("run.finished", {"status": "succeeded"})
    records = records_of(tmp_path)
    assert [r["kind"] for r in records] == ["run.started", "run.finished"]
    assert records[1]["prev"] == head.sha256
    assert verify_audit_bytes((tmp_path / AUDIT_FILE_NAME).read_bytes()).count == 2


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _FutureKind(Event):
    KIND: ClassVar[str] = "some.future_kind"
    note: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _CarriesAToken(Event):
    """A publisher bug the audit log must refuse: a credential-named field."""

    KIND: ClassVar[str] = "vault.token_issued"
    step_id: str
    token: str


def test_subscriber_records_every_event(log: AuditLog, tmp_path: Path) -> None:
    bus = EventBus()
    bus.subscribe(log.subscriber)
    bus.publish(StepStarted(step_id="s1", profile="default", attempt=1))
    bus.publish(VaultTokenIssued(step_id="s1", accessor="acc-1", ttl_seconds=60))
    bus.publish(_FutureKind(note="kept"))
    records = records_of(tmp_path)
    assert [(r["kind"], r["fields"]) for r in records] == [
        ("step.started", {"attempt": 1, "profile": "default", "step_id": "s1"}),
        ("vault.token_issued", {"accessor": "acc-1", "step_id": "s1", "ttl_seconds": 60}),
        ("some.future_kind", {"note": "kept"}),
    ]


def test_subscriber_refusal_stops_the_publisher(log: AuditLog) -> None:
    bus = EventBus()
    bus.subscribe(log.subscriber)
    with pytest.raises(InternalError):
        bus.publish(_CarriesAToken(step_id="s1", token="hvs.x"))
    assert log.head.count == 0


def test_append_is_fsynced_before_it_returns(
    log: AuditLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / AUDIT_FILE_NAME
    synced: list[bytes] = []
    real_fsync = os.fsync

    def spying_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(path.read_bytes())

    monkeypatch.setattr(os, "fsync", spying_fsync)
    log.append("step.started", {"step_id": "s1"})
    # fsync ran once the record was written, and before append returned.
    assert len(synced) == 1
    assert synced[0].endswith(b'"seq":0,"time":"2025-01-31T12:00:00.000000Z"}\n')


def test_appended_data_is_visible_to_a_fresh_reader(log: AuditLog, tmp_path: Path) -> None:
    head = log.append("step.started", {"step_id": "s1"})
    fd = os.open(tmp_path / AUDIT_FILE_NAME, os.O_RDONLY)
    try:
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    assert verify_audit_against_head(data, head, 1).count == 1


def test_concurrent_appends_form_one_chain(log: AuditLog, tmp_path: Path) -> None:
    threads, per_thread = 8, 40

    def worker(n: int) -> None:
        for i in range(per_thread):
            log.append("step.started", {"thread": n, "i": i})

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    data = (tmp_path / AUDIT_FILE_NAME).read_bytes()
    chain = verify_audit_bytes(data)
    assert chain.head == log.head
    assert chain.count == threads * per_thread
    by_thread: dict[int, list[int]] = {}
    for record in records_of(tmp_path):
        by_thread.setdefault(record["fields"]["thread"], []).append(record["fields"]["i"])
    assert by_thread == {n: list(range(per_thread)) for n in range(threads)}


def test_closed_log_refuses_appends(dir_fd: int) -> None:
    log = AuditLog.open(dir_fd, clock=fake_clock())
    log.close()
    log.close()
    with pytest.raises(InternalError, match="closed"):
        log.append("x", {})


def test_write_failure_refuses_every_later_append(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    log.append("run.started", {})

    def full_disk(_fd: int, _data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(EnvironmentUnavailableError, match="No space"):
        log.append("step.started", {})
    monkeypatch.undo()
    with pytest.raises(EnvironmentUnavailableError, match="earlier write failed"):
        log.append("step.started", {})
    assert log.head.count == 1


def test_fsync_failure_refuses_every_later_append(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(_fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(EnvironmentUnavailableError):
        log.append("step.started", {})
    monkeypatch.undo()
    # Retrying after a failed fsync could report success for lost data.
    with pytest.raises(EnvironmentUnavailableError):
        log.append("step.started", {})


def test_append_refuses_to_grow_past_the_cap(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log, "AUDIT_MAX_BYTES", 400)
    log.append("a", {})

    def fill() -> None:
        for _ in range(10):
            log.append("a", {"pad": "x" * 50})

    with pytest.raises(EnvironmentUnavailableError, match="would exceed"):
        fill()
    # The refused record was not written: the file still ends with a whole chain.
    assert log.head.count < 10


# -- resume: torn tail and unsigned records ------------------------------------------


def write_chain(dir_fd: int, n: int) -> AuditHead:
    with AuditLog.open(dir_fd, clock=fake_clock()) as log:
        for i in range(n):
            log.append("step.started", {"i": i})
        return log.head


def test_torn_tail_is_cut_and_audited_on_next_append(dir_fd: int, tmp_path: Path) -> None:
    head = write_chain(dir_fd, 3)
    path = tmp_path / AUDIT_FILE_NAME
    torn = b'{"fields":{"i":3},"kind":"step.sta'
    with path.open("ab") as f:
        f.write(torn)
    with AuditLog.open(dir_fd, signed_head=head, clock=fake_clock()) as log:
        assert log.head == head
        # Opening changes nothing; the cut waits for the next record.
        assert path.read_bytes().endswith(torn)
        log.append("run.started", {})
    records = records_of(tmp_path)
    assert [r["kind"] for r in records[3:]] == [TORN_TAIL_KIND, "run.started"]
    assert records[3]["fields"] == {
        "discarded_bytes": len(torn),
        "discarded_sha256": hashlib.sha256(torn).hexdigest(),
    }
    assert records[3]["prev"] == head.sha256
    chain = verify_audit_against_head(path.read_bytes(), head.sha256, head.count)
    assert (chain.count, chain.torn_tail) == (5, False)


def test_unsigned_records_are_noted_before_continuing(dir_fd: int, tmp_path: Path) -> None:
    signed = write_chain(dir_fd, 2)
    with AuditLog.open(dir_fd, signed_head=signed, clock=fake_clock()) as log:
        log.append("step.started", {"i": 2})
    with AuditLog.open(dir_fd, signed_head=signed, clock=fake_clock()) as log:
        log.append("run.started", {})
    records = records_of(tmp_path)
    assert records[3]["kind"] == UNSIGNED_RECORDS_KIND
    assert records[3]["fields"] == {"signed_count": 2, "count": 3}
    assert records[4]["kind"] == "run.started"


def test_no_unsigned_note_when_the_signed_head_is_the_last_record(
    dir_fd: int, tmp_path: Path
) -> None:
    signed = write_chain(dir_fd, 2)
    with AuditLog.open(dir_fd, signed_head=signed, clock=fake_clock()) as log:
        log.append("run.started", {})
    assert [r["kind"] for r in records_of(tmp_path)][2:] == ["run.started"]


def test_open_against_a_head_the_log_does_not_hold_is_refused(dir_fd: int) -> None:
    head = write_chain(dir_fd, 2)
    with pytest.raises(TamperedError, match="signed head"):
        AuditLog.open(dir_fd, signed_head=AuditHead(head.sha256, 3))
    with pytest.raises(TamperedError, match="signed head"):
        AuditLog.open(dir_fd, signed_head=AuditHead("ab" * 32, 2))


def test_writer_notices_another_writer(log: AuditLog, tmp_path: Path) -> None:
    log.append("run.started", {})
    with (tmp_path / AUDIT_FILE_NAME).open("ab") as f:
        f.write(b"{}\n")
    with pytest.raises(TamperedError, match="changed under the engine"):
        log.append("step.started", {})
    with pytest.raises(EnvironmentUnavailableError):
        log.append("step.started", {})


def test_writer_notices_a_new_hardlink(log: AuditLog, tmp_path: Path) -> None:
    log.append("run.started", {})
    os.link(tmp_path / AUDIT_FILE_NAME, tmp_path / "copy")
    with pytest.raises(TamperedError, match="link count"):
        log.append("step.started", {})


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../audit.jsonl", "a\0b"])
def test_open_refuses_names_that_are_not_one_component(dir_fd: int, name: str) -> None:
    with pytest.raises(PathError, match="plain file name"):
        AuditLog.open(dir_fd, name)


def test_open_of_an_unreadable_directory_is_an_environment_error() -> None:
    with pytest.raises(EnvironmentUnavailableError):
        AuditLog.open(-1)


def test_fields_mapping_is_copied_not_aliased(log: AuditLog, tmp_path: Path) -> None:
    fields: dict[str, Any] = {"list": [1, 2]}
    log.append("x", fields)
    fields["list"].append(3)
    assert records_of(tmp_path)[0]["fields"] == {"list": [1, 2]}


def test_mapping_values_are_accepted(log: AuditLog, tmp_path: Path) -> None:
    class View(Mapping[str, int]):
        def __getitem__(self, key: str) -> int:
            return {"a": 1}[key]

        def __iter__(self) -> Iterator[str]:
            return iter(["a"])

        def __len__(self) -> int:
            return 1

    log.append("x", {"view": View(), "tuple": (1, "two")})
    assert records_of(tmp_path)[0]["fields"] == {"view": {"a": 1}, "tuple": [1, "two"]}
