# SPDX-License-Identifier: Apache-2.0
"""Engine side of the pre-started launcher process.

Forking costs time in proportion to the forking process's memory (page
tables and copy-on-write faults). `Launcher.start` spawns a fresh, small
interpreter (``python -I -S``, only the sandbox child code imported) that
forks every step's init on the engine's behalf, so launch cost does not grow
with the engine, and forks the next init while the current step runs, so
the fork is off the next step's path (`_launcher_main`). Pass it to
``NamespaceRunner(launcher=...)``; the confinement is byte-for-byte the same
code (`_child.py`). `Launcher.start` is `PendingLauncher.spawn` then
`wait_ready`; `haios run` calls the two apart, spawning before it imports
the engine and reading the greeting when the run needs the launcher, so
the interpreter's start-up is off the run's path.

Protocol: see `_launcher_main`. Each step gets its own reply socket, so
engine threads never read each other's messages; sends on the shared control
socket are serialised by a lock. The launcher dies with the engine
(PR_SET_PDEATHSIG) and exits when `close` is called; steps it started die
with it. Start it from the engine's main thread: the parent-death signal
fires when the *thread* that started it exits.

Does I/O: starts a process, sockets, descriptors.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final, Self

from haios._util.process import wait_exited
from haios.errors import SandboxSetupError
from haios.sandbox import _supervise
from haios.sandbox._launchplan import LaunchPlan, to_wire
from haios.sandbox.stepfs import StepMounts

REPLY_MAX_BYTES: Final = 65536
START_TIMEOUT_SECONDS: Final = 30.0
#: the launcher answers right after fork; this only bounds a wedged launcher
SPAWN_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 5.0
_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parents[2])
_BOOT: Final = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from haios.sandbox._launcher_main import main; main(int(sys.argv[2]), int(sys.argv[3]))"
)
#: raw wait status of a process killed by SIGKILL
_KILLED_STATUS: Final = 9
#: how long to wait for an orphaned init to finish dying
_ORPHAN_WAIT_SECONDS: Final = 10.0


def _receive(sock: socket.socket, max_fds: int) -> tuple[dict[str, Any], list[int]]:
    message, fds, _flags, _addr = socket.recv_fds(sock, REPLY_MAX_BYTES, max_fds)
    if not message:
        for fd in fds:
            os.close(fd)
        raise EOFError("launcher closed the connection")
    data: dict[str, Any] = json.loads(message)
    return data, fds


class PendingLauncher:
    """A launcher process spawned, its greeting not read yet.

    Spawn it from the main thread (its parent-death signal follows the
    thread that spawned it) and early: nothing of the run goes into it
    until a step. `wait_ready` hands it over to a `Launcher`; until then
    `discard` kills and reaps it (idempotent, a no-op once handed over).
    """

    def __init__(self, process: subprocess.Popen[bytes], control: socket.socket) -> None:
        """Hold a spawned launcher (use `spawn`)."""
        self._process = process
        self._control = control
        self._taken = False

    @classmethod
    def spawn(cls, python: str = sys.executable) -> PendingLauncher:
        """Start the launcher process; do not wait for it.

        Args:
            python: the interpreter to run it with.

        Raises:
            SandboxSetupError: it could not be started.

        Side Effects:
            Starts a process (in its own session) holding one socket.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [
                    python,
                    "-I",
                    "-S",
                    "-c",
                    _BOOT,
                    _PACKAGE_ROOT,
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise SandboxSetupError(f"cannot start the sandbox launcher ({exc.strerror})") from exc
        finally:
            theirs.close()
        return cls(process, ours)

    @property
    def pid(self) -> int:
        """The launcher's pid."""
        return self._process.pid

    def wait_ready(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> Launcher:
        """Wait for the launcher's greeting; it is the returned `Launcher`'s from then on.

        Raises:
            SandboxSetupError: it did not answer, answered wrong, or was
                discarded (a failed one is killed and reaped).

        Side Effects:
            Reads the control socket; may kill the process.
        """
        if self._taken:
            raise SandboxSetupError("sandbox launcher already handed over or discarded")
        self._taken = True
        ours, process = self._control, self._process
        ours.settimeout(timeout_seconds)
        try:
            ready, _fds = _receive(ours, 0)
        except (OSError, EOFError, ValueError) as exc:
            _reap(process, ours)
            raise SandboxSetupError(f"sandbox launcher did not start ({exc})") from exc
        if ready.get("ready") != process.pid:
            _reap(process, ours)
            raise SandboxSetupError("sandbox launcher sent an unexpected greeting")
        ours.settimeout(None)
        return Launcher(process, ours)

    def discard(self) -> None:
        """Kill and reap the launcher unless it was handed over.

        Side Effects:
            Sends SIGKILL, waits, closes the control socket.
        """
        if not self._taken:
            self._taken = True
            _reap(self._process, self._control)


def _reap(process: subprocess.Popen[bytes], control: socket.socket) -> None:
    """Kill a launcher that was never handed a step, reap it, close its socket."""
    process.kill()  # a no-op once reaped
    process.wait()
    control.close()


class Launcher:
    """A running launcher process; use `start`, then pass to `NamespaceRunner`."""

    def __init__(self, process: subprocess.Popen[bytes], control: socket.socket) -> None:
        """Wrap an already started launcher (use `start`)."""
        self._process = process
        self._control = control
        self._send_lock = threading.Lock()

    @classmethod
    def start(cls, python: str = sys.executable) -> Launcher:
        """Start the launcher and wait until it is ready.

        Call it early, from the main thread, before the engine grows.

        Args:
            python: the interpreter to run it with.

        Raises:
            SandboxSetupError: it could not be started or did not answer.

        Side Effects:
            Starts a process (in its own session) holding one socket.
        """
        return PendingLauncher.spawn(python).wait_ready()

    @property
    def pid(self) -> int:
        """The launcher's pid."""
        return self._process.pid

    def spawn(
        self, plan: LaunchPlan, mounts: StepMounts, stack: ExitStack, *, egress_fd: int = -1
    ) -> tuple[_supervise.Spawned, _supervise.ParentEnds]:
        """Have the launcher fork one step's init.

        Args:
            plan: the launch plan.
            mounts: the step's filesystems; clones travel with the request.
            stack: receives the cleanup of every descriptor opened here.
            egress_fd: the step's egress channel (a copy travels with the
                request and goes to the init alone), or -1.

        Returns:
            The running init and the engine's pipe ends.

        Raises:
            SandboxSetupError: the launcher is gone or could not fork.

        Side Effects:
            Creates pipes and sockets; the launcher forks.
        """
        child_ends, parent_ends = _supervise.open_pipes(mounts, egress_fd)
        stack.callback(parent_ends.close)
        reply, remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stack.callback(reply.close)
        step_fs = [fd for fd in (child_ends.workspace, child_ends.cost, child_ends.secret)
                   if fd >= 0]
        egress = [child_ends.egress] if child_ends.egress >= 0 else []
        request = json.dumps({"plan": to_wire(plan), "mounts": len(step_fs),
                              "egress": len(egress)}).encode()
        try:
            with self._send_lock:
                socket.send_fds(
                    self._control,
                    [request],
                    [
                        remote.fileno(),
                        child_ends.stdout_w,
                        child_ends.stderr_w,
                        child_ends.report_w,
                        child_ends.status_w,
                        *egress,
                        *step_fs,
                    ],
                )
        except OSError as exc:
            raise SandboxSetupError(f"sandbox launcher unavailable ({exc.strerror})") from exc
        finally:
            remote.close()
            _supervise.close_child_ends(child_ends)
        reply.settimeout(SPAWN_TIMEOUT_SECONDS)
        try:
            answer, fds = _receive(reply, 1)
        except (OSError, EOFError, ValueError) as exc:
            raise SandboxSetupError(f"sandbox launcher did not answer ({exc})") from exc
        if "error" in answer or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise SandboxSetupError(
                f"step {plan.step_id}: {answer.get('error', 'no pidfd from launcher')}"
            )
        pidfd = fds[0]
        stack.callback(os.close, pidfd)
        reply.settimeout(None)

        def collect() -> _supervise.InitExit:
            try:
                result, _none = _receive(reply, 0)
            except (OSError, EOFError, ValueError):
                # The launcher died; its parent-death signal kills the init
                # and with it the whole namespace. Make sure, and wait until
                # the init has exited (its namespace is then empty).
                _supervise.kill_tree(pidfd, None)
                select.select([pidfd], [], [], _ORPHAN_WAIT_SECONDS)
                return _supervise.InitExit(status=_KILLED_STATUS, cpu_seconds=0.0, max_rss_bytes=0)
            return _supervise.InitExit(
                status=int(result["status"]),
                cpu_seconds=float(result["cpu_seconds"]),
                max_rss_bytes=int(result["max_rss_bytes"]),
            )

        spawned = _supervise.Spawned(
            pid=int(answer["pid"]), pidfd=pidfd, exit_fd=reply.fileno(), collect=collect
        )
        return spawned, parent_ends

    def close(self) -> None:
        """Stop the launcher (running steps die with it) and wait for it.

        Side Effects:
            Closes the control socket; may kill the launcher process.
        """
        self._control.close()
        if not wait_exited(self._process, STOP_TIMEOUT_SECONDS):
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> Self:
        """Use as a context manager that calls `close` on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the launcher."""
        self.close()
