# SPDX-License-Identifier: Apache-2.0
"""Every signal death anywhere in a step's process tree, from the kernel's process events.

Why the init's wait status is not enough: the seccomp filters end in
SECCOMP_RET_KILL_PROCESS, which kills only the offending process (SIGSYS).
The step's init (PID 1 of the step's PID namespace) waits for the step's
main process only; a forked child or grandchild that dies of SIGSYS is
reaped by its own parent (`cmd || true`), so the violation never reaches the
init and the step would be recorded as succeeded.

What this module does: `TreeWatch` subscribes to the Linux process-events
connector (netlink NETLINK_CONNECTOR, CN_IDX_PROC), which reports every fork,
exec and exit on the host with host pids and, for exits, the wait status the
parent sees. One daemon thread reads the socket. `TreeWatch.track(root_pid)`
follows the tree rooted at the step's init; `TrackedTree.signal_deaths()`
counts the member processes (not the root) killed by each signal.

- Membership is decided at fork time: a process forked by a member is a
  member for its whole life. The kernel names the creating process's real
  parent in the fork event, so later reparenting (a parent's death moves
  orphans to the init), setsid and double forks change nothing, and no /proc
  walk can race with the step. Processes (thread groups) are what counts;
  threads are followed only so that a process stays a member while any of
  its threads lives (its main thread may exit first) and across an execve
  made by a non-main thread, which the kernel reports as the main thread's
  exit followed by an exec; an exit built before that exec is recognised by
  its kernel timestamp and ignored.
- The engine learns the init's pid only after the fork, and the init may
  already have forked by then, so a bounded, time-limited ring of recent
  events is replayed from the root's own fork event on `track`. A tree whose
  root fork event is never seen (`track` called too late, or the watcher
  started after the fork) never settles: fail closed.
- A tree has settled when every member, the root included, has reported its
  exit. Waiting only for the root's exit event is not enough: the kernel
  sends a task's exit event after it has notified (and may have been reaped
  by) its parent, so the namespace init's exit event can precede a
  descendant's.
- Overflow: when the receive buffer (16 MiB, SO_RCVBUFFORCE) is full the
  kernel drops events and the next recv fails with ENOBUFS. What was lost
  cannot be known, so every tree tracked at that moment is marked
  `lost_events` and the ring is emptied; the engine must fail such a step
  closed. A member's pid reused before its exit event arrived makes
  attribution ambiguous: the tree is marked inconsistent, also fail closed.
  (The same race with a stranger's pid cannot be seen; see docs/sandbox.md.)

What it does not do: it prevents nothing and kills nothing (seccomp and the
PID namespace do that), and it does not say which system call was refused.
It needs a kernel with CONFIG_PROC_EVENTS and the host's initial user, PID
and network namespaces (the kernel ignores subscriptions from anywhere
else), and root: CAP_NET_ADMIN for the forced buffer size, and to subscribe
at all on older kernels. `TreeWatch.start` refuses otherwise.

`parse_messages` and the per-tree state are pure; `TreeWatch` does I/O (a
netlink socket, a pipe and one thread).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import errno
import itertools
import os
import secrets
import select
import signal
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Final

from haios.errors import InternalError, SandboxSetupError, StepFailedError

# -- kernel ABI (linux/netlink.h, linux/connector.h, linux/cn_proc.h) ---------
NETLINK_CONNECTOR: Final = 11
CN_IDX_PROC: Final = 1
CN_VAL_PROC: Final = 1
PROC_CN_MCAST_LISTEN: Final = 1
PROC_CN_MCAST_IGNORE: Final = 2
PROC_EVENT_NONE: Final = 0x00000000
PROC_EVENT_FORK: Final = 0x00000001
PROC_EVENT_EXEC: Final = 0x00000002
PROC_EVENT_EXIT: Final = 0x80000000
_SO_RCVBUFFORCE: Final = 33
_NLMSG_DONE: Final = 3

# struct nlmsghdr { u32 len; u16 type, flags; u32 seq, pid; }
_NLMSGHDR: Final = struct.Struct("=IHHII")
# struct cn_msg { u32 idx, val, seq, ack; u16 len, flags; u8 data[]; } (20 bytes)
_CN_MSG: Final = struct.Struct("=IIIIHH")
# struct proc_event { u32 what, cpu; u64 timestamp_ns (aligned 8, so at 8);
# union event_data (all 4-byte members, so at 16) }. The offsets are relative
# to the start of proc_event, which follows cn_msg directly on the wire.
_EVENT_HEADER: Final = struct.Struct("=IIQ")
_EVENT_DATA_OFFSET: Final = 16
_FORK: Final = struct.Struct("=iiii")  # parent pid, tgid; child pid, tgid
_EXEC: Final = struct.Struct("=ii")  # process pid, tgid
_EXIT: Final = struct.Struct("=iiIIii")  # pid, tgid, exit_code, signal, parent pid, tgid
_ACK: Final = struct.Struct("=I")  # err
# struct proc_input { u32 mcast_op; u32 event_type; } (Linux >= 6.6: a per-socket filter)
_LISTEN_FILTERED: Final = struct.pack(
    "=II", PROC_CN_MCAST_LISTEN, PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT
)
_LISTEN_ALL: Final = struct.pack("=I", PROC_CN_MCAST_LISTEN)
_IGNORE: Final = struct.pack("=I", PROC_CN_MCAST_IGNORE)
_EVENT_LAYOUTS: Final = {
    PROC_EVENT_NONE: _ACK,
    PROC_EVENT_FORK: _FORK,
    PROC_EVENT_EXEC: _EXEC,
    PROC_EVENT_EXIT: _EXIT,
}

#: receive buffer; a full buffer drops events (ENOBUFS, see module docstring)
RECEIVE_BUFFER_BYTES: Final = 16 * 1024 * 1024
#: one datagram is one 76-byte message; this leaves room for batching
RECV_BYTES: Final = 64 * 1024
#: events kept for the replay on `track` (about 200 bytes each)
RING_MAX_EVENTS: Final = 16384
#: events older than this are not replayed
RING_MAX_AGE_SECONDS: Final = 10.0
#: how long `start` waits for the kernel's acknowledgement of the subscription
ACK_TIMEOUT_SECONDS: Final = 1.0
_THREAD_JOIN_SECONDS: Final = 5.0
#: what SECCOMP_RET_KILL_PROCESS delivers
SIGSYS: Final = int(signal.SIGSYS)


@dataclasses.dataclass(frozen=True, slots=True)
class ProcEvent:
    """One decoded process event.

    Attributes:
        what: PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT, or
            PROC_EVENT_NONE for the acknowledgement of a request.
        timestamp_ns: CLOCK_MONOTONIC nanoseconds when the kernel built it.
        pid: the thread: the new one (fork), the one that exec'd or exited.
        tgid: the process (thread group) that thread belongs to.
        parent_tgid: the creating process's real parent (fork); the real
            parent at exit, or 0 when the task was already reaped (exit);
            else 0.
        code: exit: the wait status; acknowledgement: the errno; else 0.
        ack: the connector message's ack field (acknowledgements only).
    """

    what: int
    timestamp_ns: int
    pid: int = 0
    tgid: int = 0
    parent_tgid: int = 0
    code: int = 0
    ack: int = 0


def _decode_event(what: int, timestamp_ns: int, ack: int, data: bytes, offset: int) -> ProcEvent:
    layout = _EVENT_LAYOUTS[what]
    fields = layout.unpack_from(data, offset)
    if what == PROC_EVENT_FORK:
        _ppid, parent_tgid, child_pid, child_tgid = fields
        return ProcEvent(what, timestamp_ns, child_pid, child_tgid, parent_tgid)
    if what == PROC_EVENT_EXEC:
        return ProcEvent(what, timestamp_ns, fields[0], fields[1])
    if what == PROC_EVENT_EXIT:
        pid, tgid, code, _exit_signal, _ppid, parent_tgid = fields
        return ProcEvent(what, timestamp_ns, pid, tgid, parent_tgid, code)
    return ProcEvent(what, timestamp_ns, code=fields[0], ack=ack)


def _parse_one(data: bytes, offset: int, end: int) -> ProcEvent | None:
    start = offset + _NLMSGHDR.size
    if start + _CN_MSG.size > end:
        return None
    idx, val, _seq, ack, length, _flags = _CN_MSG.unpack_from(data, start)
    event_at = start + _CN_MSG.size
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC) or event_at + length > end:
        return None
    if length < _EVENT_HEADER.size:
        return None
    what, _cpu, timestamp_ns = _EVENT_HEADER.unpack_from(data, event_at)
    layout = _EVENT_LAYOUTS.get(what)
    if layout is None or _EVENT_DATA_OFFSET + layout.size > length:
        return None
    return _decode_event(what, timestamp_ns, ack, data, event_at + _EVENT_DATA_OFFSET)


def parse_messages(data: bytes) -> list[ProcEvent]:
    """Decode one datagram read from a process-events connector socket.

    Args:
        data: the bytes of one recv (one or more netlink messages).

    Returns:
        The fork, exec and exit events and acknowledgements, in order.
        Messages of other connectors, other event kinds (uid, comm, ...) and
        truncated messages are skipped rather than misread.
    """
    events: list[ProcEvent] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, offset)[0]
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        event = _parse_one(data, offset, offset + length)
        if event is not None:
            events.append(event)
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return events


def termination_signal(wait_status: int) -> int:
    """The signal that ended a process, from its wait status; 0 if it exited."""
    return wait_status & 0x7F


class SettleStatus(enum.Enum):
    """How waiting for a tree to settle ended.

    Anything but SETTLED means the deaths are not known to be complete.
    """

    SETTLED = "settled"
    EVENTS_LOST = "events_lost"
    INCONSISTENT = "inconsistent"
    ROOT_NOT_SEEN = "root_not_seen"
    TIMED_OUT = "timed_out"


@dataclasses.dataclass
class _Process:
    """A member process: its other live threads and what was already recorded."""

    threads: set[int] = dataclasses.field(default_factory=set)
    leader_exited: bool = False
    exec_ns: int = 0
    death_counted: bool = False


class _TreeState:
    """Membership and deaths of one tracked tree; pure, guarded by the watcher's lock."""

    def __init__(self, root_pid: int) -> None:
        self.root = root_pid
        self.armed = False
        self.live: dict[int, _Process] = {}
        self.deaths: dict[int, int] = {}
        self.descendants = 0
        self.lost = False
        self.inconsistent: str | None = None
        self.closed = False

    def is_root_fork(self, event: ProcEvent) -> bool:
        return event.what == PROC_EVENT_FORK and event.pid == event.tgid == self.root

    def status(self) -> SettleStatus | None:
        """The final status if there is one yet, else None (still waiting)."""
        if self.lost:
            return SettleStatus.EVENTS_LOST
        if self.inconsistent is not None:
            return SettleStatus.INCONSISTENT
        if self.armed and not self.live:
            return SettleStatus.SETTLED
        return None

    def apply(self, event: ProcEvent) -> None:
        if not self.armed:
            # Everything before the root's own fork concerns other processes
            # (or an earlier owner of the root's pid).
            if self.is_root_fork(event):
                self.armed = True
                self.live[self.root] = _Process()
            return
        if event.what == PROC_EVENT_FORK:
            self._on_fork(event)
        elif event.what == PROC_EVENT_EXEC:
            self._on_exec(event)
        elif event.what == PROC_EVENT_EXIT:
            self._on_exit(event)

    def _on_fork(self, event: ProcEvent) -> None:
        process = self.live.get(event.tgid)
        if event.pid != event.tgid:
            if process is not None:
                process.threads.add(event.pid)
            return
        if process is not None:
            # The pid was freed and reused before its previous owner's exit
            # event arrived: later exits of this pid cannot be attributed.
            self.inconsistent = f"pid {event.tgid} reused before its exit was reported"
            return
        if event.parent_tgid in self.live:
            self.live[event.tgid] = _Process()
            self.descendants += 1

    def _on_exec(self, event: ProcEvent) -> None:
        process = self.live.get(event.tgid)
        if process is None:
            return
        # After execve the process has one thread, the main one, whichever
        # thread called it (the kernel gives that thread the process's pid).
        process.threads.clear()
        process.leader_exited = False
        process.exec_ns = event.timestamp_ns

    def _on_exit(self, event: ProcEvent) -> None:
        process = self.live.get(event.tgid)
        if process is None:
            return
        self._record_death(event.tgid, process, event.code)
        if event.pid != event.tgid:
            process.threads.discard(event.pid)
        elif event.timestamp_ns < process.exec_ns:
            # The main thread replaced by another thread's execve; its exit
            # was built before that exec completed.
            return
        else:
            process.leader_exited = True
        if process.leader_exited and not process.threads:
            del self.live[event.tgid]

    def _record_death(self, tgid: int, process: _Process, wait_status: int) -> None:
        signum = termination_signal(wait_status)
        if signum and tgid != self.root and not process.death_counted:
            # The kernel reports the group's signal for each thread of a
            # killed process: count the process once.
            process.death_counted = True
            self.deaths[signum] = self.deaths.get(signum, 0) + 1


@dataclasses.dataclass(frozen=True, slots=True)
class _RingEntry:
    received: float
    event: ProcEvent


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    deaths: dict[int, int]
    descendants: int
    lost: bool
    inconsistent: str | None


class TreeWatch:
    """A process-events connector subscription and its reader thread.

    Start it once per engine, before the first step (after
    `Launcher.start()`, which must fork before threads exist), and close it
    at shutdown. Thread-safe: one lock guards every tree and the ring.
    """

    def __init__(
        self,
        sock: socket.socket,
        wake: tuple[int, int],
        *,
        ring_max_events: int = RING_MAX_EVENTS,
        ring_max_age_seconds: float = RING_MAX_AGE_SECONDS,
    ) -> None:
        """Wrap an opened, bound socket; use `TreeWatch.start` instead.

        Args:
            sock: a non-blocking NETLINK_CONNECTOR socket bound to CN_IDX_PROC.
            wake: (read end, write end) of a non-blocking pipe that stops the reader.
            ring_max_events: events kept for replay on `track`.
            ring_max_age_seconds: older events are not replayed.
        """
        self._sock = sock
        self._wake_r, self._wake_w = wake
        self._ring_max_age_seconds = ring_max_age_seconds
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ring: collections.deque[_RingEntry] = collections.deque(maxlen=ring_max_events)
        self._trees: list[_TreeState] = []
        self._awaited_ack = -1
        self._ack_error: int | None = None
        self._overflows = 0
        self._failure: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="haios-treewatch", daemon=True)

    @classmethod
    def start(
        cls,
        *,
        receive_buffer_bytes: int = RECEIVE_BUFFER_BYTES,
        ring_max_events: int = RING_MAX_EVENTS,
        ring_max_age_seconds: float = RING_MAX_AGE_SECONDS,
    ) -> TreeWatch:
        """Open the socket, start the reader and subscribe.

        Args:
            receive_buffer_bytes: the socket's receive buffer.
            ring_max_events: events kept for replay on `track`.
            ring_max_age_seconds: older events are not replayed.

        Returns:
            A running watcher.

        Raises:
            SandboxSetupError: the connector is unavailable (kernel without
                CONFIG_PROC_EVENTS, not root, not in the initial namespaces).

        Side Effects:
            Opens a netlink socket and a pipe, starts a daemon thread.
        """
        sock = _open_socket(receive_buffer_bytes)
        try:
            wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            sock.close()
            raise SandboxSetupError(
                f"process events: cannot create a pipe ({exc.strerror})"
            ) from exc
        watch = cls(
            sock, wake, ring_max_events=ring_max_events, ring_max_age_seconds=ring_max_age_seconds
        )
        watch._thread.start()
        try:
            watch._subscribe()
        except SandboxSetupError:
            watch.close()
            raise
        return watch

    @property
    def overflow_count(self) -> int:
        """How many times the receive buffer overflowed since `start`."""
        with self._lock:
            return self._overflows

    def track(self, root_pid: int) -> TrackedTree:
        """Start following the tree rooted at `root_pid` (a host pid).

        Recent events are replayed from the root's fork event, so
        descendants forked before this call are members too.

        Args:
            root_pid: the step init's pid in the engine's PID namespace.

        Returns:
            The tracked tree; close it when the step is recorded.

        Raises:
            InternalError: root_pid is not a positive pid.
            SandboxSetupError: the watcher is closed or its reader failed.
        """
        if root_pid <= 0:
            raise InternalError(f"process events: cannot track pid {root_pid}")
        with self._lock:
            if self._closed or self._failure is not None:
                raise SandboxSetupError(f"process events: watcher stopped ({self._failure})")
            tree = _TreeState(root_pid)
            self._replay(tree)
            self._trees.append(tree)
        return TrackedTree(self, tree)

    def close(self) -> None:
        """Unsubscribe, stop the reader, close the socket; idempotent.

        Trees still tracked are marked `lost_events`: nothing follows them now.

        Side Effects:
            Sends to the socket, joins the thread, closes descriptors.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._send(_IGNORE, 0)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(_THREAD_JOIN_SECONDS)
        with self._lock:
            self._mark_all_lost()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> TreeWatch:
        """Use as a context manager; `close` on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the watcher."""
        self.close()

    # -- subscription -------------------------------------------------------

    def _send(self, payload: bytes, ack: int) -> None:
        port = self._sock.getsockname()[0]
        message = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0) + payload
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(message), _NLMSG_DONE, 0, 0, port)
        self._sock.sendto(header + message, (0, 0))

    def _request(self, payload: bytes) -> int | None:
        """Send one subscription request; the kernel's errno, or None without an answer."""
        nonce = secrets.randbelow(0x7FFF0000)
        with self._lock:
            # The kernel answers with ack = ours + 1.
            self._awaited_ack, self._ack_error = nonce + 1, None
        self._send(payload, nonce)
        deadline = time.monotonic() + ACK_TIMEOUT_SECONDS
        with self._lock:
            while self._ack_error is None and self._failure is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            self._awaited_ack = -1
            return self._ack_error

    def _subscribe(self) -> None:
        try:
            error = self._request(_LISTEN_ALL)
            if error == 0:
                # Linux >= 6.6 then narrows this socket to fork, exec and exit
                # (fewer messages, later overflow); older kernels ignore the
                # longer form. Not acknowledged: acks are filtered out too.
                self._send(_LISTEN_FILTERED, 0)
        except OSError as exc:
            raise SandboxSetupError(
                f"process events: cannot subscribe ({exc.strerror}); the engine must run "
                "as root in the initial network namespace"
            ) from exc
        if error is None:
            raise SandboxSetupError(
                "process events: the kernel did not acknowledge the subscription "
                "(CONFIG_PROC_EVENTS off, or the engine is not in the initial user "
                f"and PID namespaces){self._failure_suffix()}"
            )
        if error != 0:
            raise SandboxSetupError(f"process events: subscription refused ({os.strerror(error)})")

    def _failure_suffix(self) -> str:
        with self._lock:
            return "" if self._failure is None else f"; reader: {self._failure}"

    # -- reader thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            self._read_loop()
        finally:
            with self._lock:
                if not self._closed and self._failure is None:
                    self._failure = "reader thread ended unexpectedly"
                if self._failure is not None:
                    self._mark_all_lost()
                self._changed.notify_all()

    def _read_loop(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _events in poller.poll()}
            if self._wake_r in ready:
                return
            if not self._drain():
                return

    def _drain(self) -> bool:
        """Read until the socket is empty; False when the reader must stop."""
        while not self._closed:
            try:
                data = self._sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._on_overflow()
                    continue
                with self._lock:
                    self._failure = f"recv failed ({exc.strerror})"
                return False
            self._apply(parse_messages(data), time.monotonic())
        return False

    def _apply(self, events: list[ProcEvent], received: float) -> None:
        with self._lock:
            for event in events:
                if event.what == PROC_EVENT_NONE:
                    # Acknowledgements go to every listener: keep only ours.
                    if event.ack == self._awaited_ack:
                        self._ack_error = event.code
                    continue
                self._ring.append(_RingEntry(received, event))
                for tree in self._trees:
                    tree.apply(event)
            self._changed.notify_all()

    def _on_overflow(self) -> None:
        with self._lock:
            self._overflows += 1
            # Continuity is broken: replaying across the gap would be wrong.
            self._ring.clear()
            self._mark_all_lost()
            self._changed.notify_all()

    # -- helpers (lock held) ---------------------------------------------------

    def _mark_all_lost(self) -> None:
        for tree in self._trees:
            # A settled tree has nothing left to learn: keep its verdict.
            if tree.status() is not SettleStatus.SETTLED:
                tree.lost = True

    def _replay(self, tree: _TreeState) -> None:
        # From the newest entry back to the root's last fork: the root was
        # forked moments ago, so this touches a few entries, not the ring.
        oldest = time.monotonic() - self._ring_max_age_seconds
        for back, entry in enumerate(reversed(self._ring)):
            if entry.received < oldest:
                return  # too old: never armed
            if tree.is_root_fork(entry.event):
                start = len(self._ring) - 1 - back
                break
        else:
            return  # not read yet (it will arrive)
        for entry in itertools.islice(self._ring, start, None):
            tree.apply(entry.event)

    def _untrack(self, tree: _TreeState) -> None:
        with self._lock:
            tree.closed = True
            if tree in self._trees:
                self._trees.remove(tree)
            self._changed.notify_all()

    def _wait(self, tree: _TreeState, timeout_seconds: float) -> SettleStatus:
        deadline = time.monotonic() + timeout_seconds
        with self._lock:
            while True:
                status = tree.status()
                if status is not None:
                    return status
                remaining = deadline - time.monotonic()
                if remaining <= 0 or tree.closed:
                    return SettleStatus.TIMED_OUT if tree.armed else SettleStatus.ROOT_NOT_SEEN
                self._changed.wait(remaining)

    def _snapshot(self, tree: _TreeState) -> _Snapshot:
        with self._lock:
            return _Snapshot(dict(tree.deaths), tree.descendants, tree.lost, tree.inconsistent)


def _open_socket(receive_buffer_bytes: int) -> socket.socket:
    """A non-blocking connector socket bound to the process-events group.

    Raises:
        SandboxSetupError: no connector (or no permission to bind the group).

    Side Effects:
        Opens a socket.
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError as exc:
        raise SandboxSetupError(
            f"process events: no netlink connector ({exc.strerror}); needs CONFIG_CONNECTOR"
        ) from exc
    try:
        sock.bind((0, CN_IDX_PROC))
        try:
            # FORCE ignores net.core.rmem_max (needs CAP_NET_ADMIN).
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, receive_buffer_bytes)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SandboxSetupError(
            f"process events: cannot bind the process-events group ({exc.strerror})"
        ) from exc
    return sock


class TrackedTree:
    """One step's process tree as followed by a `TreeWatch`."""

    def __init__(self, watch: TreeWatch, state: _TreeState) -> None:
        """Made by `TreeWatch.track` only."""
        self._watch = watch
        self._state = state

    @property
    def root_pid(self) -> int:
        """The host pid of the tree's root (the step's init)."""
        return self._state.root

    @property
    def lost_events(self) -> bool:
        """True when events may have been dropped while this tree was tracked."""
        return self._watch._snapshot(self._state).lost

    @property
    def descendants_seen(self) -> int:
        """How many member processes (not the root) were forked so far."""
        return self._watch._snapshot(self._state).descendants

    def wait_settled_result(self, timeout_seconds: float) -> SettleStatus:
        """Wait until every member has reported its exit; never raises.

        Call after the root has exited (its parent reaped it).

        Args:
            timeout_seconds: how long to wait at most.

        Returns:
            SETTLED, or why the deaths are not known to be complete:
            EVENTS_LOST (overflow or reader failure), INCONSISTENT (a pid-reuse
            race), ROOT_NOT_SEEN (the root's fork event was never read) or
            TIMED_OUT (members still running or exits still in flight).
        """
        return self._watch._wait(self._state, timeout_seconds)

    def wait_settled(self, timeout_seconds: float) -> None:
        """Wait until every member has reported its exit, or fail closed.

        Args:
            timeout_seconds: how long to wait at most.

        Raises:
            StepFailedError: the tree did not settle (see `wait_settled_result`);
                the step's violations cannot be ruled out.
        """
        status = self.wait_settled_result(timeout_seconds)
        if status is SettleStatus.SETTLED:
            return
        detail = {
            SettleStatus.EVENTS_LOST: "process events were lost",
            SettleStatus.INCONSISTENT: (
                f"ambiguous events ({self._watch._snapshot(self._state).inconsistent})"
            ),
            SettleStatus.ROOT_NOT_SEEN: "the fork of its root was never seen",
            SettleStatus.TIMED_OUT: f"members still running after {timeout_seconds}s",
        }[status]
        raise StepFailedError(
            f"process tree of pid {self.root_pid}: cannot rule out violations: {detail}"
        )

    def signal_deaths(self) -> dict[int, int]:
        """Signal number -> how many member processes (not the root) it killed."""
        return self._watch._snapshot(self._state).deaths

    def sigsys_deaths(self) -> int:
        """How many member processes (not the root) died of SIGSYS (seccomp)."""
        return self.signal_deaths().get(SIGSYS, 0)

    def close(self) -> None:
        """Stop tracking; the counts stay readable.

        Side Effects:
            Wakes any thread waiting in `wait_settled`.
        """
        self._watch._untrack(self._state)

    def __enter__(self) -> TrackedTree:
        """Use as a context manager; `close` on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop tracking."""
        self.close()
