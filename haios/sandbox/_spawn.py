# SPDX-License-Identifier: Apache-2.0
"""Forking the namespace init as PID 1 of a fresh PID namespace, from any thread.

unshare(CLONE_NEWPID) changes only the calling *thread's* "namespace for
children", so the next fork from that thread lands as PID 1 of a new
namespace. Right after the fork the parent thread returns to its original
namespace with setns(2) on a descriptor of it, so the thread's later forks
(and other threads' forks) are unaffected. This avoids an extra process
level: the engine (or the launcher) is the direct parent of the init and can
wait4() it for the tree's rusage.

This module does I/O: it opens /proc/self/ns/pid once and forks.
"""

from __future__ import annotations

import os
import threading

from haios.errors import SandboxSetupError
from haios.sandbox import _child, _libc
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


def spawn_init(plan: LaunchPlan, pipes: _child.ChildFds) -> int:
    """Fork `_child.run_init` as PID 1 of a new PID namespace.

    Args:
        plan: the launch plan.
        pipes: the pipe ends the child writes to (the caller closes its
            copies after this returns).

    Returns:
        The init's pid in the caller's PID namespace.

    Raises:
        SandboxSetupError: the namespace or the fork could not be made.

    Side Effects:
        Forks; briefly changes the calling thread's namespace for children.
    """
    original = _original_pid_namespace()
    try:
        _libc.unshare(_libc.CLONE_NEWPID)
    except OSError as exc:
        raise SandboxSetupError(f"cannot create a PID namespace ({exc.strerror})") from exc
    try:
        pid = os.fork()
        if pid == 0:
            _child.run_init(plan, pipes)
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
