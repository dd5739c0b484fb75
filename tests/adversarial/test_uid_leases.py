# SPDX-License-Identifier: Apache-2.0
"""Two engines on one host never run steps under the same uid (T-MT03).

Threat T-MT03, shared step uids across tenants: two engines (different
tenants, different os_roots) run at once on one host. Before leases, step i
of every plan ran as `uid_base + i`, so one tenant's step could exhaust the
other's RLIMIT_NPROC (counted per uid), read its files and signal it.

Attacker: a tenant whose plan runs while another tenant's does, on the same
host, with engines sharing the operator's state_dir; it may also crash its
own engine (SIGKILL) in the middle of its steps.

Expected behaviour: every step identity comes from `UidPool.lease`; no uid
is ever held by two leases at the same time, across processes and threads;
an engine killed while holding leases gives them back through the kernel
(flock), never to two takers at once; a full pool is refused with
`SandboxSetupError` (exit 6), never shared.

Each worker process is an "engine" with several threads that lease, hold
and release uids in a loop, logging CLOCK_MONOTONIC (one clock for the whole
host) right after `lease` returns and right before `release`: the logged
interval lies inside the real holding time, so two overlapping intervals for
one uid would prove a double lease. While holding, each thread also checks
through a second descriptor that the lease file's flock is really taken.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios._util.safedir import SafeDir
from haios.errors import EXIT_ENVIRONMENT, SandboxSetupError
from haios.sandbox.uidpool import UidPool

BASE = 3_800_000 + (os.getpid() % 1000) * 100

#: one engine: THREADS threads, ROUNDS leases each, logging every hold
ENGINE = r"""
import fcntl, json, os, random, sys, threading, time
from haios._util.safedir import SafeDir
from haios.sandbox.uidpool import UidPool

lease_path, base, count, threads, rounds, log_path = sys.argv[1:]
lease_dir = SafeDir.open(lease_path)
pool = UidPool(lease_dir, int(base), int(count))
log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
guard = threading.Lock()
failures = []

def write(record):
    with guard:
        os.write(log, (json.dumps(record) + "\n").encode())

def lock_is_taken(uid):
    fd = os.open(str(uid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=lease_dir.fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False

def work(thread):
    rng = random.Random(os.getpid() * 1000 + thread)
    for _ in range(int(rounds)):
        lease = pool.lease(30.0)
        start = time.monotonic_ns()
        write({"pid": os.getpid(), "uid": lease.uid, "event": "acquired", "ns": start})
        if not lock_is_taken(lease.uid):
            failures.append(lease.uid)
        time.sleep(rng.uniform(0, 0.004))
        write({"pid": os.getpid(), "uid": lease.uid, "event": "released",
               "ns": time.monotonic_ns(), "start": start})
        lease.release()

sys.stdin.readline()  # start together
workers = [threading.Thread(target=work, args=(n,)) for n in range(int(threads))]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
print(json.dumps({"unlocked_while_held": failures}), flush=True)
"""


@pytest.fixture
def lease_path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "uid-leases"
    path.mkdir(parents=True)
    os.chmod(path, 0o700)
    return path


@pytest.fixture
def engines() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start_engine(
    started: list[subprocess.Popen[str]],
    lease_path: Path,
    count: int,
    threads: int,
    rounds: int,
    log: Path,
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ENGINE,
            str(lease_path),
            str(BASE),
            str(count),
            str(threads),
            str(rounds),
            str(log),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    return proc


def go(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def logged(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def holds(logs: list[Path], killed: dict[int, int]) -> dict[int, list[tuple[int, int, int]]]:
    """Per uid: (start_ns, end_ns, pid) of every logged hold.

    A hold still open when its engine was SIGKILLed ends at the moment the
    signal was sent: the kernel drops the lock only after that.
    """
    per_uid: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    open_holds: dict[tuple[int, int, int], int] = {}
    for log in logs:
        lines = logged(log)
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # Only the last line of a killed engine's log may be torn.
                assert number == len(lines) and killed, (log, number, line)
                continue
            if record["event"] == "acquired":
                open_holds[(record["pid"], record["uid"], record["ns"])] = record["ns"]
            else:
                key = (record["pid"], record["uid"], record["start"])
                open_holds.pop(key)
                per_uid[record["uid"]].append((record["start"], record["ns"], record["pid"]))
    for (pid, uid, start), _ in open_holds.items():
        assert pid in killed, f"engine {pid} left uid {uid} held without being killed"
        per_uid[uid].append((start, killed[pid], pid))
    return per_uid


def assert_never_shared(per_uid: dict[int, list[tuple[int, int, int]]]) -> None:
    for uid, intervals in per_uid.items():
        intervals.sort()
        for (start_a, end_a, pid_a), (start_b, end_b, pid_b) in itertools.pairwise(intervals):
            assert start_b >= end_a, (
                f"uid {uid} held by {pid_a} [{start_a}, {end_a}] and by {pid_b} "
                f"[{start_b}, {end_b}] at once"
            )


def test_two_engines_at_once_never_share_a_step_uid(
    lease_path: Path, tmp_path: Path, engines: list[subprocess.Popen[str]]
) -> None:
    threads, rounds, count = 4, 40, 5  # 8 concurrent takers for 5 uids
    logs = [tmp_path / f"engine{n}.log" for n in range(2)]
    procs = [start_engine(engines, lease_path, count, threads, rounds, log) for log in logs]
    go(procs)
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out) == {"unlocked_while_held": []}
    per_uid = holds(logs, {})
    assert sum(len(v) for v in per_uid.values()) == 2 * threads * rounds
    assert set(per_uid) <= set(range(BASE, BASE + count))
    # Both engines got uids: the pool is shared, not partitioned by luck.
    assert {pid for v in per_uid.values() for _, _, pid in v} == {p.pid for p in procs}
    assert_never_shared(per_uid)


def test_engine_killed_while_holding_leases_never_doubles_a_uid(
    lease_path: Path, tmp_path: Path, engines: list[subprocess.Popen[str]]
) -> None:
    threads, count = 3, 4
    victim_log, survivor_log = tmp_path / "victim.log", tmp_path / "survivor.log"
    victim = start_engine(engines, lease_path, count, threads, 100_000, victim_log)
    survivor = start_engine(engines, lease_path, count, threads, 60, survivor_log)
    go([victim, survivor])
    deadline = time.monotonic() + 30
    while len(logged(victim_log)) < 40:  # kill it mid-run, not before it starts
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.01)
    killed_at = time.monotonic_ns()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err
    assert json.loads(out) == {"unlocked_while_held": []}
    per_uid = holds([victim_log, survivor_log], {victim.pid: killed_at})
    assert_never_shared(per_uid)
    # Every uid the victim held is free again: the kernel dropped its locks.
    with SafeDir.open(lease_path) as lease_dir:
        pool = UidPool(lease_dir, BASE, count)
        held = [pool.lease(5.0) for _ in range(count)]
        assert sorted(lease.uid for lease in held) == list(range(BASE, BASE + count))
        with pytest.raises(SandboxSetupError, match="exhausted on this host") as info:
            pool.lease(0)
        assert info.value.exit_code == EXIT_ENVIRONMENT
        for lease in held:
            lease.release()
