# SPDX-License-Identifier: Apache-2.0
"""Signal deaths anywhere in a step's process tree (haios.sandbox.treewatch).

Threat: a step hides a seccomp violation from the engine. SECCOMP_RET_KILL_PROCESS
kills only the offending process; if a child or grandchild makes the refused
call and its parent reaps it (`cmd || true`), the init sees a clean exit. The
attacker controls everything inside the step: forks, double forks, setsid,
threads, execve from a thread. Expected: every SIGSYS death of a process in
the tree is counted, nothing outside the tree is, and anything that makes the
count uncertain (lost events, a root never seen, a pid-reuse race) fails
closed.

The real-process tests fork from the test process (as root, in the initial
namespaces, which the process-events connector requires); the state-machine
tests feed synthetic events.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from haios.errors import SandboxSetupError, StepFailedError
from haios.sandbox import _libc
from haios.sandbox.treewatch import (
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_NONE,
    SIGSYS,
    ProcEvent,
    SettleStatus,
    TreeWatch,
    _TreeState,
    parse_messages,
)

SETTLE_SECONDS = 10.0


@pytest.fixture
def watch() -> Iterator[TreeWatch]:
    with TreeWatch.start() as started:
        yield started


# -- processes ------------------------------------------------------------------


def _fork(body: Callable[[], int]) -> int:
    """Run `body` in a forked child that never returns into pytest."""
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = body()
        finally:
            os._exit(code)
    return pid


def _no_core() -> None:
    # Dying of SIGSYS dumps core by default; keep the host clean.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _libc.prctl(_libc.PR_SET_DUMPABLE, 0)


def _sigsys_self() -> int:
    _no_core()
    os.kill(os.getpid(), signal.SIGSYS)
    return 1


def _seccomp_violation() -> int:
    import pyseccomp  # type: ignore[import-untyped,unused-ignore]  # no stubs

    _no_core()
    refuse = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    refuse.add_rule(pyseccomp.KILL_PROCESS, "getppid")
    refuse.load()
    os.getppid()
    return 1


def _reap_child_running(body: Callable[[], int]) -> Callable[[], int]:
    """A process that forks `body`, reaps it whatever happened, and exits 0."""

    def parent() -> int:
        os.waitpid(_fork(body), 0)
        return 0

    return parent


def _wait_status(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def test_grandchild_sigsys_reaped_by_its_parent_is_counted(watch: TreeWatch) -> None:
    root = _fork(_reap_child_running(_reap_child_running(_sigsys_self)))
    with watch.track(root) as tree:
        assert _wait_status(root) == 0  # what the init alone would report
        tree.wait_settled(SETTLE_SECONDS)
        assert tree.sigsys_deaths() == 1
        assert tree.signal_deaths() == {SIGSYS: 1}
        assert tree.descendants_seen == 2
        assert not tree.lost_events


def test_real_seccomp_kill_in_a_grandchild_is_counted(watch: TreeWatch) -> None:
    root = _fork(_reap_child_running(_reap_child_running(_seccomp_violation)))
    with watch.track(root) as tree:
        assert _wait_status(root) == 0
        tree.wait_settled(SETTLE_SECONDS)
        assert tree.sigsys_deaths() == 1


def test_double_forked_setsid_orphan_is_counted_after_the_root_exits(watch: TreeWatch) -> None:
    go_r, go_w = os.pipe()

    def orphan() -> int:
        os.setsid()
        os.read(go_r, 1)  # dies only after its parent and the root are gone
        return _sigsys_self()

    def middle() -> int:
        _fork(orphan)
        return 0  # leaves the orphan behind, unreaped

    root = _fork(_reap_child_running(middle))
    os.close(go_r)
    with watch.track(root) as tree:
        assert _wait_status(root) == 0
        assert tree.wait_settled_result(0.2) is SettleStatus.TIMED_OUT  # the orphan lives
        os.write(go_w, b"x")
        os.close(go_w)
        tree.wait_settled(SETTLE_SECONDS)
        assert tree.sigsys_deaths() == 1


def test_sigsys_outside_the_tree_is_not_counted(watch: TreeWatch) -> None:
    go_r, go_w = os.pipe()

    def outsider() -> int:
        os.read(go_r, 1)
        return _sigsys_self()

    def clean_child() -> int:
        os.read(go_r, 1)
        return 3

    stranger = _fork(outsider)
    root = _fork(_reap_child_running(clean_child))
    with watch.track(root) as tree:
        os.write(go_w, b"xx")  # both go at the same time
        assert os.WTERMSIG(_wait_status(stranger)) == signal.SIGSYS
        assert _wait_status(root) == 0
        tree.wait_settled(SETTLE_SECONDS)
        assert tree.signal_deaths() == {}
        assert tree.descendants_seen == 1
    os.close(go_r)
    os.close(go_w)


def test_tree_of_normal_exits_counts_nothing(watch: TreeWatch) -> None:
    def worker() -> int:
        return 7

    def parent() -> int:
        for pid in [_fork(worker) for _ in range(5)]:
            os.waitpid(pid, 0)
        return 0

    root = _fork(parent)
    with watch.track(root) as tree:
        assert _wait_status(root) == 0
        tree.wait_settled(SETTLE_SECONDS)
        assert tree.signal_deaths() == {}
        assert tree.sigsys_deaths() == 0
        assert tree.descendants_seen == 5


def test_descendants_forked_before_track_are_replayed(watch: TreeWatch) -> None:
    done_r, done_w = os.pipe()
    go_r, go_w = os.pipe()

    def root_body() -> int:
        os.waitpid(_fork(_reap_child_running(_sigsys_self)), 0)
        os.write(done_w, b"x")  # the violation happened and was reaped
        os.read(go_r, 1)
        return 0

    root = _fork(root_body)
    os.read(done_r, 1)
    time.sleep(0.1)  # let the reader consume the events before tracking
    try:
        with watch.track(root) as tree:
            seen_before_release = tree.descendants_seen
            os.write(go_w, b"x")
            assert _wait_status(root) == 0
            tree.wait_settled(SETTLE_SECONDS)
            assert seen_before_release == 2
            assert tree.sigsys_deaths() == 1
    finally:
        with contextlib.suppress(OSError):
            os.write(go_w, b"x")  # never leave the root blocked on a failed assertion
        for fd in (done_r, done_w, go_r, go_w):
            os.close(fd)


def test_wait_settled_returns_once_the_root_exits_and_fails_closed_before(
    watch: TreeWatch,
) -> None:
    go_r, go_w = os.pipe()

    def root_body() -> int:
        os.read(go_r, 1)
        return 0

    root = _fork(root_body)
    with watch.track(root) as tree:
        assert tree.wait_settled_result(0.2) is SettleStatus.TIMED_OUT
        with pytest.raises(StepFailedError, match="members still running"):
            tree.wait_settled(0.1)
        os.write(go_w, b"x")
        assert _wait_status(root) == 0
        started = time.monotonic()
        tree.wait_settled(SETTLE_SECONDS)
        assert time.monotonic() - started < 1.0
    os.close(go_r)
    os.close(go_w)


def test_root_forked_before_the_watcher_is_never_settled() -> None:
    go_r, go_w = os.pipe()

    def root_body() -> int:
        os.read(go_r, 1)
        return 0

    root = _fork(root_body)
    with TreeWatch.start() as late, late.track(root) as tree:
        os.write(go_w, b"x")
        assert _wait_status(root) == 0
        assert tree.wait_settled_result(0.3) is SettleStatus.ROOT_NOT_SEEN
        with pytest.raises(StepFailedError, match="fork of its root was never seen"):
            tree.wait_settled(0.1)
    os.close(go_r)
    os.close(go_w)


def test_multithreaded_process_killed_by_sigsys_counts_once(watch: TreeWatch) -> None:
    def threaded() -> int:
        stop = threading.Event()
        for _ in range(3):
            threading.Thread(target=stop.wait, daemon=True).start()
        return _sigsys_self()

    root = _fork(_reap_child_running(threaded))
    with watch.track(root) as tree:
        assert _wait_status(root) == 0
        tree.wait_settled(SETTLE_SECONDS)
        assert tree.signal_deaths() == {SIGSYS: 1}


def test_execve_from_a_non_main_thread_keeps_the_process_in_the_tree(watch: TreeWatch) -> None:
    shell = shutil.which("sh")
    assert shell is not None

    def exec_from_thread() -> int:
        _no_core()
        script = "sh -c 'kill -SYS $$'; exit 0"
        worker = threading.Thread(target=os.execv, args=(shell, [shell, "-c", script]))
        worker.start()
        worker.join()
        return 1  # not reached: the execve replaced the whole process

    root = _fork(_reap_child_running(exec_from_thread))
    with watch.track(root) as tree:
        assert _wait_status(root) == 0
        tree.wait_settled(SETTLE_SECONDS)
        assert tree.sigsys_deaths() == 1


def test_pid_namespace_teardown_is_waited_for(watch: TreeWatch) -> None:
    unshare = shutil.which("unshare")
    assert unshare is not None
    # The namespace init (sh) leaves a violating child's parent and a
    # sleeper behind; the kernel kills the sleeper when the init exits.
    script = "sh -c 'sh -c \"kill -SYS \\$\\$\"; exit 0'; sleep 60 & exit 0"

    def run_namespace() -> int:
        _no_core()
        argv = [unshare, "--pid", "--fork", "sh", "-c", script]
        return subprocess.run(argv, check=False).returncode

    root = _fork(run_namespace)
    with watch.track(root) as tree:
        assert _wait_status(root) == 0
        tree.wait_settled(SETTLE_SECONDS)
        deaths = tree.signal_deaths()
        assert deaths[SIGSYS] == 1
        assert deaths[signal.SIGKILL] == 1  # the sleeper, killed with the namespace


def test_overflow_marks_tracked_trees_lost() -> None:
    go_r, go_w = os.pipe()

    def root_body() -> int:
        os.read(go_r, 1)
        return 0

    with TreeWatch.start(receive_buffer_bytes=4096) as small:
        root = _fork(root_body)
        tree = small.track(root)
        with small._lock:  # the reader stalls while the kernel keeps sending
            for pid in [_fork(lambda: 0) for _ in range(256)]:
                os.waitpid(pid, 0)
        os.write(go_w, b"x")
        assert _wait_status(root) == 0
        assert tree.wait_settled_result(SETTLE_SECONDS) is SettleStatus.EVENTS_LOST
        assert tree.lost_events
        assert small.overflow_count >= 1
        with pytest.raises(StepFailedError, match="process events were lost"):
            tree.wait_settled(0.1)
        tree.close()
    os.close(go_r)
    os.close(go_w)


def test_closed_watcher_refuses_to_track() -> None:
    started = TreeWatch.start()
    started.close()
    started.close()  # idempotent
    with pytest.raises(SandboxSetupError, match="watcher stopped"):
        started.track(os.getpid())


# -- wire format ----------------------------------------------------------------

_HEADER = struct.Struct("=IHHII")
_CN = struct.Struct("=IIIIHH")


def _message(what: int, data: bytes, *, idx: int = 1, ack: int = 0) -> bytes:
    # proc_event: what, cpu, 8-aligned u64 timestamp, then the union at 16,
    # padded to the kernel's 40 bytes.
    event = struct.pack("=IIQ", what, 3, 123_456_789) + data
    event += bytes(40 - len(event))
    body = _CN.pack(idx, 1, 9, ack, len(event), 0) + event
    return _HEADER.pack(_HEADER.size + len(body), 3, 0, 0, 0) + body


def test_parse_messages_known_answer() -> None:
    data = b"".join(
        (
            _message(PROC_EVENT_FORK, struct.pack("=iiii", 10, 10, 11, 12)),
            _message(PROC_EVENT_EXEC, struct.pack("=ii", 12, 12)),
            _message(PROC_EVENT_EXIT, struct.pack("=iiIIii", 12, 12, 31 | 0x80, 17, 10, 10)),
            _message(PROC_EVENT_NONE, struct.pack("=I", 1), ack=1001),
            _message(0x200, b"comm"),  # PROC_EVENT_COMM: not used, skipped
            _message(PROC_EVENT_FORK, struct.pack("=iiii", 1, 1, 2, 2), idx=2),  # other connector
        )
    )
    assert parse_messages(data) == [
        ProcEvent(PROC_EVENT_FORK, 123_456_789, pid=11, tgid=12, parent_tgid=10),
        ProcEvent(PROC_EVENT_EXEC, 123_456_789, pid=12, tgid=12),
        ProcEvent(PROC_EVENT_EXIT, 123_456_789, pid=12, tgid=12, parent_tgid=10, code=0x9F),
        ProcEvent(PROC_EVENT_NONE, 123_456_789, code=1, ack=1001),
    ]


@pytest.mark.parametrize(
    "cut", [1, _HEADER.size, _HEADER.size + _CN.size + 10, 75], ids=lambda n: f"first-{n}-bytes"
)
def test_parse_messages_drops_truncated_messages(cut: int) -> None:
    whole = _message(PROC_EVENT_FORK, struct.pack("=iiii", 10, 10, 11, 11))
    assert parse_messages(whole[:cut]) == []


# -- membership state machine (synthetic events) ----------------------------------

ROOT = 100


def _fork_event(parent: int, child: int, *, thread_of: int = 0, ns: int = 1) -> ProcEvent:
    return ProcEvent(PROC_EVENT_FORK, ns, pid=child, tgid=thread_of or child, parent_tgid=parent)


def _exit_event(tid: int, tgid: int, status: int, parent: int, *, ns: int = 1) -> ProcEvent:
    return ProcEvent(PROC_EVENT_EXIT, ns, pid=tid, tgid=tgid, parent_tgid=parent, code=status)


def _state(*events: ProcEvent) -> _TreeState:
    state = _TreeState(ROOT)
    for event in (_fork_event(1, ROOT), *events):
        state.apply(event)
    return state


def test_events_before_the_roots_fork_belong_to_an_earlier_owner_of_its_pid() -> None:
    state = _TreeState(ROOT)
    for event in (_fork_event(ROOT, 101), _exit_event(ROOT, ROOT, 0, 1)):
        state.apply(event)
    assert state.status() is None
    state.apply(_fork_event(1, ROOT))
    assert state.live.keys() == {ROOT}


def test_the_roots_own_death_is_not_counted() -> None:
    state = _state(_exit_event(ROOT, ROOT, signal.SIGSYS, 1))
    assert state.deaths == {}
    assert state.status() is SettleStatus.SETTLED


def test_main_thread_exiting_first_keeps_the_process_a_member() -> None:
    state = _state(
        _fork_event(ROOT, 101),
        _fork_event(ROOT, 102, thread_of=101),
        _exit_event(101, 101, 0, ROOT),  # main thread gone, thread 102 still runs
        _fork_event(101, 103),  # forked by thread 102: parent tgid 101
        _exit_event(103, 103, signal.SIGSYS, 101),
    )
    assert state.deaths == {SIGSYS: 1}
    assert 101 in state.live
    state.apply(_exit_event(102, 101, 0, ROOT))
    assert 101 not in state.live


def test_stale_main_thread_exit_after_a_threads_execve_is_ignored() -> None:
    # Thread 102 of process 101 calls execve: the kernel kills the main
    # thread; its exit (built at ns=5) can arrive after the exec (ns=6).
    state = _state(
        _fork_event(ROOT, 101, ns=2),
        _fork_event(ROOT, 102, thread_of=101, ns=3),
        ProcEvent(PROC_EVENT_EXEC, 6, pid=101, tgid=101),
        _exit_event(101, 101, 0, ROOT, ns=5),
        _fork_event(101, 104, ns=7),
        _exit_event(104, 104, signal.SIGSYS, 101, ns=8),
    )
    assert 101 in state.live
    assert state.deaths == {SIGSYS: 1}


def test_reused_pid_with_an_unreported_exit_is_inconsistent() -> None:
    state = _state(_fork_event(ROOT, 101), _fork_event(1, 101))
    assert state.status() is SettleStatus.INCONSISTENT


def test_descendant_exit_reported_after_the_inits_exit_is_waited_for() -> None:
    # The kernel sends a task's exit event after its parent may have reaped
    # it (the parent fields are then 0): the init's own event can come first.
    state = _state(_fork_event(ROOT, 101), _exit_event(ROOT, ROOT, 0, 1))
    assert state.status() is None
    state.apply(_exit_event(101, 101, signal.SIGKILL, 0))
    assert state.status() is SettleStatus.SETTLED
    assert state.deaths == {signal.SIGKILL: 1}


def test_thread_creation_is_not_a_new_member() -> None:
    state = _state(_fork_event(ROOT, 101, thread_of=ROOT))
    assert state.descendants == 0
    assert state.live[ROOT].threads == {101}
