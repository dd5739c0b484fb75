# SPDX-License-Identifier: Apache-2.0
"""Resource exhaustion from inside a step is contained (T-S09, T-S10).

The attacker's step tries to exhaust the host: a fork bomb (stopped by
RLIMIT_NPROC, then the wall timeout kills the whole PID namespace), a memory
bomb (RLIMIT_AS), a disk filler (RLIMIT_FSIZE, violation "file_size"), a CPU
burner (RLIMIT_CPU, violation "cpu_limit"), an output flood (capped, pipes
drained), a sleeper past its timeout, and descendants that try to outlive
the step. The engine (this test process) must survive, and no process of the
step's uid may remain afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios.sandbox.runner import NamespaceRunner
from tests.support.sandbox import (
    make_spec,
    processes_of_uid,
    run_python_probe,
    run_spec,
    shipped_profile,
    workspace_path,
)


def test_fork_bomb_is_contained_and_the_tree_dies(tmp_path: Path) -> None:
    body = (
        "open('/haios/work/started', 'w').close()\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    started = time.monotonic()
    probe = run_python_probe(NamespaceRunner(), tmp_path, body, timeout_seconds=3.0)
    assert (workspace_path(probe.spec) / "started").exists()
    assert probe.outcome.timed_out
    assert time.monotonic() - started < 15
    assert processes_of_uid(probe.spec.uid) == []


def test_memory_bomb_fails_to_allocate(tmp_path: Path) -> None:
    body = (
        "chunks = []\n"
        "try:\n"
        "    while True:\n"
        "        chunks.append(bytes(256 << 20))\n"
        "except MemoryError:\n"
        "    results['allocated_bytes'] = len(chunks) * (256 << 20)\n"
        "try:\n"
        "    bytes(64 << 30)\n"
        "except MemoryError:\n"
        "    results['huge'] = 'refused'\n"
        "save()\n"
    )
    probe = run_python_probe(NamespaceRunner(), tmp_path, body)
    assert probe.outcome.exit_code == 0, probe.stderr
    assert probe.results["huge"] == "refused"
    assert probe.results["allocated_bytes"] < shipped_profile("default").rlimits.address_space_bytes


def test_disk_filler_is_stopped_by_the_file_size_limit(tmp_path: Path) -> None:
    # A workspace larger than RLIMIT_FSIZE, so the rlimit is what stops dd.
    base = shipped_profile("default")
    small = base.rlimits.model_copy(update={"file_size_bytes": 8 << 20})
    profile = base.model_copy(update={"rlimits": small})
    spec = make_spec(tmp_path, ("/usr/bin/dd", "if=/dev/zero", "of=/haios/work/big", "bs=1M"),
                     profile=profile)
    probe = run_spec(NamespaceRunner(), spec)
    assert probe.outcome.signal == signal.SIGXFSZ
    assert probe.outcome.violation == "file_size"
    assert (workspace_path(spec) / "big").stat().st_size == 8 << 20


def test_disk_filler_fills_only_its_own_workspace(tmp_path: Path) -> None:
    """T-MT05: the workspace is a capped tmpfs; filling it fails the write
    with ENOSPC inside the step, and the host's disks never see a byte."""
    spec = make_spec(tmp_path, ("/usr/bin/dd", "if=/dev/zero", "of=/haios/work/big", "bs=1M"))
    probe = run_spec(NamespaceRunner(), spec)
    assert probe.outcome.exit_code == 1
    assert "No space left on device" in probe.stderr
    size = (workspace_path(spec) / "big").stat().st_size
    assert size <= shipped_profile("default").filesystem.workspace_size_bytes
    spec.mounts.close()  # the whole filesystem goes with the last descriptor


def test_inode_bomb_is_capped_in_the_workspace_tmp_and_shm(tmp_path: Path) -> None:
    """T-MT05: /haios/work, /tmp and /dev/shm each cap their inode count."""
    body = (
        "for where in ('/haios/work', '/tmp', '/dev/shm'):\n"
        "    made = 0\n"
        "    try:\n"
        "        while made < 10_000_000:\n"
        "            open(f'{where}/f{made}', 'w').close()\n"
        "            made += 1\n"
        "    except OSError as exc:\n"
        "        results[where] = [made, exc.errno]\n"
        "print(json.dumps(results))\n"  # the workspace is full: report on stdout
    )
    base = shipped_profile("default")
    probe = run_python_probe(NamespaceRunner(), tmp_path, body)
    assert probe.outcome.exit_code == 0, probe.stderr
    results = json.loads(probe.stdout)
    assert results["/haios/work"][1] == errno.ENOSPC
    assert results["/haios/work"][0] < base.filesystem.workspace_inodes
    for where in ("/tmp", "/dev/shm"):
        assert results[where][1] == errno.ENOSPC
        assert results[where][0] < base.filesystem.tmp_inodes


def test_cpu_burner_is_stopped_by_the_cpu_limit(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, ("/usr/bin/python3", "-c", "while True: pass"), cpu_seconds_limit=1)
    probe = run_spec(NamespaceRunner(), spec)
    assert probe.outcome.signal == signal.SIGXCPU
    assert probe.outcome.violation == "cpu_limit"
    # rusage leaves out time stolen by the hypervisor, which RLIMIT_CPU counts.
    assert 0.5 <= probe.outcome.cpu_seconds < 3


def test_sleeper_past_its_timeout_is_killed_with_its_tree(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        ("/bin/sh", "-c", "sleep 60 & sleep 60 & (trap '' TERM; sleep 60) & wait"),
        timeout_seconds=1.0,
    )
    started = time.monotonic()
    probe = run_spec(NamespaceRunner(), spec)
    assert probe.outcome.timed_out
    assert probe.outcome.signal == signal.SIGKILL
    assert probe.outcome.exit_code is None
    assert probe.outcome.violation is None
    assert time.monotonic() - started < 5
    assert processes_of_uid(spec.uid) == []


def test_descendants_die_when_the_step_exits(tmp_path: Path) -> None:
    # A double-forked daemon that ignores SIGTERM and SIGHUP outlives its
    # parent, but not the namespace init.
    spec = make_spec(
        tmp_path, ("/bin/sh", "-c", "(trap '' TERM HUP; setsid sleep 60 &) ; echo started")
    )
    probe = run_spec(NamespaceRunner(), spec)
    assert probe.outcome.exit_code == 0
    assert probe.stdout == "started\n"
    assert processes_of_uid(spec.uid) == []


def test_output_flood_is_capped_and_drained(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        (
            "/bin/sh",
            "-c",
            "head -c 5000000 /dev/zero; head -c 3000000 /dev/zero >&2; echo done >&2",
        ),
        output_limit_bytes=1000,
    )
    probe = run_spec(NamespaceRunner(), spec)
    assert probe.outcome.exit_code == 0
    assert os.fstat(spec.stdout_fd).st_size == 1000
    assert os.fstat(spec.stderr_fd).st_size == 1000


def test_endless_output_stops_at_the_timeout(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, ("/usr/bin/yes",), output_limit_bytes=4096, timeout_seconds=1.0)
    probe = run_spec(NamespaceRunner(), spec)
    assert probe.outcome.timed_out
    assert os.fstat(spec.stdout_fd).st_size == 4096


def test_hard_limits_cannot_be_raised(tmp_path: Path) -> None:
    body = (
        "import resource\n"
        "try:\n"
        "    resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))\n"
        "    results['raise_nofile'] = 'raised'\n"
        "except (ValueError, OSError):\n"
        "    results['raise_nofile'] = 'refused'\n"
        "record('prlimit_init', lambda: try_syscall(302, 1, 7, 0, 0))\n"
        "results['core'] = resource.getrlimit(resource.RLIMIT_CORE)\n"
        "results['nproc'] = resource.getrlimit(resource.RLIMIT_NPROC)\n"
        "save()\n"
    )
    probe = run_python_probe(NamespaceRunner(), tmp_path, body)
    assert probe.outcome.exit_code == 0, probe.stderr
    assert probe.results["raise_nofile"] == "refused"
    assert probe.results["prlimit_init"] == 1  # EPERM: only pid 0 (self) is allowed
    assert probe.results["core"] == [0, 0]
    limit = shipped_profile("default").rlimits.processes
    assert probe.results["nproc"] == [limit, limit]


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    return None


@pytest.fixture
def step_cgroup() -> Iterator[Path]:
    """A fresh cgroup v2 leaf for one step (removed afterwards)."""
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted (spec.cgroup is optional)")
    group = root / f"haios-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    yield group
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.05)


def test_cgroup_accounts_reparented_descendants(tmp_path: Path, step_cgroup: Path) -> None:
    burn = "import time\\nend = time.process_time() + 0.6\\nwhile time.process_time() < end: pass"
    script = f"(python3 -c \"$(printf '{burn}')\" &) ; sleep 1.2; cat /proc/self/cgroup"
    spec = make_spec(tmp_path, ("/bin/sh", "-c", script), cgroup=step_cgroup)
    probe = run_spec(NamespaceRunner(), spec)
    assert probe.outcome.exit_code == 0, probe.stderr
    # The cgroup namespace is rooted at the step's cgroup.
    assert probe.stdout.splitlines()[-1] == "0::/"
    assert probe.outcome.cpu_seconds >= 0.6
    assert (step_cgroup / "cgroup.procs").read_text() == ""


def test_cgroup_timeout_kills_everything(tmp_path: Path, step_cgroup: Path) -> None:
    spec = make_spec(
        tmp_path, ("/bin/sh", "-c", "sleep 60 & sleep 60"), cgroup=step_cgroup, timeout_seconds=1.0
    )
    probe = run_spec(NamespaceRunner(), spec)
    assert probe.outcome.timed_out
    assert (step_cgroup / "cgroup.procs").read_text() == ""
