# SPDX-License-Identifier: Apache-2.0
"""The launcher process: a small, single-threaded forker for step inits.

Started by `launcher.Launcher.start` as a fresh interpreter (``python -I -S``)
that imports only this module and the sandbox child code, so forking from it
costs the same whatever the engine's size. It serves one SOCK_SEQPACKET
control socket shared with the engine:

- request: ``{"plan": <LaunchPlan wire form>, "mounts": n, "egress": e}``
  with 5 + e + n descriptors (SCM_RIGHTS): a per-step reply socket, the
  four pipe write ends, the step's egress channel when e is 1 (the init
  sends the step's listeners to the engine over it), and the step's n
  detached filesystems (workspace, cost, secret);
- it decodes the request, then hands it and every descriptor but the reply
  socket to an init forked for it ahead of time (`_spawn.fork_waiting_init`,
  `_child.await_launch`) if that init unshared exactly the request's
  namespaces but the cgroup one while it waited; that init checks the
  request again and reports a bad one on the step's report pipe. Otherwise
  it forks an init with the request (`_spawn.spawn_init`). It closes its copies and
  answers on the reply socket with ``{"pid": n}`` plus a pidfd, or
  ``{"error": reason}``;
- when the init exits it reaps it (wait4) and sends
  ``{"status", "cpu_seconds", "max_rss_bytes"}`` on the reply socket.

While steps follow each other closely (a request within
`WAITING_MAX_SECONDS` of the previous one), the init is forked *before* its
request arrives: right after a step is handed over, the launcher forks the
next one, which prepares itself while the current step runs
(`_child.await_launch`: it unshares the previous request's namespaces but
the cgroup one) and waits. A waiting init older than
`WAITING_MAX_SECONDS` is killed and the next request's init is forked on the
spot: the engine's process-event watcher must still hold the init's fork
event when it learns the pid (it keeps the last 16384 events and ten
seconds), an idle launcher keeps nothing running, and an isolated step does
not share the machine with a fork it will not use. Both ways run the same
stages (`_child.run_init`).

It exits when the engine closes the control socket; its inits have
PR_SET_PDEATHSIG, so the steps die with it. Does I/O (sockets, fork, wait).
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Final, NoReturn

from haios.errors import SandboxSetupError
from haios.sandbox import _child, _libc, _spawn
from haios.sandbox._launchplan import from_wire

#: the reply socket, then what the init gets (`_child.child_fds`)
REQUEST_FDS: Final = 1 + _child.PIPE_FDS
MAX_FDS: Final = 1 + _child.MAX_REQUEST_FDS
#: a waiting init older than this is discarded: far inside the process-event
#: watcher's replay window (treewatch.RING_MAX_EVENTS, RING_MAX_AGE_SECONDS)
WAITING_MAX_SECONDS: Final = 0.5


class _Server:
    """The launcher's event loop state."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.buffer = _child.RequestBuffer()
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ, None)
        # pidfd -> (init pid, reply socket)
        self.running: dict[int, tuple[int, socket.socket]] = {}
        self.waiting: _spawn.WaitingInit | None = None
        # the last request handed over, for the next init to rehearse, its
        # namespaces for that init to unshare ahead, and when it came
        self.last_request: bytes | None = None
        self.last_namespaces = 0
        self.last_request_at = -WAITING_MAX_SECONDS

    def serve(self) -> None:
        try:
            while True:
                for key, _mask in self.selector.select(self.idle_timeout()):
                    if key.data is None:
                        if not self.handle_request():
                            return
                    else:
                        self.handle_exit(key.fd)
                self.expire_waiting()
        finally:
            self.drop_waiting()

    def idle_timeout(self) -> float | None:
        if self.waiting is None:
            return None
        return max(0.0, self.waiting.forked_at + WAITING_MAX_SECONDS - time.monotonic())

    def expire_waiting(self) -> None:
        if self.waiting is not None and self.idle_timeout() == 0.0:
            self.drop_waiting()

    def drop_waiting(self) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.discard()

    def prepare_next(self) -> None:
        """Fork the next step's init now, unless more requests are queued."""
        if self.waiting is not None or self.control_readable():
            return
        try:
            self.waiting = _spawn.fork_waiting_init(
                self.buffer, self.last_request, _child.ahead_namespaces(self.last_namespaces))
        except SandboxSetupError:
            # The next request forks on the spot and reports the failure.
            self.waiting = None

    def control_readable(self) -> bool:
        return any(key.data is None for key, _mask in self.selector.select(0))

    def launch(self, message: bytes, fds: list[int]) -> tuple[int, int]:
        """Start one step's init: the waiting one if it is young enough,
        alive and unshared exactly the request's namespaces ahead (it decodes
        and checks the request itself), else one forked now.

        Returns:
            The init's pid and a pidfd of it.

        Raises:
            SandboxSetupError: no init could be forked.
            KeyError, TypeError, ValueError: the request does not decode.
        """
        request = json.loads(message)
        if not isinstance(request, dict) or not isinstance(request.get("plan"), dict):
            raise ValueError("malformed launch request")
        namespaces = request["plan"].get("namespaces")
        if not isinstance(namespaces, int):
            raise ValueError("malformed launch request: namespaces")
        self.last_namespaces = namespaces
        waiting, self.waiting = self.waiting, None
        if (waiting is not None
                and time.monotonic() - waiting.forked_at < WAITING_MAX_SECONDS
                and waiting.namespaces == _child.ahead_namespaces(namespaces)):
            try:
                waiting.hand_over(message, fds)
            except OSError:
                waiting.discard()  # it died: fork one below
            else:
                return waiting.pid, waiting.pidfd
        elif waiting is not None:
            waiting.discard()
        pipes = _child.child_fds(request, fds)
        pid = _spawn.spawn_init(from_wire(request["plan"]), pipes, single_threaded=True)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            # Without a pidfd the step cannot be supervised: do not let it run.
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise SandboxSetupError(f"pidfd_open failed ({exc.strerror})") from exc
        return pid, pidfd

    def handle_request(self) -> bool:
        try:
            message, fds, flags = self.buffer.receive(self.control, MAX_FDS)
        except OSError:
            return False
        if not message:
            for fd in fds:
                os.close(fd)
            return False
        truncated = flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        if truncated or not REQUEST_FDS + 2 <= len(fds) <= MAX_FDS:
            for fd in fds:
                os.close(fd)
            return True
        # The engine made it with socketpair(AF_UNIX, SOCK_SEQPACKET): saying
        # so spares three system calls.
        reply = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fds[0])
        now = time.monotonic()
        in_burst = now - self.last_request_at < WAITING_MAX_SECONDS
        self.last_request_at = now
        try:
            pid, pidfd = self.launch(message, fds[1:])
            self.last_request = message
        except (SandboxSetupError, KeyError, TypeError, ValueError) as exc:
            self.answer(reply, {"error": str(exc)}, [])
            reply.close()
            return True
        finally:
            for fd in fds[1:]:
                os.close(fd)
        self.running[pidfd] = (pid, reply)
        self.selector.register(pidfd, selectors.EVENT_READ, pid)
        self.answer(reply, {"pid": pid}, [pidfd])
        if in_burst:
            self.prepare_next()
        return True

    def handle_exit(self, pidfd: int) -> None:
        pid, reply = self.running.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _pid, status, usage = os.wait4(pid, 0)
        self.answer(
            reply,
            {
                "status": status,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "max_rss_bytes": usage.ru_maxrss * 1024,
            },
            [],
        )
        reply.close()

    @staticmethod
    def answer(reply: socket.socket, payload: dict[str, object], fds: list[int]) -> None:
        try:
            socket.send_fds(reply, [json.dumps(payload).encode()], fds)
        except OSError:
            # The engine side gave up on this step (and killed it); nothing to tell.
            return


def main(control_fd: int, parent_pid: int) -> NoReturn:
    """Serve the engine until it closes the control socket.

    Args:
        control_fd: this end of the engine's SOCK_SEQPACKET socketpair.
        parent_pid: the engine's pid, to detect that it died before we started.

    Side Effects:
        Forks step inits, reaps them, exits the process (os._exit) when the
        engine goes away.
    """
    # Die with the engine; check for the race where it died already.
    _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        sys.exit(1)
    control = socket.socket(fileno=control_fd)
    socket.send_fds(control, [json.dumps({"ready": os.getpid()}).encode()], [])
    # Keep startup objects out of the collector, so children's collections
    # (and their copy-on-write faults) never touch them.
    gc.freeze()
    _Server(control).serve()
    # Served and every init reaped or discarded; it writes only to sockets,
    # so skip the interpreter's teardown: the engine's close waits for it.
    os._exit(0)
