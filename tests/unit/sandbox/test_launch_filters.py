# SPDX-License-Identifier: Apache-2.0
"""The seccomp programs a launched step runs under are libseccomp's, byte for byte.

The engine compiles each profile once per run and the launcher's inits only
hand the precompiled programs to seccomp(2). These tests read the filters
back from a running step with PTRACE_SECCOMP_GET_FILTER (the kernel keeps the
classic BPF it was given) and compare them with a fresh libseccomp compile,
then check that refused calls still fail as before through the launcher
(T-S06). Needs root, like every sandbox test.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import errno
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from haios.sandbox import _launchplan, _plan, seccomp
from haios.sandbox.launcher import Launcher
from haios.sandbox.runner import NamespaceRunner
from haios.sandbox.spec import StepOutcome
from tests.support.sandbox import make_spec, run_python_probe, shipped_profile

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
WALL = 0x40000000
MAX_INSTRUCTIONS = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    started = Launcher.start()
    yield started
    started.close()


@pytest.fixture(params=["direct", "launcher"])
def runner(request: pytest.FixtureRequest, launcher: Launcher) -> NamespaceRunner:
    return NamespaceRunner(launcher=launcher if request.param == "launcher" else None)


def _ptrace(request: int, pid: int, addr: int, data: object) -> int:
    result = int(_libc.ptrace(request, pid, ctypes.c_void_p(addr), data))
    if result < 0:
        raise OSError(ctypes.get_errno(), f"ptrace {request:#x}")
    return result


def _loaded_filters(pid: int) -> list[bytes]:
    """The classic-BPF filters of `pid`, in the order they were installed."""
    _ptrace(PTRACE_SEIZE, pid, 0, None)
    try:
        _ptrace(PTRACE_INTERRUPT, pid, 0, None)
        os.waitpid(pid, WALL)
        programs: list[bytes] = []
        buffer = ctypes.create_string_buffer(MAX_INSTRUCTIONS * 8)
        for index in range(8):
            try:
                count = _ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, buffer)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return programs
                raise
            programs.append(buffer.raw[: count * 8])
        return programs
    finally:
        _ptrace(PTRACE_DETACH, pid, 0, None)


def _step_pid(init_pid: int, deadline: float) -> int:
    """The host pid of the init's child once it runs `sleep`."""
    children = Path(f"/proc/{init_pid}/task/{init_pid}/children")
    while time.monotonic() < deadline:
        for pid in children.read_text().split():
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                return int(pid)
        time.sleep(0.01)
    raise AssertionError("the step did not start")


def test_loaded_filters_are_a_fresh_libseccomp_compile(
    tmp_path: Path, runner: NamespaceRunner
) -> None:
    profile = shipped_profile("default")
    spec = make_spec(tmp_path, ("/bin/sleep", "30"))
    inits: list[int] = []
    outcomes: list[StepOutcome] = []
    worker = threading.Thread(
        target=lambda: outcomes.append(runner.run(spec, on_start=inits.append))
    )
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while not inits and time.monotonic() < deadline:
            time.sleep(0.01)
        step = _step_pid(inits[0], deadline)
        try:
            loaded = _loaded_filters(step)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EMEDIUMTYPE, errno.EIO):
                pytest.skip(f"kernel cannot return seccomp filters ({exc})")
            raise
        os.kill(step, signal.SIGKILL)
    finally:
        worker.join(30)
    # Index 0 is the oldest filter: the floor, then the profile's on top.
    assert loaded == [
        seccomp.compile_floor_filter().bpf,
        seccomp.compile_profile_filter(profile).bpf,
    ]
    assert outcomes[0].signal == signal.SIGKILL


def test_the_plan_carries_the_compiled_programs_over_the_wire(tmp_path: Path) -> None:
    profile = shipped_profile("network")
    plan = _plan.build_plan(make_spec(tmp_path, ("/bin/true",), profile=profile))
    wire = json.loads(json.dumps(_launchplan.to_wire(plan)))
    assert _launchplan.from_wire(wire).seccomp == (
        seccomp.compile_floor_filter().bpf,
        seccomp.compile_profile_filter(profile).bpf,
    )


def test_wire_form_is_the_dataclass_form(tmp_path: Path) -> None:
    plan = _plan.build_plan(make_spec(tmp_path, ("/bin/true", "a b"), env={"A": "1"}))
    expected = dataclasses.asdict(plan)
    expected["seccomp"] = [
        base64.b64encode(program).decode() for program in plan.seccomp
    ]
    wire = _launchplan.to_wire(plan)
    assert json.loads(json.dumps(wire)) == json.loads(json.dumps(expected))
    assert _launchplan.from_wire(json.loads(json.dumps(wire))) == plan


PROBE = """
CLONE_NEWNS = 0x00020000
record('unshare', lambda: try_syscall(272, CLONE_NEWNS))
record('mount', lambda: try_syscall(165, 0, 0, 0, 0, 0))
record('ptrace', lambda: try_syscall(101, 16, 1, 0, 0))
record('clone3', lambda: try_syscall(435, 0, 0))
record('socket_netlink', lambda: try_syscall(41, 16, 3, 0))
record('sync', lambda: try_syscall(162))
save()
"""


def test_refused_calls_fail_with_their_errno(tmp_path: Path, runner: NamespaceRunner) -> None:
    probe = run_python_probe(runner, tmp_path, PROBE)
    assert probe.outcome.exit_code == 0, probe.stderr
    assert probe.results == {
        "unshare": errno.EPERM,
        "mount": errno.EPERM,
        "ptrace": errno.EPERM,
        "clone3": errno.ENOSYS,
        "socket_netlink": errno.EAFNOSUPPORT,
        "sync": errno.EPERM,
    }


def test_a_call_no_rule_allows_kills_the_step(tmp_path: Path, runner: NamespaceRunner) -> None:
    # migrate_pages (256): neither allowed nor denied by the default profile.
    probe = run_python_probe(runner, tmp_path, "try_syscall(256, 0, 0, 0, 0)\nsave()")
    assert probe.results == {}
    assert probe.outcome.signal == signal.SIGSYS
    assert probe.outcome.violation == "seccomp"
