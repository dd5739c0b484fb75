# SPDX-License-Identifier: Apache-2.0
"""The launcher forks each step's init ahead of its request (`_launcher_main`).

A waiting init must hold nothing of the launcher's but its request channel,
sit in a PID namespace of its own, serve exactly one step, die with the
launcher, expire so that the process-event watcher still holds its fork
event when the engine learns its pid, and be replaced when it dies. A
request it cannot decode fails closed. Needs root, like every sandbox test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from haios.errors import SandboxSetupError
from haios.sandbox import _child, _launcher_main, _libc, _plan
from haios.sandbox.launcher import Launcher
from haios.sandbox.profile import Profile, load_profile
from haios.sandbox.runner import NamespaceRunner
from haios.sandbox.treewatch import TrackedTree, TreeWatch
from tests.support.sandbox import (
    POLICY_DIR,
    captured,
    host_network_profile_text,
    make_spec,
    processes_of_uid,
    write_profile,
)

SIGSYS_CHILD = (
    "/bin/sh",
    "-c",
    "/usr/bin/python3 -c 'import ctypes; ctypes.CDLL(None).syscall(256, 0, 0, 0, 0)'; exit 0",
)


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    started = Launcher.start()
    yield started
    started.close()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _inherited(pid: int) -> list[str]:
    """Descriptors of `pid` above stdio (stage 10 replaces 0-2)."""
    return [fd for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) > 2]


def _waiting_init(launcher: Launcher) -> int:
    """The launcher's one child between steps, once it holds only its channel."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = _children(launcher.pid)
        if len(children) == 1:
            with contextlib.suppress(FileNotFoundError):
                if len(_inherited(children[0])) == 1:
                    return children[0]
        time.sleep(0.01)
    raise AssertionError(f"no waiting init: {_children(launcher.pid)}")


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.01)
    return False


def _run_true(runner: NamespaceRunner, tmp_path: Path) -> int:
    inits: list[int] = []
    outcome = runner.run(make_spec(tmp_path, ("/bin/true",)), on_start=inits.append)
    assert outcome.exit_code == 0
    return inits[0]


def _run_burst(runner: NamespaceRunner, tmp_path: Path) -> int:
    """Two steps in a row (the second makes the launcher fork ahead)."""
    _run_true(runner, tmp_path)
    return _run_true(runner, tmp_path)


def test_waiting_init_holds_only_its_channel_in_its_own_pid_namespace(
    tmp_path: Path, launcher: Launcher
) -> None:
    _run_burst(NamespaceRunner(launcher=launcher), tmp_path)
    waiting = _waiting_init(launcher)
    fds = _inherited(waiting)
    assert os.readlink(f"/proc/{waiting}/fd/{fds[0]}").startswith("socket:")
    assert os.readlink(f"/proc/{waiting}/ns/pid") != os.readlink(f"/proc/{launcher.pid}/ns/pid")
    nspid = next(line for line in Path(f"/proc/{waiting}/status").read_text().splitlines()
                 if line.startswith("NSpid:"))
    assert nspid.split()[1:] == [str(waiting), "1"]
    # No memory shared with the launcher: every writable mapping is private.
    modes = [line.split()[1] for line in Path(f"/proc/{waiting}/maps").read_text().splitlines()]
    assert [mode for mode in modes if mode.startswith("rw") and mode.endswith("s")] == []


def test_each_step_gets_the_init_forked_for_it(tmp_path: Path, launcher: Launcher) -> None:
    runner = NamespaceRunner(launcher=launcher)
    first = _run_burst(runner, tmp_path)
    waiting = _waiting_init(launcher)
    assert waiting != first
    assert _run_true(runner, tmp_path) == waiting
    assert _waiting_init(launcher) not in (first, waiting)


def test_each_step_runs_its_own_request(tmp_path: Path, launcher: Launcher) -> None:
    """The waiting init prepared itself with the previous request; it runs its own."""
    runner = NamespaceRunner(launcher=launcher)
    for value in ("first", "second", "third"):
        spec = make_spec(tmp_path, ("/usr/bin/env",), env={"PATH": "/usr/bin", "STEP": value})
        assert runner.run(spec).exit_code == 0
        assert captured(spec.stdout_fd).split() == ["PATH=/usr/bin", f"STEP={value}"]


def test_a_running_init_holds_only_its_status_pipe(tmp_path: Path, launcher: Launcher) -> None:
    """The request channel and every request descriptor are gone once the step runs."""
    runner = NamespaceRunner(launcher=launcher)
    _run_burst(runner, tmp_path)
    _waiting_init(launcher)
    inits: list[int] = []
    spec = make_spec(tmp_path, ("/bin/sleep", "30"))
    worker = threading.Thread(target=lambda: runner.run(spec, on_start=inits.append))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            inits and Path(f"/proc/{inits[0]}/task/{inits[0]}/children").read_text().strip()
        ):
            time.sleep(0.01)
        time.sleep(0.1)  # the init releases the step's descriptors right after the spawn
        fds = _inherited(inits[0])
        targets = [os.readlink(f"/proc/{inits[0]}/fd/{fd}") for fd in fds]
        assert len(fds) == 1 and targets[0].startswith("pipe:"), targets
    finally:
        for child in _children(inits[0]) if inits else []:
            os.kill(child, signal.SIGKILL)
        worker.join(30)


def test_waiting_init_expires(tmp_path: Path, launcher: Launcher) -> None:
    _run_burst(NamespaceRunner(launcher=launcher), tmp_path)
    waiting = _waiting_init(launcher)
    assert _gone(waiting, _launcher_main.WAITING_MAX_SECONDS + 5)
    deadline = time.monotonic() + 5
    while _children(launcher.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # killed, reaped a moment later
    assert _children(launcher.pid) == []
    # The next step forks its init on the spot.
    _run_true(NamespaceRunner(launcher=launcher), tmp_path)


def test_an_isolated_step_leaves_nothing_waiting(tmp_path: Path, launcher: Launcher) -> None:
    runner = NamespaceRunner(launcher=launcher)
    _run_true(runner, tmp_path)
    time.sleep(_launcher_main.WAITING_MAX_SECONDS + 0.1)
    _run_true(runner, tmp_path)
    assert _children(launcher.pid) == []


def test_a_dead_waiting_init_is_replaced(tmp_path: Path, launcher: Launcher) -> None:
    runner = NamespaceRunner(launcher=launcher)
    _run_burst(runner, tmp_path)
    waiting = _waiting_init(launcher)
    os.kill(waiting, signal.SIGKILL)
    assert _gone(waiting)
    assert _run_true(runner, tmp_path) != waiting


def test_closing_the_launcher_ends_its_waiting_init(tmp_path: Path) -> None:
    own = Launcher.start()
    try:
        _run_burst(NamespaceRunner(launcher=own), tmp_path)
        waiting = _waiting_init(own)
    finally:
        own.close()
    assert _gone(waiting)


def test_killed_launcher_takes_its_waiting_init_down(tmp_path: Path) -> None:
    own = Launcher.start()
    try:
        _run_burst(NamespaceRunner(launcher=own), tmp_path)
        waiting = _waiting_init(own)
        os.kill(own.pid, signal.SIGKILL)
        assert _gone(waiting)
    finally:
        own.close()


def test_the_process_watcher_follows_forked_ahead_inits(
    tmp_path: Path, launcher: Launcher
) -> None:
    try:
        watch = TreeWatch.start()
    except SandboxSetupError as exc:
        pytest.skip(f"no process events here: {exc}")
    runner = NamespaceRunner(launcher=launcher)
    trees: list[TrackedTree] = []
    try:
        for argv in (("/bin/true",), SIGSYS_CHILD, ("/bin/true",), SIGSYS_CHILD):
            outcome = runner.run(
                make_spec(tmp_path, argv), on_start=lambda pid: trees.append(watch.track(pid))
            )
            assert outcome.exit_code == 0
            with trees[-1] as tree:
                tree.wait_settled(5.0)
                assert tree.sigsys_deaths() == (1 if argv == SIGSYS_CHILD else 0)
    finally:
        watch.close()


@pytest.mark.parametrize("waiting", [True, False])
def test_a_request_that_does_not_decode_fails_closed(
    tmp_path: Path, launcher: Launcher, monkeypatch: pytest.MonkeyPatch, waiting: bool
) -> None:
    """Decoded by the waiting init (reported on the report pipe) or, with
    none waiting, by the launcher before it forks (answered as an error)."""
    runner = NamespaceRunner(launcher=launcher)
    _run_burst(runner, tmp_path)
    if waiting:
        _waiting_init(launcher)
    else:
        time.sleep(_launcher_main.WAITING_MAX_SECONDS + 0.2)
    spec = make_spec(tmp_path, ("/bin/sh", "-c", "touch /haios/work/ran"))
    bad = dataclasses.replace(_plan.build_plan(spec), uid="not a uid")  # type: ignore[arg-type]
    monkeypatch.setattr(_plan, "build_plan", lambda *_args, **_kw: bad)
    with pytest.raises(SandboxSetupError, match="not a uid"):
        runner.run(spec)
    assert processes_of_uid(spec.uid) == []
    assert not Path(f"/proc/self/fd/{spec.mounts.workspace.dir.fd}/ran").exists()


@pytest.mark.parametrize(
    ("request_fields", "count"),
    [({"mounts": 2, "egress": 0}, 5), ({"mounts": 3, "egress": 1}, 7),
     ({"mounts": 1, "egress": 0}, 5), ({"mounts": 2, "egress": 2}, 8),
     ({"mounts": 4, "egress": 0}, 8)],
)
def test_descriptor_counts_must_match_the_request(
    request_fields: dict[str, int], count: int
) -> None:
    fds = list(range(10, 10 + count + _child.PIPE_FDS))
    with pytest.raises(ValueError, match="descriptor count"):
        _child.child_fds(request_fields, fds)


def test_descriptors_are_named_in_request_order() -> None:
    pipes = _child.child_fds({"mounts": 3, "egress": 1}, [10, 11, 12, 13, 14, 15, 16, 17])
    assert pipes == _child.ChildFds(10, 11, 12, 13, workspace=15, cost=16, secret=17, egress=14)
    pipes = _child.child_fds({"mounts": 2}, [10, 11, 12, 13, 15, 16])
    assert pipes == _child.ChildFds(10, 11, 12, 13, workspace=15, cost=16)


AHEAD = ("mnt", "net", "ipc", "uts")


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def _host_network_profile(base: Path) -> Profile:
    (base / "policy").mkdir(exist_ok=True)
    return load_profile(write_profile(base / "policy", host_network_profile_text()), "test")


def test_waiting_init_unshares_all_but_the_cgroup_namespace_ahead(
    tmp_path: Path, launcher: Launcher
) -> None:
    _run_burst(NamespaceRunner(launcher=launcher), tmp_path)
    waiting = _waiting_init(launcher)

    def ns(pid: int, kind: str) -> str:
        return os.readlink(f"/proc/{pid}/ns/{kind}")

    assert _eventually(lambda: all(ns(waiting, k) != ns(launcher.pid, k) for k in AHEAD))
    # Rooted where the init stands when it unshares it: after joining the step's cgroup.
    assert ns(waiting, "cgroup") == ns(launcher.pid, "cgroup")


def test_the_cgroup_namespace_is_never_unshared_ahead() -> None:
    assert _child.ahead_namespaces(_plan.BASE_NAMESPACES | _libc.CLONE_NEWNET) == (
        _libc.CLONE_NEWNS | _libc.CLONE_NEWIPC | _libc.CLONE_NEWUTS | _libc.CLONE_NEWNET)


def test_stage_6_refuses_namespaces_unshared_ahead_that_are_not_the_plans(
    tmp_path: Path,
) -> None:
    plan = _plan.build_plan(make_spec(tmp_path, ("/bin/true",)))
    init = _child._Init(plan, _child.ChildFds(-1, -1, -1, -1), unshared=_libc.CLONE_NEWNS)
    with pytest.raises(OSError, match="unshared ahead differ"):
        init.unshare_namespaces()


@pytest.mark.parametrize("first_host_network", [False, True])
def test_a_step_wanting_other_namespaces_never_gets_an_init_prepared_for_others(
    tmp_path: Path, launcher: Launcher, first_host_network: bool
) -> None:
    """Host network after isolated steps, and the other way round: the waiting
    init is not used, and the step's network namespace is exactly its plan's."""
    runner = NamespaceRunner(launcher=launcher)
    host = _host_network_profile(tmp_path)
    profiles: list[str | Profile] = ["default", host]
    if first_host_network:
        profiles.reverse()
    for _ in range(2):
        assert runner.run(make_spec(tmp_path, ("/bin/true",), profile=profiles[0])).exit_code == 0
    waiting = _waiting_init(launcher)
    spec = make_spec(tmp_path, ("/bin/readlink", "/proc/self/ns/net"), profile=profiles[1])
    inits: list[int] = []
    outcome = runner.run(spec, on_start=inits.append)
    assert outcome.exit_code == 0, captured(spec.stderr_fd)
    assert inits != [waiting]
    step_net = captured(spec.stdout_fd).strip()
    assert (step_net == os.readlink("/proc/self/ns/net")) is (profiles[1] is host)


def _small_tmp_profile(base: Path) -> Profile:
    """The default profile with a smaller /tmp: the same namespaces, another view."""
    text = (POLICY_DIR / "profiles" / "default.toml").read_text().replace(
        "tmp_size_bytes = 67108864", "tmp_size_bytes = 8388608")
    (base / "small").mkdir(exist_ok=True)
    return load_profile(write_profile(base / "small", text), "test")


TMP_SIZE = ("/usr/bin/python3", "-c",
            "import os; s = os.statvfs('/tmp'); print(s.f_blocks * s.f_frsize)")


def test_waiting_init_assembles_the_views_host_part_ahead(
    tmp_path: Path, launcher: Launcher
) -> None:
    _run_burst(NamespaceRunner(launcher=launcher), tmp_path)
    waiting = _waiting_init(launcher)

    def staged() -> list[str]:
        mounts = Path(f"/proc/{waiting}/mountinfo").read_text().splitlines()
        return [line.split()[4] for line in mounts if line.split()[4].startswith("/tmp")]

    assert _eventually(lambda: {"/tmp", "/tmp/proc", "/tmp/dev", "/tmp/tmp"} <= set(staged()))
    # The step's own filesystems are attached only once its request is in.
    assert not any(path.startswith("/tmp/haios") for path in staged())


@pytest.mark.parametrize("first_small", [False, True])
def test_a_step_with_another_view_gets_its_own_view_from_a_waiting_init(
    tmp_path: Path, launcher: Launcher, first_small: bool
) -> None:
    """Same namespaces, another /tmp: the waiting init is used, drops what it
    assembled and builds the step's own view."""
    runner = NamespaceRunner(launcher=launcher)
    small = _small_tmp_profile(tmp_path)
    profiles: list[str | Profile] = ["default", small]
    if first_small:
        profiles.reverse()
    spec = make_spec(tmp_path, TMP_SIZE, profile=profiles[1])  # made first: the init waits 0.5 s
    for _ in range(2):
        assert runner.run(make_spec(tmp_path, ("/bin/true",), profile=profiles[0])).exit_code == 0
    waiting = _waiting_init(launcher)
    inits: list[int] = []
    outcome = runner.run(spec, on_start=inits.append)
    assert outcome.exit_code == 0, captured(spec.stderr_fd)
    assert inits == [waiting]
    expected = 8388608 if profiles[1] is small else 67108864
    assert int(captured(spec.stdout_fd)) == expected
    # And the next step, with the view prepared for it, sees it too.
    again = make_spec(tmp_path, TMP_SIZE, profile=profiles[1])
    assert runner.run(again).exit_code == 0
    assert int(captured(again.stdout_fd)) == expected
