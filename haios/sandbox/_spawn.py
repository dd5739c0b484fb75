# SPDX-License-Identifier: Apache-2.0
"""Forking the namespace init as PID 1 of a fresh PID namespace, from any thread.

unshare(CLONE_NEWPID) changes only the calling *thread's* "namespace for
children", so the next fork from that thread lands as PID 1 of a new
namespace. Right after the fork the parent thread returns to its original
namespace with setns(2) on a descriptor of it, so the thread's later forks
(and other threads' forks) are unaffected. This avoids an extra process
level: the engine (or the launcher) is the direct parent of the init and can
wait4() it for the tree's rusage.

Two ways in: `spawn_init` forks an init that starts confining itself at once
with the plan it was forked with (the engine's direct mode, and the launcher
when no init waits); `fork_waiting_init` forks one ahead of time that waits
for its launch request (`_child.await_launch`), so that the launcher can
take the fork off the path of the next step.

This module does I/O: it opens /proc/self/ns/pid once and forks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from haios.errors import SandboxSetupError
from haios.sandbox import _child, _libc, fds
from haios.sandbox._launchplan import LaunchPlan

_lock = threading.Lock()
_pid_namespace_fd: list[int] = []


def _original_pid_namespace() -> int:
    """A descriptor of this process's PID namespace, opened once.

    Raises:
        SandboxSetupError: /proc/self/ns/pid cannot be opened.

    Side Effects:
        Opens a close-on-exec descriptor kept for the process lifetime.
    """
    with _lock:
        if not _pid_namespace_fd:
            try:
                _pid_namespace_fd.append(os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise SandboxSetupError(f"cannot open /proc/self/ns/pid ({exc.strerror})") from exc
        return _pid_namespace_fd[0]


def _fork_in_new_pid_namespace(
    child: Callable[[], NoReturn], *, single_threaded: bool = False
) -> int:
    """Fork `child` as PID 1 of a new PID namespace; the parent gets its pid.

    Args:
        child: what the child runs.
        single_threaded: the caller never starts threads (the launcher), so
            the cheaper `_libc.fork_single_threaded` may be used.

    Raises:
        SandboxSetupError: the namespace or the fork could not be made.
    """
    original = _original_pid_namespace()
    try:
        _libc.unshare(_libc.CLONE_NEWPID)
    except OSError as exc:
        raise SandboxSetupError(f"cannot create a PID namespace ({exc.strerror})") from exc
    try:
        if single_threaded and threading.active_count() == 1:
            pid = _libc.fork_single_threaded()
        else:
            pid = os.fork()
        if pid == 0:
            child()
    except OSError as exc:
        raise SandboxSetupError(f"cannot fork the sandbox init ({exc.strerror})") from exc
    finally:
        # Only the parent reaches this (the child ends in os._exit).
        try:
            _libc.setns(original, _libc.CLONE_NEWPID)
        except OSError as exc:
            # This thread would fork every later child into a dead namespace.
            raise SandboxSetupError(
                f"cannot return to the original PID namespace ({exc.strerror})"
            ) from exc
    return pid


def spawn_init(
    plan: LaunchPlan, pipes: _child.ChildFds, *, single_threaded: bool = False
) -> int:
    """Fork `_child.run_init` as PID 1 of a new PID namespace.

    Args:
        plan: the launch plan.
        pipes: the pipe ends the child writes to (the caller closes its
            copies after this returns).
        single_threaded: as for `_fork_in_new_pid_namespace` (the launcher).

    Returns:
        The init's pid in the caller's PID namespace.

    Raises:
        SandboxSetupError: the namespace or the fork could not be made.

    Side Effects:
        Forks; briefly changes the calling thread's namespace for children.
    """
    return _fork_in_new_pid_namespace(
        lambda: _child.run_init(plan, pipes), single_threaded=single_threaded
    )


@dataclasses.dataclass
class WaitingInit:
    """An init forked ahead of its step, blocked on its channel.

    Attributes:
        pid: its pid in the forking process's PID namespace.
        pidfd: a pidfd of it (handed to the engine with the step).
        channel: the forking process's end of the request channel.
        forked_at: `time.monotonic()` of the fork.
        namespaces: the namespaces it unshared while waiting.
    """

    pid: int
    pidfd: int
    channel: socket.socket
    forked_at: float
    namespaces: int = 0

    def hand_over(self, request: bytes, fds: list[int]) -> None:
        """Send the launch request and the step's descriptors, then close the channel.

        Raises:
            OSError: the init is gone (or its channel broken).

        Side Effects:
            Sends descriptors (the caller keeps and closes its copies).
        """
        try:
            socket.send_fds(self.channel, [request], fds)
        finally:
            self.channel.close()

    def discard(self) -> None:
        """Kill and reap it, and close what refers to it.

        Side Effects:
            SIGKILL, waitpid, closes descriptors.
        """
        self.channel.close()
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        finally:
            os.close(self.pidfd)


def fork_waiting_init(
    buffer: _child.RequestBuffer, rehearsal: bytes | None = None, namespaces: int = 0
) -> WaitingInit:
    """Fork `_child.await_launch` as PID 1 of a new PID namespace.

    For the launcher only: it runs a single thread and changes no signal
    disposition after it starts.

    Args:
        buffer: the receive buffer the init inherits and uses.
        rehearsal: an earlier request the init prepares once while it waits
            (`_child._decode_rehearsal`, `_child._rehearse`), or None.
        namespaces: what the init unshares while it waits (all but the
            cgroup namespace, `_child.ahead_namespaces`); it then serves
            only a request whose own ahead part is exactly this.

    Returns:
        The waiting init; hand it a request or discard it.

    Raises:
        SandboxSetupError: no socket pair, namespace, fork or pidfd.

    Side Effects:
        Creates a socket pair, forks, opens a pidfd.
    """
    try:
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
    except OSError as exc:
        raise SandboxSetupError(f"cannot create an init channel ({exc.strerror})") from exc
    # Read here, in the one thread, just before the fork that copies them:
    # the init's dispositions are exactly these (see `_child._Init`).
    signals = frozenset(fds._non_default_signals())
    try:
        pid = _fork_in_new_pid_namespace(
            lambda: _child.await_launch(theirs, buffer, signals, rehearsal, namespaces),
            single_threaded=True,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    forked_at = time.monotonic()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        # Without a pidfd it could not be supervised: never hand it a step.
        ours.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise SandboxSetupError(f"pidfd_open failed ({exc.strerror})") from exc
    return WaitingInit(pid, pidfd, ours, forked_at, namespaces)
