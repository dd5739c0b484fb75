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
- it forks the init exactly as the engine would (`_spawn.spawn_init`), closes
  its copies of the pipes, and answers on the reply socket with
  ``{"pid": n}`` plus a pidfd, or ``{"error": reason}``;
- when the init exits it reaps it (wait4) and sends
  ``{"status", "cpu_seconds", "max_rss_bytes"}`` on the reply socket.

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
from typing import Final

from haios.errors import SandboxSetupError
from haios.sandbox import _child, _libc, _spawn
from haios.sandbox._launchplan import from_wire

MESSAGE_MAX_BYTES: Final = 4 * 1024 * 1024
REQUEST_FDS: Final = 5
#: the egress channel, when the step has endpoints
MAX_EGRESS: Final = 1
#: workspace, cost and (with a Vault scope) secret filesystems
MAX_STEP_FS: Final = 3
MAX_FDS: Final = REQUEST_FDS + MAX_EGRESS + MAX_STEP_FS


class _Server:
    """The launcher's event loop state."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ, None)
        # pidfd -> (init pid, reply socket)
        self.running: dict[int, tuple[int, socket.socket]] = {}

    def serve(self) -> None:
        while True:
            for key, _mask in self.selector.select():
                if key.data is None:
                    if not self.handle_request():
                        return
                else:
                    self.handle_exit(key.fd)

    def handle_request(self) -> bool:
        try:
            message, fds, flags, _addr = socket.recv_fds(
                self.control, MESSAGE_MAX_BYTES, MAX_FDS
            )
        except OSError:
            return False
        if not message:
            for fd in fds:
                os.close(fd)
            return False
        if flags & socket.MSG_TRUNC or not REQUEST_FDS + 2 <= len(fds) <= MAX_FDS:
            for fd in fds:
                os.close(fd)
            return True
        reply = socket.socket(fileno=fds[0])
        try:
            request = json.loads(message)
            egress = request.get("egress", 0)
            if egress not in (0, 1) or request["mounts"] != len(fds) - REQUEST_FDS - egress:
                raise ValueError("descriptor count does not match the request")
            step_fs = (fds[REQUEST_FDS + egress:] + [-1] * MAX_STEP_FS)[:MAX_STEP_FS]
            pipes = _child.ChildFds(
                stdout_w=fds[1], stderr_w=fds[2], report_w=fds[3], status_w=fds[4],
                workspace=step_fs[0], cost=step_fs[1], secret=step_fs[2],
                egress=fds[REQUEST_FDS] if egress else -1)
            plan = from_wire(request["plan"])
            pid = _spawn.spawn_init(plan, pipes)
        except (SandboxSetupError, KeyError, TypeError, ValueError) as exc:
            self.answer(reply, {"error": str(exc)}, [])
            reply.close()
            return True
        finally:
            for fd in fds[1:]:
                os.close(fd)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            # Without a pidfd the step cannot be supervised: do not let it run.
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.answer(reply, {"error": f"pidfd_open failed ({exc.strerror})"}, [])
            reply.close()
            return True
        self.running[pidfd] = (pid, reply)
        self.selector.register(pidfd, selectors.EVENT_READ, pid)
        self.answer(reply, {"pid": pid}, [pidfd])
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


def main(control_fd: int, parent_pid: int) -> None:
    """Serve the engine until it closes the control socket.

    Args:
        control_fd: this end of the engine's SOCK_SEQPACKET socketpair.
        parent_pid: the engine's pid, to detect that it died before we started.

    Side Effects:
        Forks step inits, reaps them, exits when the engine goes away.
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
