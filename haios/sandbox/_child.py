# SPDX-License-Identifier: Apache-2.0
"""The sandbox child: the step's namespace init, confining itself stage by stage.

The parent forks this code as PID 1 of a fresh PID namespace (`_spawn.py`).
It confines *itself* completely, in the order below, and only then starts
the step with posix_spawn(3) (vfork + execve: no second Python fork), so the
step inherits every restriction and the init stays behind as the
namespace's reaper. Any failure writes "<stage>: <reason>" to the
close-on-exec report pipe and exits before the step exists; the parent then
raises `SandboxSetupError`. There is no "continue anyway" path.

  1  parent-death signal, then check the parent still holds the report pipe:
     if the engine dies, the init dies and the kernel kills the namespace.
  2  reset every signal disposition to default and empty the mask: an
     inherited SIG_IGN survives execve (Python ignores SIGPIPE and SIGXFSZ),
     and an init without handlers ignores signals sent from inside its
     namespace, which protects it from the step.
  3  setsid: new session, no controlling terminal (TIOCSTI has no target, no
     job-control signals from the engine's terminal).
  4  move the pipes and channels above 100 and close every other inherited
     descriptor, before any other stage can touch one (T-S08).
  5  join the step's cgroups (kill, memory, processes) while still root and in the host cgroup
     namespace, so every process of the step is accounted and killable.
  6  unshare mount, IPC, UTS, cgroup and network namespaces (network unless
     the profile sets the unsafe host network); after 5, so the cgroup
     namespace is rooted at the step's cgroup.
  7  network: in the fresh network namespace, bring loopback up, add the
     address endpoints to it, create one listener per allowed endpoint and
     send them to the engine over the egress channel, then close every copy
     (netns.py). Needs CAP_NET_ADMIN and CAP_NET_BIND_SERVICE, so before 14;
     before 17 so the step never holds a listener or the channel.
  8  hostname of the private UTS namespace (no host name leaks).
  9  filesystem view and pivot_root (needs root, so before 14; /proc is
     mounted here because this process is in the new PID namespace); the
     view's /etc/hosts names only the endpoints of 7.
  10 stdio: /dev/null of the view on 0, the output pipes on 1 and 2 (the
     step inherits them).
  11 working directory = the workspace (HOME), umask 022.
  12 resource limits, while still root and before the uid change, so the
     kernel checks RLIMIT_NPROC at setresuid against the step's limit.
  13 empty the capability bounding and ambient sets (needs CAP_SETPCAP,
     lost with the uid change).
  14 setgroups([]), setresgid, setresuid: groups and gid first, they need
     CAP_SETGID which the uid change removes.
  15 clear the inheritable capabilities (the uid change does not) and read
     uid, gid, groups and capabilities back; make the init non-dumpable so
     the step, same uid, cannot ptrace it or read its memory; re-arm the
     parent-death signal, which the uid change cleared.
  16 no_new_privs: execve can never add privileges (setuid bits, file
     capabilities); also what lets an unprivileged process load filters.
  17 seccomp last: the floor filter, then the profile filter. Everything
     after it (posix_spawn, wait4, write, exit) is allowed by every profile
     (the lint requires it).
  18 posix_spawn the step with exactly the engine's environment; an execve
     failure comes back as its return value and is reported.
  19 drop the init's copies of the step's pipes, close the report pipe (EOF
     tells the parent the step runs), reap every process that ends up in the
     namespace; when the step exits, write its wait status and exit: the
     kernel then kills whatever is left in the namespace.

In the launcher the init is forked ahead of its step (`await_launch`): it
sets its parent-death signal, closes every descriptor it inherited but its
request channel, unshares the previous request's mount, IPC, UTS and
network namespaces (fresh and empty: the costliest system call of a launch,
the network namespace, leaves the step's path), assembles the host part of
the previous request's filesystem view in its private mount namespace
(`mounts.prepare_view`: no descriptor of any step is involved), goes once
through the decoding of the previous request (so that the pages it writes
are copied from the launcher before the engine waits on them), and blocks
until its own request arrives; then it runs the stages above exactly as a
freshly forked init does, stage 6 unsharing only what is left (the cgroup
namespace always, since it must follow stage 5) and stage 9 finishing the
view, or dropping it and building the request's own when their host parts
differ. The launcher hands a request only to an init whose namespaces ahead
are exactly the request's minus the cgroup one, and stage 6 checks it
again: never more, never fewer namespaces than the plan.

Imported in the engine and in the launcher; does I/O only when run.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import fcntl
import gc
import json
import mmap
import os
import resource
import select
import signal
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

from haios.sandbox import _libc, fds, mounts, netns, privs, rlimits
from haios.sandbox._launchplan import LaunchPlan, from_wire
from haios.sandbox.spec import VIEW_WORKSPACE

#: exit status of an init that failed before the step started
EXIT_SETUP_FAILED: Final = 125
#: descriptors are moved at or above this number (stage 4)
FD_FLOOR: Final = 100
REPORT_MAX_BYTES: Final = 1024
STATUS_FORMAT: Final = "<i"
#: largest launch request, in bytes
REQUEST_MAX_BYTES: Final = 4 * 1024 * 1024
#: a request's descriptors: stdout, stderr, report, status; then the egress
#: channel when it has one; then the step's filesystems (workspace, cost, secret)
PIPE_FDS: Final = 4
MAX_EGRESS: Final = 1
MAX_STEP_FS: Final = 3
MAX_REQUEST_FDS: Final = PIPE_FDS + MAX_EGRESS + MAX_STEP_FS
#: what a waiting init writes of its receive buffer ahead (requests are ~10 KiB)
REQUEST_TOUCH_BYTES: Final = 32 * 1024

Stage = tuple[str, Callable[[], None]]


@dataclasses.dataclass(frozen=True)
class ChildFds:
    """The pipe ends the child writes to.

    Attributes:
        stdout_w: the step's stdout (drained by the parent).
        stderr_w: the step's stderr (drained by the parent).
        report_w: close-on-exec pipe for a setup failure reason; EOF
            without data means the step started.
        status_w: the init writes the step's wait status here.
        workspace: the step's workspace filesystem (a detached mount).
        cost: the step's cost-report filesystem (a detached mount).
        secret: the step's token filesystem (a detached mount), or -1.
        egress: the egress channel the listeners are sent over, or -1.
    """

    stdout_w: int
    stderr_w: int
    report_w: int
    status_w: int
    workspace: int = -1
    cost: int = -1
    secret: int = -1
    egress: int = -1


def child_fds(request: dict[str, Any], received: Sequence[int]) -> ChildFds:
    """Name the descriptors of a launch request (see `_launcher_main`).

    Args:
        request: the decoded request; its "egress" (0 or 1) and "mounts"
            say how many of each follow the four pipes.
        received: the pipes, the egress channel, the step's filesystems.

    Raises:
        ValueError: the counts do not match the descriptors.
        KeyError: "mounts" is missing.
    """
    egress = request.get("egress", 0)
    step_fs = list(received[PIPE_FDS + egress:]) if egress in (0, 1) else []
    if (
        egress not in (0, 1)
        or request["mounts"] != len(step_fs)
        or not 2 <= len(step_fs) <= MAX_STEP_FS
    ):
        raise ValueError("descriptor count does not match the request")
    step_fs += [-1] * (MAX_STEP_FS - len(step_fs))
    return ChildFds(
        stdout_w=received[0], stderr_w=received[1], report_w=received[2],
        status_w=received[3], workspace=step_fs[0], cost=step_fs[1], secret=step_fs[2],
        egress=received[PIPE_FDS] if egress else -1)


class RequestBuffer:
    """A reused receive buffer for launch requests.

    A private anonymous mapping of REQUEST_MAX_BYTES: only the pages messages
    reach are ever touched, and no allocation of that size is made per
    request.
    """

    def __init__(self) -> None:
        """Map the buffer (no page is touched yet).

        Side Effects:
            Maps memory.
        """
        # Private: a forked init gets its own copy, never the launcher's pages.
        self._view = mmap.mmap(-1, REQUEST_MAX_BYTES, flags=mmap.MAP_PRIVATE)

    def touch(self, size: int) -> None:
        """Write the first `size` bytes' pages now (a forked copy then owns them).

        Side Effects:
            Faults the pages in.
        """
        for offset in range(0, min(size, REQUEST_MAX_BYTES), mmap.PAGESIZE):
            self._view[offset] = 0

    def receive(self, sock: socket.socket, max_fds: int) -> tuple[bytes, list[int], int]:
        """One message and its descriptors, as `socket.recv_fds` returns them.

        Returns:
            The message, the descriptors (the caller owns them) and the
            recvmsg flags (MSG_TRUNC, MSG_CTRUNC tell of a cut message).

        Raises:
            OSError: recvmsg failed.
        """
        fds = array.array("i")
        size, ancillary, flags, _addr = sock.recvmsg_into(
            [self._view], socket.CMSG_LEN(max_fds * fds.itemsize)
        )
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        return self._view[:size], list(fds), flags


def _report(fd: int, stage: str, exc: BaseException) -> None:
    message = f"{stage}: {exc}".encode(errors="replace")[:REPORT_MAX_BYTES]
    try:
        os.write(fd, message)
    except OSError:
        # The parent is gone; exiting is all that is left to do.
        return


#: the ChildFds fields, in order (stage 4 walks them all)
_FD_FIELDS: Final = tuple(field.name for field in dataclasses.fields(ChildFds))


class _Init:
    """The init's state between stages; one method per stage.

    `signals`, when given, are the signals whose disposition is not the
    default, read by the launcher right before it forked this process
    (dispositions are inherited as they are, and nothing since changed
    one); stage 2 then need not read /proc/self/status.
    """

    def __init__(
        self,
        plan: LaunchPlan,
        pipes: ChildFds,
        signals: frozenset[int] | None = None,
        unshared: int = 0,
        prepared_view: tuple[object, ...] | None = None,
    ) -> None:
        self.plan = plan
        self.pipes = pipes
        self.signals = signals
        self.unshared = unshared
        self.prepared_view = prepared_view
        self.null_fd = -1
        self.programs: tuple[tuple[_libc.SockFprog, object], ...] = ()
        self.request: _libc.SpawnRequest | None = None

    def parent_death_signal(self) -> None:
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # getppid() is 0 across the PID namespace boundary, so look at the
        # report pipe instead: its read end closes when the parent dies.
        # (In launcher mode the engine holds the read end: the launcher's
        # death is then caught by the signal alone.)
        poller = select.poll()
        poller.register(self.pipes.report_w, select.POLLOUT)
        for _fd, events in poller.poll(0):
            if events & (select.POLLERR | select.POLLHUP):
                os._exit(EXIT_SETUP_FAILED)

    def reset_signals(self) -> None:
        if self.signals is None:
            fds.reset_signals()
            return
        # fds.reset_signals over the set read earlier: dispositions first,
        # then the mask.
        for signum in sorted(self.signals):
            if signum in fds._UNCATCHABLE or signum in fds._GLIBC_RESERVED:
                continue
            try:
                _libc.reset_signal_disposition(signum)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

    def new_session(self) -> None:
        os.setsid()

    def close_inherited(self) -> None:
        pipes = tuple(getattr(self.pipes, name) for name in _FD_FIELDS)
        # Move the pipes high, but below the engine's soft descriptor limit:
        # F_DUPFD fails with EINVAL at or above it.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        floor = min(FD_FLOOR, max(3, soft - len(pipes) - 1))
        moved = [
            -1 if fd < 0 else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor + index)
            for index, fd in enumerate(pipes)
        ]
        self.pipes = ChildFds(*moved)
        fds.close_fds_except(tuple(fd for fd in moved if fd >= 0))

    def join_cgroup(self) -> None:
        for cgroup in self.plan.cgroups:
            fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    def unshare_namespaces(self) -> None:
        # Namespaces unshared while waiting (if any) must be exactly the
        # plan's, less the cgroup one (which must follow stage 5).
        if self.unshared not in (0, ahead_namespaces(self.plan.namespaces)):
            raise OSError(errno.EINVAL, "namespaces unshared ahead differ from the plan's")
        _libc.unshare(self.plan.namespaces & ~self.unshared)

    def network(self) -> None:
        netns.apply_network(self.plan.network, self.pipes.egress)
        # Sent and closed (or never used): nothing of it may reach the step.
        pipes = self.pipes
        self.pipes = ChildFds(pipes.stdout_w, pipes.stderr_w, pipes.report_w, pipes.status_w,
                              pipes.workspace, pipes.cost, pipes.secret, egress=-1)

    def set_hostname(self) -> None:
        _libc.sethostname(self.plan.hostname)

    def build_view(self) -> None:
        pipes = self.pipes
        step_fs = mounts.StepFsFds(pipes.workspace, pipes.cost, pipes.secret)
        if self.prepared_view is not None:
            if self.prepared_view == mounts.host_part(self.plan.view):
                mounts.finish_view(self.plan.view, step_fs)
                return
            # Assembled for another view while waiting: start this one afresh.
            mounts.discard_prepared_view()
        mounts.apply_view(self.plan.view, step_fs)

    def stdio(self) -> None:
        self.null_fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        os.dup2(self.null_fd, 0)
        os.dup2(self.pipes.stdout_w, 1)
        os.dup2(self.pipes.stderr_w, 2)

    def workdir(self) -> None:
        os.chdir(VIEW_WORKSPACE)
        os.umask(self.plan.umask)

    def limits(self) -> None:
        rlimits.apply_rlimits(self.plan.rlimits)

    def capability_sets(self) -> None:
        privs.drop_capability_sets(self.plan.cap_last_cap)

    def identity(self) -> None:
        privs.apply_identity(self.plan.uid, self.plan.gid)

    def capabilities(self) -> None:
        privs.clear_capabilities()
        privs.verify_dropped(self.plan.uid, self.plan.gid)
        _libc.prctl(_libc.PR_SET_DUMPABLE, 0)
        # The uid change cleared the parent-death signal: arm it again, then
        # re-check the parent in case it died in between.
        self.parent_death_signal()

    def no_new_privs(self) -> None:
        privs.apply_no_new_privs()

    def seccomp(self) -> None:
        # Prepared before loading: after the profile filter only the calls
        # every profile allows may happen. Floor first, since the profile
        # filter need not allow seccomp(2).
        self.programs = tuple(_libc.make_fprog(bpf) for bpf in self.plan.seccomp)
        self.request = _libc.SpawnRequest(
            self.plan.argv[0], list(self.plan.argv), list(self.plan.env)
        )
        for program, _buffer in self.programs:
            _libc.seccomp_set_filter(program)

    def start_step(self) -> int:
        if self.request is None:
            raise OSError(22, "the step was not prepared")
        return self.request.spawn()

    def release_step_fds(self) -> None:
        # The step holds its own copies; the init keeps none of its output.
        os.dup2(self.null_fd, 1)
        os.dup2(self.null_fd, 2)
        for fd in (self.pipes.stdout_w, self.pipes.stderr_w, self.null_fd, self.pipes.report_w):
            os.close(fd)

    def reap(self, step_pid: int) -> NoReturn:
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == step_pid:
                break
        os.write(self.pipes.status_w, struct.pack(STATUS_FORMAT, status))
        os._exit(0)


def _run_stages(stages: list[Stage], report_fd: Callable[[], int]) -> None:
    for name, action in stages:
        try:
            action()
        except OSError as exc:
            _report(report_fd(), name, exc)
            os._exit(EXIT_SETUP_FAILED)


def _stages(init: _Init) -> list[Stage]:
    return [
        ("1 parent-death signal", init.parent_death_signal),
        ("2 reset signals", init.reset_signals),
        ("3 new session", init.new_session),
        ("4 close inherited descriptors", init.close_inherited),
        ("5 join cgroup", init.join_cgroup),
        ("6 unshare namespaces", init.unshare_namespaces),
        ("7 network", init.network),
        ("8 hostname", init.set_hostname),
        ("9 filesystem view", init.build_view),
        ("10 stdio", init.stdio),
        ("11 working directory", init.workdir),
        ("12 resource limits", init.limits),
        ("13 capability bounding/ambient sets", init.capability_sets),
        ("14 groups, gid, uid", init.identity),
        ("15 clear capabilities", init.capabilities),
        ("16 no_new_privs", init.no_new_privs),
        ("17 seccomp", init.seccomp),
    ]


def ahead_namespaces(namespaces: int) -> int:
    """The part of `namespaces` an init may unshare before its request:
    all but the cgroup namespace, which is rooted where the init stands
    when it unshares it (stage 6 after stage 5)."""
    return namespaces & ~_libc.CLONE_NEWCGROUP


def run_init(
    plan: LaunchPlan, pipes: ChildFds, signals: frozenset[int] | None = None,
    unshared: int = 0, prepared_view: tuple[object, ...] | None = None,
) -> NoReturn:
    """Be the namespace init of one step; never returns.

    Args:
        plan: what to run and how to confine it.
        pipes: the pipe ends this process writes to.
        signals: see `_Init` (None: stage 2 reads them itself).
        unshared: the namespaces this init unshared while it waited (0: none).
        prepared_view: `mounts.host_part` of the view this init assembled
            while it waited (`mounts.prepare_view`), or None.

    Side Effects:
        Everything in the module docstring; ends with os._exit.
    """
    init = _Init(plan, pipes, signals, unshared, prepared_view)
    try:
        # No collection in the child: it would touch (and copy) every page.
        gc.disable()
        _run_stages(_stages(init), lambda: init.pipes.report_w)
        if plan.dry_run:
            # Fully confined, nothing executed: report a clean exit.
            os.write(init.pipes.status_w, struct.pack(STATUS_FORMAT, 0))
            os._exit(0)
        try:
            step_pid = init.start_step()
        except OSError as exc:
            _report(init.pipes.report_w, "18 start step (execve)", exc)
            os._exit(EXIT_SETUP_FAILED)
        init.release_step_fds()
        init.reap(step_pid)
    except BaseException as exc:
        # Deliberately broad: a forked child must never unwind into the
        # engine's stack (or run its atexit handlers); report and exit.
        _report(init.pipes.report_w, "internal", exc)
    os._exit(EXIT_SETUP_FAILED)


def _decode_rehearsal(message: bytes | None) -> LaunchPlan | None:
    """The plan of an earlier request (the launcher's last), or None when
    there is none or it does not decode: the real request is decoded and
    checked from scratch either way."""
    if message is None:
        return None
    try:
        return from_wire(json.loads(message)["plan"])
    except Exception:  # any undecodable rehearsal: nothing is prepared ahead
        return None


def _rehearse(plan: LaunchPlan) -> None:
    """Prepare an earlier request's step, then drop the result.

    Performance only, while nothing waits for this init: after fork every
    page shared with the launcher is copied on its first write, and the
    decoding and preparation of the real request would take those faults
    while the engine waits. Going through the same code once (json and the
    plan's dataclasses in `_decode_rehearsal`, then ctypes buffers here; no
    system call with an effect) copies the allocator's and the
    interpreter's pages now. Any failure is ignored.
    """
    try:
        init = _Init(plan, ChildFds(-1, -1, -1, -1))
        _stages(init)
        init.programs = tuple(_libc.make_fprog(bpf) for bpf in plan.seccomp)
        init.request = _libc.SpawnRequest(plan.argv[0], list(plan.argv), list(plan.env))
    except Exception:  # noqa: S110  # nothing depends on it
        pass


def _prepare_view_ahead(plan: LaunchPlan | None, namespaces: int) -> tuple[object, ...] | None:
    """Assemble the host part of an earlier request's view, in the private
    mount namespace unshared ahead; return its `mounts.host_part`, or None
    (no such namespace, or no earlier request).

    Raises:
        OSError: a mount failed (the caller exits; nothing is half-used).
    """
    if plan is None or not namespaces & _libc.CLONE_NEWNS:
        return None
    mounts.prepare_view(plan.view)
    return mounts.host_part(plan.view)


def await_launch(
    channel: socket.socket,
    buffer: RequestBuffer,
    signals: frozenset[int],
    rehearsal: bytes | None,
    namespaces: int = 0,
) -> NoReturn:
    """Be a pre-forked init: wait for one launch request, then run it; never returns.

    Args:
        channel: this end of the launcher's request channel (made by the
            launcher before the fork), the one descriptor kept. The request
            is the engine's JSON launch request with its descriptors minus
            the reply socket (`child_fds`). End of file (the launcher let
            this init go) exits 0.
        buffer: the launcher's receive buffer, inherited.
        signals: the signals whose disposition is not the default, read by
            the launcher right before the fork (this process inherited
            exactly those; nothing here changes one): what stage 2 resets.
        rehearsal: an earlier request, decoded once while waiting to
            prepare its view ahead and to `_rehearse` it, or None.
        namespaces: the namespaces to unshare while waiting
            (`ahead_namespaces` of the request the launcher expects), or 0.

    Side Effects:
        As `run_init` once the request is in; ends with os._exit.
    """
    report = -1
    try:
        gc.disable()
        # Die with the launcher. If it died before this, its end of the
        # channel is closed and the receive below sees end of file.
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # Hold nothing of the launcher's (its control socket, other steps'
        # descriptors) while waiting.
        fds.close_fds_except((channel.fileno(),))
        if namespaces != ahead_namespaces(namespaces):
            raise ValueError("the cgroup namespace cannot be unshared ahead")
        if namespaces:
            # Fresh, empty namespaces. On failure this init exits, and the
            # launcher, unable to hand the request over, forks one on the spot.
            _libc.unshare(namespaces)
        ahead = _decode_rehearsal(rehearsal)
        prepared_view = _prepare_view_ahead(ahead, namespaces)
        poller = select.poll()
        poller.register(channel, select.POLLIN)
        if ahead is not None and not poller.poll(0):
            buffer.touch(REQUEST_TOUCH_BYTES)
            _rehearse(ahead)
        # The channel stays open (its peer closed) until stage 4 closes it with
        # every other inherited descriptor.
        message, received, flags = buffer.receive(channel, MAX_REQUEST_FDS)
        if len(received) > PIPE_FDS:
            report = received[2]
        if not message and not received:
            os._exit(0)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("launch request truncated")
        request = json.loads(message)
        pipes = child_fds(request, received)
        plan = from_wire(request["plan"])
    except BaseException as exc:
        # Deliberately broad, as in run_init: report (when the request got
        # here) and exit; the step never starts.
        if report >= 0:
            _report(report, "launch request", exc)
        os._exit(EXIT_SETUP_FAILED)
    run_init(plan, pipes, signals, namespaces, prepared_view)
