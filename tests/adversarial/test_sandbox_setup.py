# SPDX-License-Identifier: Apache-2.0
"""Setup fails closed, concurrency is safe, and the launcher confines identically.

Threats T-S11 (no silent downgrade) and T-S13 (cross-step interference under
--jobs N). A sandbox that cannot be built raises SandboxSetupError and the
step's program never runs; concurrent steps from several engine threads each
get their own namespaces and output; the preflight refuses a host or profile
it cannot serve, naming what is missing.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from haios.errors import SandboxSetupError
from haios.sandbox.launcher import Launcher
from haios.sandbox.preflight import check_sandbox_prerequisites
from haios.sandbox.profile import load_profile
from haios.sandbox.runner import NamespaceRunner
from tests.support.sandbox import (
    MINIMAL_PROFILE,
    captured,
    make_spec,
    processes_of_uid,
    run_spec,
    secret_path,
    shipped_profile,
    workspace_path,
    write_profile,
)


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    """A launcher shared by this module's tests."""
    started = Launcher.start()
    yield started
    started.close()


@pytest.fixture(params=["direct", "launcher"])
def runner(request: pytest.FixtureRequest, launcher: Launcher) -> NamespaceRunner:
    """Each test runs once forking from the engine and once through the launcher."""
    return NamespaceRunner(launcher=launcher if request.param == "launcher" else None)


def test_missing_program_is_a_setup_error(tmp_path: Path, runner: NamespaceRunner) -> None:
    spec = make_spec(tmp_path, ("/usr/bin/does-not-exist",))
    with pytest.raises(SandboxSetupError, match="execve.*No such file"):
        runner.run(spec)
    assert processes_of_uid(spec.uid) == []


def test_program_outside_the_view_is_a_setup_error(tmp_path: Path, runner: NamespaceRunner) -> None:
    outside = tmp_path / "tool.sh"
    outside.write_text("#!/bin/sh\ntouch /haios/work/ran\n")
    outside.chmod(0o755)
    spec = make_spec(tmp_path, (str(outside),))
    with pytest.raises(SandboxSetupError, match="execve"):
        runner.run(spec)
    assert not (workspace_path(spec) / "ran").exists()


def test_closed_workspace_is_a_setup_error(tmp_path: Path, runner: NamespaceRunner) -> None:
    spec = make_spec(tmp_path, ("/bin/true",))
    spec.mounts.workspace.close()
    with pytest.raises(SandboxSetupError, match="hand over|workspace"):
        runner.run(spec)


def test_step_view_names_no_host_path(tmp_path: Path, runner: NamespaceRunner) -> None:
    """T-MT06: the step's mount table shows neutral sources for its own
    filesystems, never a host directory of the engine."""
    spec = make_spec(tmp_path, ("/bin/cat", "/proc/self/mountinfo"))
    probe = run_spec(runner, spec)
    assert probe.outcome.exit_code == 0, probe.stderr
    lines = {line.split(" - ")[0].split()[4]: line for line in probe.stdout.splitlines()}
    for view in ("/haios/work", "/haios/cost"):
        source = lines[view].split(" - ")[1].split()[1]
        assert source == "haios", lines[view]
    assert str(tmp_path) not in probe.stdout
    assert "/var/lib" not in probe.stdout


@pytest.mark.parametrize(("uid", "gid"), [(0, 1000), (1000, 0)])
def test_root_identity_is_refused(
    tmp_path: Path, runner: NamespaceRunner, uid: int, gid: int
) -> None:
    spec = dataclasses.replace(make_spec(tmp_path, ("/bin/true",)), uid=uid, gid=gid)
    with pytest.raises(SandboxSetupError, match="unprivileged"):
        runner.run(spec)


def test_bad_environment_is_refused(tmp_path: Path, runner: NamespaceRunner) -> None:
    spec = make_spec(tmp_path, ("/bin/true",), env={"A=B": "x"})
    with pytest.raises(SandboxSetupError, match="environment variable"):
        runner.run(spec)


def test_relative_program_is_refused(tmp_path: Path, runner: NamespaceRunner) -> None:
    with pytest.raises(SandboxSetupError, match="absolute"):
        runner.run(make_spec(tmp_path, ("true",)))


def test_missing_cgroup_is_a_setup_error(tmp_path: Path, runner: NamespaceRunner) -> None:
    spec = make_spec(tmp_path, ("/bin/true",), cgroup=tmp_path / "no-such-cgroup")
    with pytest.raises(SandboxSetupError, match="5 join cgroup"):
        runner.run(spec)


def test_secret_dir_is_read_only(tmp_path: Path, runner: NamespaceRunner) -> None:
    spec = make_spec(
        tmp_path,
        ("/bin/sh", "-c", "cat /haios/secret/token; echo x > /haios/secret/token || echo refused"),
        with_secret=True,
    )
    secret = secret_path(spec)
    (secret / "token").write_text("s.token\n")
    os.chown(secret / "token", spec.uid, spec.gid)
    probe = run_spec(runner, spec)
    assert probe.stdout.splitlines() == ["s.token", "refused"]
    assert (secret / "token").read_text() == "s.token\n"


def test_on_start_receives_the_init_pid_and_can_kill_it(
    tmp_path: Path, runner: NamespaceRunner
) -> None:
    spec = make_spec(tmp_path, ("/bin/sleep", "60"))
    seen: list[int] = []

    def on_start(pid: int) -> None:
        seen.append(pid)
        threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()

    outcome = runner.run(spec, on_start=on_start)
    assert len(seen) == 1
    assert outcome.signal == signal.SIGKILL
    assert not outcome.timed_out
    assert processes_of_uid(spec.uid) == []


def test_on_start_failure_kills_the_tree(tmp_path: Path, runner: NamespaceRunner) -> None:
    spec = make_spec(tmp_path, ("/bin/sleep", "60"))

    def on_start(_pid: int) -> None:
        raise RuntimeError("engine bookkeeping failed")

    with pytest.raises(RuntimeError, match="bookkeeping"):
        runner.run(spec, on_start=on_start)
    assert processes_of_uid(spec.uid) == []


def test_concurrent_steps_from_threads_are_isolated(
    tmp_path: Path, runner: NamespaceRunner
) -> None:
    script = (
        "echo $HAIOS_STEP_ID > /tmp/mine; echo $HAIOS_STEP_ID > /dev/shm/mine; sleep 0.2; "
        "cat /tmp/mine /dev/shm/mine; ls /proc | grep -c '^[0-9]'"
    )
    specs = [make_spec(tmp_path, ("/bin/sh", "-c", script), name=f"s{index}") for index in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(runner.run, specs))
    for spec, outcome in zip(specs, outcomes, strict=True):
        assert outcome.exit_code == 0
        name = spec.step_id
        # Private /tmp, /dev/shm and PID namespace: only its own files and
        # at most its own three processes (sh, ls, grep).
        mine_tmp, mine_shm, visible = captured(spec.stdout_fd).split()
        assert (mine_tmp, mine_shm) == (name, name)
        assert int(visible) <= 3


def test_preflight_accepts_the_shipped_profiles(runner: NamespaceRunner) -> None:
    check_sandbox_prerequisites(
        [shipped_profile("default"), shipped_profile("network")], runner=runner
    )


def test_preflight_names_a_missing_profile_path(tmp_path: Path) -> None:
    text = MINIMAL_PROFILE.replace('path = "/usr"', 'path = "/opt/haios-missing"')
    profile = load_profile(write_profile(tmp_path, text), "test")
    with pytest.raises(SandboxSetupError, match="/opt/haios-missing does not exist"):
        check_sandbox_prerequisites([profile])


def test_preflight_refuses_when_not_root() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setresuid(65534, 65534, 65534)
            try:
                check_sandbox_prerequisites([shipped_profile("default")])
                os.write(write_end, b"passed")
            except SandboxSetupError as exc:
                os.write(write_end, str(exc).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert message.startswith("sandbox prerequisites missing: not root")


def test_launcher_confines_like_the_direct_runner(tmp_path: Path, launcher: Launcher) -> None:
    spec = make_spec(
        tmp_path, ("/bin/sh", "-c", "grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status")
    )
    probe = run_spec(NamespaceRunner(launcher=launcher), spec)
    assert probe.stdout.split() == [
        "CapEff:",
        "0000000000000000",
        "NoNewPrivs:",
        "1",
        "Seccomp:",
        "2",
    ]


def test_closed_launcher_refuses_new_steps(tmp_path: Path) -> None:
    own = Launcher.start()
    own.close()
    with pytest.raises(SandboxSetupError, match="launcher unavailable"):
        NamespaceRunner(launcher=own).run(make_spec(tmp_path, ("/bin/true",)))


def test_killed_launcher_takes_its_steps_down(tmp_path: Path) -> None:
    own = Launcher.start()
    spec = make_spec(tmp_path, ("/bin/sleep", "60"))
    threading.Timer(0.5, os.kill, (own.pid, signal.SIGKILL)).start()
    try:
        outcome = NamespaceRunner(launcher=own).run(spec)
    finally:
        own.close()
    assert outcome.signal == signal.SIGKILL
    assert processes_of_uid(spec.uid) == []
