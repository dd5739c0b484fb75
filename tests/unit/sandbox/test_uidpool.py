# SPDX-License-Identifier: Apache-2.0
"""Host-wide uid leases: exclusive, never to a uid a live process has (T-MT03).

Real lease files, real flocks and real processes that take the pool's uids
with setresuid/setresgid; runs as root.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from haios._util.safedir import SafeDir
from haios.errors import EXIT_ENVIRONMENT, InternalError, SandboxSetupError
from haios.sandbox import uidpool
from haios.sandbox.uidpool import UidLease, UidPool, check_pool_range

#: a band no other test uses (tests/support/sandbox.py uses 200_000+), offset
#: by pid so two runs of this file on one host do not meet in /proc
BASE = 3_700_000 + (os.getpid() % 1000) * 100
WAIT_SECONDS = 10.0

#: a process that takes the given ids, reports "ready" and sleeps until killed
HOLDER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
kind, ident = sys.argv[1], int(sys.argv[2])
if kind == "all":
    os.setgroups([])
    os.setresgid(ident, ident, ident)
    os.setresuid(ident, ident, ident)
elif kind == "gid":
    os.setresgid(ident, ident, ident)
elif kind == "saved_uid":
    os.setresuid(0, 0, ident)
elif kind == "effective_uid":
    os.setresuid(0, ident, 0)
elif kind == "fsuid":
    libc.setfsuid(ident)
elif kind == "group":
    os.setgroups([ident])
print("ready", flush=True)
while True:
    time.sleep(60)
"""

#: another engine: leases from the same directory, prints the uid, holds it
ENGINE = r"""
import sys, time
from haios._util.safedir import SafeDir
from haios.sandbox.uidpool import UidPool
pool = UidPool(SafeDir.open(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
lease = pool.lease(10.0)
print(lease.uid, flush=True)
while True:
    time.sleep(60)
"""


@pytest.fixture
def lease_dir(tmp_path: Path) -> Iterator[SafeDir]:
    path = tmp_path / "leases"
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    with SafeDir.open(path) as opened:
        yield opened


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Popen objects to SIGKILL and reap at the end of the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start(
    started: list[subprocess.Popen[str]], script: str, *args: object
) -> tuple[subprocess.Popen[str], str]:
    """Run `script` with a clean interpreter; return it and its first line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True
    )
    started.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"helper exited with {proc.wait()}"
    return proc, line


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()


def dir_path(lease_dir: SafeDir) -> Path:
    return Path(lease_dir.label)


def assert_exhausted(pool: UidPool, timeout_seconds: float = 0.2) -> SandboxSetupError:
    with pytest.raises(
        SandboxSetupError, match=rf"uid pool of {pool.count} uids .* exhausted on this host"
    ) as info:
        pool.lease(timeout_seconds)
    assert info.value.exit_code == EXIT_ENVIRONMENT
    return info.value


# -- exclusion ------------------------------------------------------------------


def test_two_leases_never_share_a_uid(lease_dir: SafeDir) -> None:
    pool = UidPool(lease_dir, BASE, 2)
    with pool.lease(1.0) as first, pool.lease(1.0) as second:
        assert {first.uid, second.uid} == {BASE, BASE + 1}
        assert (first.gid, second.gid) == (first.uid, second.uid)


def test_two_pools_on_one_directory_never_share_a_uid(lease_dir: SafeDir) -> None:
    """Two engines in one process: flock conflicts between open file descriptions."""
    one = UidPool(lease_dir, BASE, 2)
    two = UidPool(lease_dir, BASE, 2)
    with one.lease(1.0) as first, two.lease(1.0) as second:
        assert first.uid != second.uid
        assert_exhausted(one)
        assert_exhausted(two)


def test_threads_leasing_at_once_get_distinct_uids(lease_dir: SafeDir) -> None:
    count = 12
    pool = UidPool(lease_dir, BASE, count)
    barrier = threading.Barrier(count)
    leases: list[UidLease] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def take() -> None:
        barrier.wait()
        try:
            lease = pool.lease(WAIT_SECONDS)
        except SandboxSetupError as exc:
            errors.append(exc)
            return
        with guard:
            leases.append(lease)

    threads = [threading.Thread(target=take) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(lease.uid for lease in leases) == list(range(BASE, BASE + count))
    assert_exhausted(pool)
    for lease in leases:
        lease.release()


def test_full_pool_times_out_with_the_exhaustion_error(lease_dir: SafeDir) -> None:
    pool = UidPool(lease_dir, BASE, 3)
    held = [pool.lease(1.0) for _ in range(3)]
    started = time.monotonic()
    error = assert_exhausted(pool, 0.3)
    assert time.monotonic() - started >= 0.3
    assert f"{BASE}-{BASE + 2}" in str(error)
    for lease in held:
        lease.release()


def test_release_makes_the_uid_available_again(lease_dir: SafeDir) -> None:
    pool = UidPool(lease_dir, BASE, 1)
    lease = pool.lease(1.0)
    assert_exhausted(pool)
    lease.release()
    lease.release()  # idempotent
    assert lease.released
    with pool.lease(0) as again:
        assert again.uid == BASE
    assert again.released
    assert pool.lease(0).uid == BASE


def test_a_waiting_lease_gets_the_uid_when_it_is_released(lease_dir: SafeDir) -> None:
    pool = UidPool(lease_dir, BASE, 1)
    lease = pool.lease(1.0)
    timer = threading.Timer(0.3, lease.release)
    timer.start()
    started = time.monotonic()
    with pool.lease(WAIT_SECONDS) as waited:
        assert waited.uid == BASE
    assert time.monotonic() - started >= 0.25
    timer.join()


def test_lease_file_names_the_holder_for_operators(lease_dir: SafeDir) -> None:
    pool = UidPool(lease_dir, BASE, 1)
    path = dir_path(lease_dir) / str(BASE)
    with pool.lease(1.0):
        info = path.lstat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
        assert path.read_text().startswith(f"pid {os.getpid()} leased ")
    assert path.read_text() == "released\n"


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_invalid_timeout_is_a_bug(lease_dir: SafeDir, timeout: float) -> None:
    with pytest.raises(InternalError):
        UidPool(lease_dir, BASE, 1).lease(timeout)


# -- the lease directory and planted entries -------------------------------------


@pytest.mark.parametrize(
    ("mode", "owner"),
    [(0o750, 0), (0o701, 0), (0o700, 4242)],
    ids=["group-readable", "other-searchable", "not-root-owned"],
)
def test_unsafe_lease_directory_is_refused(tmp_path: Path, mode: int, owner: int) -> None:
    path = tmp_path / "leases"
    path.mkdir()
    os.chmod(path, mode)
    os.chown(path, owner, 0)
    with SafeDir.open(path) as opened, pytest.raises(SandboxSetupError, match="0700"):
        UidPool(opened, BASE, 1)


@pytest.mark.parametrize(
    ("base", "count"), [(0, 1), (BASE, 0), (2**32 - 2, 2)], ids=["uid-0", "empty", "past-uid-max"]
)
def test_out_of_bounds_range_is_refused(lease_dir: SafeDir, base: int, count: int) -> None:
    with pytest.raises(SandboxSetupError, match="uid pool"):
        UidPool(lease_dir, base, count)


def _plant_symlink(path: Path, target: Path) -> None:
    target.write_text("victim\n")
    path.symlink_to(target)


def _plant_dangling_symlink(path: Path, target: Path) -> None:
    path.symlink_to(target)


def _plant_fifo(path: Path, _target: Path) -> None:
    os.mkfifo(path, 0o600)


def _plant_directory(path: Path, _target: Path) -> None:
    path.mkdir(mode=0o700)


def _plant_socket(path: Path, _target: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def _plant_device(path: Path, _target: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))


def _plant_hardlink(path: Path, target: Path) -> None:
    target.write_text("victim\n")
    os.chmod(target, 0o600)
    os.link(target, path)


def _plant_foreign_owner(path: Path, _target: Path) -> None:
    path.write_text("")
    os.chmod(path, 0o600)
    os.chown(path, 4242, 4242)


def _plant_group_readable(path: Path, _target: Path) -> None:
    path.write_text("")
    os.chmod(path, 0o640)


PLANTS: dict[str, Callable[[Path, Path], None]] = {
    "symlink": _plant_symlink,
    "dangling-symlink": _plant_dangling_symlink,
    "fifo": _plant_fifo,
    "directory": _plant_directory,
    "socket": _plant_socket,
    "device": _plant_device,
    "hardlink": _plant_hardlink,
    "foreign-owner": _plant_foreign_owner,
    "group-readable": _plant_group_readable,
}


@pytest.mark.parametrize("kind", list(PLANTS))
def test_planted_lease_file_is_skipped_and_never_followed(
    lease_dir: SafeDir, tmp_path: Path, kind: str
) -> None:
    planted = dir_path(lease_dir) / str(BASE)
    target = tmp_path / "victim"
    PLANTS[kind](planted, target)
    before = planted.lstat()
    pool = UidPool(lease_dir, BASE, 2)
    # The planted uid is never handed out; the other one is, every time.
    for _ in range(10):
        with pool.lease(1.0) as lease:
            assert lease.uid == BASE + 1
    with pool.lease(1.0):
        error = assert_exhausted(pool, 0)
    assert "1 lease files are not plain root-owned 0600 files" in str(error)
    after = planted.lstat()
    assert (after.st_ino, after.st_mode, after.st_uid) == (
        before.st_ino,
        before.st_mode,
        before.st_uid,
    )
    if kind == "dangling-symlink":
        assert not target.exists(), "O_CREAT went through the link"
    elif target.exists():
        assert target.read_text() == "victim\n"
        with target.open("rb") as handle:  # nobody holds a lock on it
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_lease_file_swapped_after_open_is_not_trusted(
    lease_dir: SafeDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry replaced between open and flock: the lock is on an orphan inode."""
    pool = UidPool(lease_dir, BASE, 1)
    name = str(BASE)
    real_flock = fcntl.flock

    def swap_then_lock(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_EX:
            os.unlink(name, dir_fd=lease_dir.fd)
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=lease_dir.fd))
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", swap_then_lock)
    assert_exhausted(pool, 0)
    monkeypatch.undo()
    assert pool.lease(0).uid == BASE


# -- live processes keep their uid out of the pool ---------------------------------


@pytest.mark.parametrize("kind", ["all", "gid", "saved_uid", "effective_uid", "fsuid", "group"])
def test_uid_of_a_live_process_is_skipped_until_it_exits(
    lease_dir: SafeDir, processes: list[subprocess.Popen[str]], kind: str
) -> None:
    pool = UidPool(lease_dir, BASE, 2)
    holder, ready = start(processes, HOLDER, kind, BASE)
    assert ready == "ready"
    status = Path(f"/proc/{holder.pid}/status").read_text()
    assert str(BASE) in status, status
    single = UidPool(lease_dir, BASE, 1)
    assert_exhausted(single)
    for _ in range(10):
        with pool.lease(1.0) as lease:
            assert lease.uid == BASE + 1
    kill(holder)
    with single.lease(0) as lease:
        assert lease.uid == BASE


def test_a_second_engine_holding_a_lease_blocks_it(
    lease_dir: SafeDir, processes: list[subprocess.Popen[str]]
) -> None:
    pool = UidPool(lease_dir, BASE, 1)
    engine, uid = start(processes, ENGINE, dir_path(lease_dir), BASE, 1)
    assert int(uid) == BASE
    assert_exhausted(pool)
    kill(engine)  # the kernel drops the flock of a SIGKILLed holder
    with pool.lease(0) as lease:
        assert lease.uid == BASE


def test_a_killed_engine_uid_stays_out_while_its_step_lives(
    lease_dir: SafeDir, processes: list[subprocess.Popen[str]]
) -> None:
    """The engine dies mid-step; its step, still running as the uid, keeps it taken."""
    pool = UidPool(lease_dir, BASE, 1)
    engine, uid = start(processes, ENGINE, dir_path(lease_dir), BASE, 1)
    step, _ = start(processes, HOLDER, "all", uid)
    assert_exhausted(pool)
    kill(engine)
    # The lock is gone now (a fresh flock succeeds) but the step is not.
    probe = os.open(uid, os.O_RDONLY, dir_fd=lease_dir.fd)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)
    assert_exhausted(pool, 0.3)
    kill(step)
    with pool.lease(WAIT_SECONDS) as lease:
        assert lease.uid == BASE


def test_clean_release_skips_the_scan_a_dead_holder_does_not(
    lease_dir: SafeDir, processes: list[subprocess.Popen[str]]
) -> None:
    """A holder writes `released` only after its tree ended: the next lease
    of that uid trusts it. A holder that died leaves its note: scan again."""
    pool = UidPool(lease_dir, BASE, 1)
    with pool.lease(1.0):
        pass
    assert (dir_path(lease_dir) / str(BASE)).read_text() == "released\n"
    # A process with the uid that appears after a clean release is not the
    # holder's (the range is reserved for haios): the scan is skipped.
    holder, ready = start(processes, HOLDER, "all", BASE)
    assert ready == "ready"
    with pool.lease(0) as lease:
        assert lease.uid == BASE
    # The note of a holder that died (no `released`) makes the next lease scan.
    (dir_path(lease_dir) / str(BASE)).write_text("pid 1 leased 2026-01-01T00:00:00\n")
    assert_exhausted(pool)
    kill(holder)
    with pool.lease(0) as lease:
        assert lease.uid == BASE


def test_pid_scan_sees_the_test_itself() -> None:
    """The scan reads every process: root (this test) uses uid 0."""
    assert uidpool._pid_using_id(os.getuid()) is not None
    assert uidpool._pid_using_id(BASE + 99) is None


def test_unreadable_proc_fails_closed(lease_dir: SafeDir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uidpool, "_PROC", str(dir_path(lease_dir) / "missing"))
    with pytest.raises(SandboxSetupError, match="cannot open"):
        UidPool(lease_dir, BASE, 1).lease(0)
    # The lock taken before the scan was dropped again.
    probe = os.open(str(BASE), os.O_RDONLY, dir_fd=lease_dir.fd)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)


@pytest.mark.parametrize(
    "status",
    [b"Name:\tx\n", b"Uid:\t1\t2\nGid:\t1\t1\t1\t1\n", b"Uid:\ta\tb\tc\td\nGid:\t1\t1\t1\t1\n"],
    ids=["no-ids", "short-uid", "not-numbers"],
)
def test_malformed_status_fails_closed(status: bytes) -> None:
    with pytest.raises(SandboxSetupError, match="status"):
        uidpool._status_ids(status, "1")


def test_status_ids_cover_every_credential() -> None:
    status = b"Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9 10 \nNStgid:\t11\n"
    assert uidpool._status_ids(status, "1") == set(range(1, 11))


# -- check_pool_range ----------------------------------------------------------------


def test_pool_range_clear_of_every_known_id_is_accepted() -> None:
    check_pool_range(BASE, 100)


def test_pool_range_over_an_existing_user_is_refused() -> None:
    user = next(entry for entry in pwd.getpwall() if entry.pw_uid >= 1)
    with pytest.raises(SandboxSetupError, match=rf"user '{user.pw_name}'") as info:
        check_pool_range(user.pw_uid, 1)
    assert info.value.exit_code == EXIT_ENVIRONMENT


def test_pool_range_check_iterates_every_user_not_a_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user in the middle of the range, none at its ends."""
    inside = pwd.struct_passwd(("tenant", "x", BASE + 50, BASE + 50, "", "/", "/bin/sh"))
    users = [*pwd.getpwall(), inside]
    monkeypatch.setattr(pwd, "getpwall", lambda: users)
    with pytest.raises(SandboxSetupError, match=rf"user 'tenant' \(uid {BASE + 50}\)"):
        check_pool_range(BASE, 100)
    check_pool_range(BASE, 50)


def test_pool_range_over_an_existing_group_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    inside = grp.struct_group(("builders", "x", BASE + 7, []))
    groups = [*grp.getgrall(), inside]
    monkeypatch.setattr(grp, "getgrall", lambda: groups)
    with pytest.raises(SandboxSetupError, match=rf"group 'builders' \(gid {BASE + 7}\)"):
        check_pool_range(BASE, 100)


def test_pool_range_over_a_subordinate_id_range_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text(f"# comment\nalice:100000:65536\nbob:{BASE + 90}:65536\n")
    monkeypatch.setattr(uidpool, "_SUBID_FILES", (str(subuid), str(tmp_path / "absent")))
    with pytest.raises(SandboxSetupError, match="range of 'bob'"):
        check_pool_range(BASE, 100)
    check_pool_range(BASE, 90)
    subuid.write_text("alice:many:65536\n")
    with pytest.raises(SandboxSetupError, match="malformed"):
        check_pool_range(BASE, 90)


def test_pool_range_with_the_overflow_id_is_refused() -> None:
    with pytest.raises(SandboxSetupError, match="overflow id 65534"):
        check_pool_range(65_000, 1000)


def test_a_uid_released_cleanly_is_leased_again_first_without_a_proc_scan(
        lease_dir: SafeDir, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = UidPool(lease_dir, BASE, 100)
    first = pool.lease(0)
    first.release()
    scans: list[int] = []
    real = uidpool._pid_using_id

    def counted(ident: int) -> int | None:
        scans.append(ident)
        return real(ident)

    monkeypatch.setattr(uidpool, "_pid_using_id", counted)
    again = pool.lease(0)
    assert again.uid == first.uid  # the warm uid first, out of 1000
    assert scans == []  # its lease file said released: no /proc scan
    other = pool.lease(0)  # the warm uid is held: the sweep goes on, scanning
    assert other.uid != first.uid and scans == [other.uid]
    again.release()
    other.release()


def test_a_warm_uid_used_by_a_live_process_is_still_skipped(
        lease_dir: SafeDir, processes: list[subprocess.Popen[str]]) -> None:
    pool = UidPool(lease_dir, BASE, 2)
    lease = pool.lease(0)
    uid = lease.uid
    lease.release()
    # A process running as that uid after all, and a lease file that no
    # longer says released (a holder that died leaves its note): the warm
    # uid is tried first, scanned, and skipped.
    (dir_path(lease_dir) / str(uid)).write_bytes(b"pid 1 leased\n")
    holder, ready = start(processes, HOLDER, "all", uid)
    assert ready == "ready"
    with pool.lease(0) as taken:
        assert taken.uid != uid
    kill(holder)
