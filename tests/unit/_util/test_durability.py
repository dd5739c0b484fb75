# SPDX-License-Identifier: Apache-2.0
"""One durability barrier per turn: batched fsyncs, and the order the contract needs.

The order is what matters: every file a signed state refers to (products,
their signatures, cost records, links, logs) and every audit record up to
the head the state pins must have been fsynced before that state is
renamed into place. The engine test records each fsync (by the path its
descriptor names) and each rename, in a real in-process run.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios import events as ev
from haios._util import durability
from haios._util.durability import Barrier
from haios._util.safedir import SafeDir
from haios.audit import AuditLog
from haios.errors import CopyError, EnvironmentUnavailableError
from tests.support.engine_fakes import EngineRig, expires_in
from tests.support.world import plan, sh, step


def _named(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every fsync and syncfs, as "fsync <path>" / "syncfs <path>" of the descriptor."""
    seen: list[str] = []
    real_fsync, real_syncfs = os.fsync, durability.syncfs

    def spy_fsync(fd: int) -> None:
        seen.append(f"fsync {_named(fd)}")
        real_fsync(fd)

    def spy_syncfs(fd: int) -> None:
        seen.append(f"syncfs {_named(fd)}")
        real_syncfs(fd)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(durability, "syncfs", spy_syncfs)
    yield seen


def test_a_barrier_makes_a_batch_durable_with_one_syncfs(
        tmp_path: Path, fsyncs: list[str]) -> None:
    barrier = Barrier()
    with SafeDir.open(tmp_path, "t") as directory:
        for name in ("a", "b", "c"):
            directory.write_atomic(name, name.encode(), barrier=barrier)
        assert fsyncs == []  # nothing durable yet, everything in place
        assert (tmp_path / "b").read_bytes() == b"b"
        barrier.flush()
    assert len(fsyncs) == 1 and fsyncs[0].startswith("syncfs ")
    assert Path(fsyncs[0].split(" ", 1)[1]).parent == tmp_path
    fsyncs.clear()
    barrier.flush()
    assert fsyncs == []  # nothing pending: no syscall


def test_without_syncfs_each_file_then_its_directory_is_fsynced(
        tmp_path: Path, fsyncs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(fd: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(durability, "syncfs", missing)
    barrier = Barrier()
    with SafeDir.open(tmp_path, "t") as directory:
        directory.write_atomic("a", b"a", barrier=barrier)
        directory.write_atomic("b", b"b", barrier=barrier)
        barrier.flush()
    assert [Path(p.split(" ", 1)[1]).parent for p in fsyncs[:2]] == [tmp_path] * 2
    assert fsyncs[2:] == [f"fsync {tmp_path}"]  # one directory fsync covers both renames


def test_a_barrier_runs_its_flushers_after_the_files(tmp_path: Path, fsyncs: list[str]) -> None:
    barrier = Barrier()
    order: list[str] = []
    barrier.add_flusher(lambda: order.append(f"flusher after {len(fsyncs)} syncs"))
    with SafeDir.open(tmp_path, "t") as directory:
        directory.write_atomic("x", b"x", barrier=barrier)
        barrier.flush()
    assert order == ["flusher after 1 syncs"]


def test_a_failed_sync_is_an_environment_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    barrier = Barrier()
    with SafeDir.open(tmp_path, "t") as directory:
        directory.write_atomic("x", b"x", barrier=barrier)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(durability, "syncfs", failing)
    with pytest.raises(CopyError, match="cannot make writes durable"):
        barrier.flush()
    assert CopyError.exit_code == 6


def test_a_deferred_audit_log_fsyncs_at_the_barrier_only(tmp_path: Path,
                                                         fsyncs: list[str]) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        log = AuditLog.open(fd)
        fsyncs.clear()
        barrier = Barrier()
        log.defer_to(barrier)
        bus = ev.EventBus()
        bus.subscribe(log.subscriber)
        for attempt in (1, 2, 3):
            bus.publish(ev.StepStarted(step_id="s", profile="default", attempt=attempt))
        assert fsyncs == []
        barrier.flush()
        assert fsyncs == [f"fsync {tmp_path / 'audit.jsonl'}"]
        bus.publish(ev.BudgetHalt(reason="budget exhausted: usd"))
        log.close()  # pending records are made durable on close
        assert fsyncs == [f"fsync {tmp_path / 'audit.jsonl'}"] * 2
    finally:
        os.close(fd)


def test_a_deferred_audit_log_that_cannot_sync_refuses_later_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        log = AuditLog.open(fd)
        barrier = Barrier()
        log.defer_to(barrier)
        log.append("budget.halt", {"reason": "r"})

        def failing(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(EnvironmentUnavailableError):
            barrier.flush()
        monkeypatch.undo()
        with pytest.raises(EnvironmentUnavailableError, match="earlier write failed"):
            log.append("budget.halt", {"reason": "r"})
    finally:
        os.close(fd)


def _chain() -> dict[str, object]:
    return plan("durable", [
        step("a", sh("make a"), products=["a.txt"]),
        step("b", sh("make b"), needs=["a"], materials=["a.txt"], products=["b.txt"]),
    ], expires=expires_in(24))


def test_every_file_a_state_names_is_durable_before_that_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = EngineRig(tmp_path)
    root = rig.root(_chain())
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_syncfs = os.fsync, os.rename, durability.syncfs

    def fsync(fd: int) -> None:
        events.append(("fsync", _named(fd)))
        real_fsync(fd)

    def syncfs(fd: int) -> None:
        events.append(("syncfs", _named(fd)))
        real_syncfs(fd)

    def rename(src: str, dst: str, *, src_dir_fd: int | None = None,
               dst_dir_fd: int | None = None) -> None:
        where = os.readlink(f"/proc/self/fd/{dst_dir_fd}") if dst_dir_fd is not None else ""
        events.append(("rename", f"{where}/{dst}"))
        real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(durability, "syncfs", syncfs)
    run = rig.run(root)
    monkeypatch.undo()
    assert run.code == 0
    state_renames = [i for i, (what, path) in enumerate(events)
                     if what == "rename" and path == f"{root}/state.json"]
    assert len(state_renames) >= 3  # running, a and b ended, the final state
    published = [path for what, path in events if what == "rename"
                 and Path(path).parent.name in ("artefacts", "cost", "links", "logs")]
    assert {Path(p).name for p in published} >= {
        "a.txt", "a.txt.sig", "b.txt", "b.txt.sig", "a.json", "b.json", "a.out", "b.err"}
    same_fs = os.stat(root).st_dev
    for name in published:
        renamed = events.index(("rename", name))
        next_state = next(i for i in state_renames if i > renamed)
        between = events[renamed:next_state]
        # a syncfs of os_root's file system covers the file and its directory entry
        assert any(what == "syncfs" and os.stat(path).st_dev == same_fs
                   for what, path in between), name
    # The audit records a state pins are durable before it: each state's rename
    # follows a sync of the log (its own fsync, or the barrier's syncfs).
    for index in state_renames:
        before = [what for what, path in events[:index]
                  if path == str(root / "audit.jsonl") or what == "syncfs"]
        assert before, "no sync before the first state"
    # One barrier per turn: a step's files share one syncfs, never an fsync each.
    per_file = [path for what, path in events if what == "fsync" and path in published]
    assert per_file == []
