# SPDX-License-Identifier: Apache-2.0
"""The per-step forwarder: from the step's listeners to the real destinations.

One `Forwarder` serves one step. The engine creates it before the step
starts (`open`), puts its `step_egress` in the step's spec, calls `start`,
and calls `stop` once the step's whole tree is gone:

1. The sandbox init creates one listening socket per allowed endpoint
   inside the step's network namespace and sends them over the egress
   channel (`haios.sandbox.netns`). The accept thread receives them and
   checks that each is a listening TCP socket at the planned address and
   port; anything else fails the step (`stop` raises).
2. For each connection the step makes to a listener, a worker dials the
   endpoint's destinations (resolved by the engine at run start, never by
   the step) in order, within the connect timeout, and two workers then
   copy bytes, one per direction. Nothing looks at the bytes: TLS passes
   through untouched, end to end, and certificates are checked by the step
   against the real server's name.
3. `limits.StepBudget` bounds concurrent connections (the accept thread
   pauses; the kernel queues the rest in the listener's backlog), total
   connections (the listeners are then closed) and bytes (no byte past the
   limit is forwarded; every connection is cut and the listeners closed).
   A connection ends with a half-close only when one side ended its stream;
   one the forwarder cuts (a limit, `stop`, a failure on either side) is
   reset on both sides, never shut down first: a peer reading to the end
   must not take a truncated stream for a complete one.
4. Every connection ends in exactly one `egress.connection` record
   (endpoint, destination, outcome, bytes each way, duration), every
   refusal in an `egress.refused` record, and `stop` ends with one
   `egress.closed` summary. Records reach the engine's event bus (and so
   the audit log and metrics) from a recorder thread, off the forwarding
   path; `stop` returns only after the last one is published.

Workers are kept for reuse (a thread start per connection would cost more
than the forwarding itself); there are never more than two per connection
being forwarded, so `connections_max` bounds them. Each worker keeps its
copy buffer (grown up to 1 MiB by bulk reads) for the connections it serves
next: allocating and zeroing it anew cost a 1 MiB transfer about a tenth of
its throughput.

What it does not do: choose a destination from anything the step sends,
resolve names, or interpret the bytes. Does I/O: threads, sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import ipaddress
import os
import queue
import selectors
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from haios import events as ev
from haios.egress.limits import ForwardLimits, StepBudget
from haios.errors import HaiosError, SandboxSetupError
from haios.sandbox.netns import LISTENERS_MESSAGE
from haios.sandbox.spec import EgressRoute, StepEgress

#: a worker's buffer starts at this size and grows while reads fill it
BUFFER_MIN_BYTES: Final = 64 * 1024
BUFFER_MAX_BYTES: Final = 1024 * 1024
#: how long `stop` waits for the forwarder's threads once the step is gone
STOP_JOIN_SECONDS: Final = 10.0
#: how long the accept thread backs off when the engine is out of descriptors
_BACKOFF_SECONDS: Final = 0.1
#: SO_LINGER on, 0 seconds: close sends RST
_RESET_LINGER: Final = struct.pack("ii", 1, 0)
#: how often a send blocked on a peer that does not read checks for a cut
_SEND_WAKE: Final = struct.pack("ll", 0, 200_000)
#: how long a cut waits for the bytes already forwarded to reach the peer
_DRAIN_SECONDS: Final = 1.0
_DRAIN_POLL_SECONDS: Final = 0.002
_TCP_CLOSE: Final = 7

#: every outcome of a forwarded connection (the metric's label values)
OUTCOMES: Final = ("closed", "reset", "connect_failed", "byte_limit", "step_ended", "error")
#: every reason the forwarder or the resolver refuses (the metric's label values)
REFUSAL_REASONS: Final = ("total_limit", "byte_limit", "resolution")
#: bytes from the step to the destination ("out") and back ("in")
DIRECTIONS: Final = ("out", "in")


#: each worker thread's copy buffer (`buffer`), kept between connections
_worker = threading.local()


class Publish(Protocol):
    """The engine's event bus `publish`."""

    def __call__(self, event: ev.Event, /) -> None:
        """Deliver one event."""


@dataclasses.dataclass(eq=False)
class _Connection:
    """One forwarded connection, shared by the workers serving it."""

    route: EgressRoute
    client: socket.socket
    started: float
    upstream: socket.socket | None = None
    destination: str | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    #: directions still running, and how the finished ones ended
    running: int = 0
    endings: list[str | None] = dataclasses.field(default_factory=list)
    #: directions whose source ended (end of stream or error)
    ended: int = 0
    #: both directions ended (or the connect failed): nothing left to cut
    done: bool = False
    #: `stop` cut it while bytes could still flow
    cut: bool = False
    #: why the forwarder cut it (how the directions it woke end); None: not cut
    aborted: str | None = None

    def abort(self, reason: str) -> None:
        """Cut it: wake both directions (and a pending connect); no further byte moves.

        Call with the forwarder's lock held. Only the receiving side is shut
        down, which sends nothing: a FIN would tell the peer the stream ended
        cleanly. The reset goes out when `_finish` closes the sockets.
        """
        if self.aborted is None:
            self.aborted = reason
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)


class _Workers:
    """Reusable threads; a task runs at once on an idle worker or a new one."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: list[threading.Thread] = []

    def submit(self, task: Callable[[], None]) -> None:
        """Run `task` on an idle worker, or on a new one.

        Raises:
            RuntimeError: no idle worker and no thread could be started.
        """
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                # Started before the task is queued: a failed start queues nothing.
                thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                thread.start()
                self._threads.append(thread)
            self._tasks.put(task)

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            finally:
                with self._lock:
                    self._idle += 1

    def close(self, deadline: float) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._tasks.put(None)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _same_address(sockname: Any, route: EgressRoute) -> bool:
    try:
        return bool(ipaddress.ip_address(sockname[0]) == ipaddress.ip_address(route.listen)
                    and sockname[1] == route.port)
    except (ValueError, TypeError, IndexError):
        return False


class Forwarder:
    """Forwards one step's connections to its allowed destinations.

    Build with `Forwarder.open`; `start` before the step runs, `stop` after
    its tree is gone (as a context manager, leaving it stops too).
    """

    def __init__(self, step_id: str, routes: tuple[EgressRoute, ...], limits: ForwardLimits,
                 publish: Publish, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Create the channel and the wake-up pipe; nothing runs yet (use `open`)."""
        if not routes:
            raise ValueError("a forwarder needs at least one route")
        self.step_id = step_id
        self.routes = routes
        self.budget = StepBudget(limits)
        self._limits = limits
        self._publish = publish
        self._clock = clock
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active: set[_Connection] = set()
        self._workers = _Workers(f"haios-egress-{step_id}")
        self._listeners: list[socket.socket] = []
        self._records: queue.SimpleQueue[ev.Event | None] = queue.SimpleQueue()
        self._refusals: dict[str, int] = {}
        self._bytes = dict.fromkeys(DIRECTIONS, 0)
        self._stopping = False
        self._stopped = False
        self._byte_limit = False
        self._limit_refused = False
        self._problem: str | None = None
        self._failure: HaiosError | None = None
        self._accept_thread: threading.Thread | None = None
        self._recorder: threading.Thread | None = None

    @classmethod
    def open(cls, step_id: str, routes: tuple[EgressRoute, ...], limits: ForwardLimits,
             publish: Publish) -> Forwarder:
        """A forwarder for one step, not yet started.

        Raises:
            SandboxSetupError: out of descriptors.

        Side Effects:
            Creates a socket pair and a pipe.
        """
        try:
            return cls(step_id, routes, limits, publish)
        except OSError as exc:
            raise SandboxSetupError(f"step {step_id}: cannot set up egress ({exc.strerror})"
                                    ) from exc

    @property
    def step_egress(self) -> StepEgress:
        """What the step's spec carries: the routes and the sandbox's end of the channel."""
        return StepEgress(routes=self.routes, channel_fd=self._theirs.fileno())

    def start(self) -> None:
        """Start the accept and recorder threads.

        Side Effects:
            Starts two daemon threads.
        """
        name = f"haios-egress-{self.step_id}"
        self._recorder = threading.Thread(target=self._record_loop, name=f"{name}-records",
                                          daemon=True)
        self._recorder.start()
        self._accept_thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self._accept_thread.start()

    def __enter__(self) -> Forwarder:
        """Use as a context manager that stops the forwarder on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop; a recording failure is raised unless another exception is on its way."""
        failure = self._stop()
        if failure is not None and exc_info[0] is None:
            raise failure

    def stop(self) -> None:
        """End forwarding: close the listeners, cut what is still open, publish
        the remaining records and the summary; idempotent.

        Call it once the step's tree is gone: by then the kernel has closed
        the step's sockets and most connections have ended by themselves.

        Raises:
            SandboxSetupError: the listeners the sandbox sent were not the
                planned ones (the step ran without its egress).
            HaiosError: a record could not be published (the audit log failed).

        Side Effects:
            Joins the forwarder's threads; closes every descriptor it owns;
            publishes events.
        """
        failure = self._stop()
        if failure is not None:
            raise failure

    def _stop(self) -> HaiosError | None:
        with self._lock:
            if self._stopped:
                return self._failure
            self._stopped = self._stopping = True
            for connection in self._active:
                if not connection.done and connection.ended < 2:
                    connection.cut = True
                    connection.abort("step_ended")
        self._wake()
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            while self._active and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
        self._workers.close(deadline)
        self._close_listeners()
        if self._accept_thread is not None:
            # A limit reached just before `stop` is refused here if the
            # accept loop had no time to: the record must not depend on timing.
            self._limits_reached()
            # Never started (the step could not be set up): nothing to sum up.
            self._queue(ev.EgressClosed(step_id=self.step_id, connections=self.budget.connections,
                                        bytes_out=self._bytes["out"], bytes_in=self._bytes["in"],
                                        refusals=dict(sorted(self._refusals.items()))))
        self._records.put(None)
        if self._recorder is not None:
            self._recorder.join(max(1.0, deadline - time.monotonic()))
        else:
            self._record_loop()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._ours.close()
        self._theirs.close()
        if self._problem is not None and self._failure is None:
            self._failure = SandboxSetupError(f"step {self.step_id}: egress {self._problem}")
        return self._failure

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    # -- records -----------------------------------------------------------------

    def _queue(self, event: ev.Event) -> None:
        self._records.put(event)

    def _refuse(self, reason: str, endpoint: str | None, message: str) -> None:
        with self._lock:
            self._refusals[reason] = self._refusals.get(reason, 0) + 1
        self._queue(ev.EgressRefused(step_id=self.step_id, endpoint=endpoint, reason=reason,
                                     message=message))

    def _record_loop(self) -> None:
        while (event := self._records.get()) is not None:
            try:
                self._publish(event)
            except HaiosError as exc:
                # The audit log failed: the run stops when `stop` raises it.
                self._failure = self._failure or exc

    # -- accepting ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        selector.register(self._ours, selectors.EVENT_READ, "channel")
        listening = False
        resume_at = 0.0  # after the engine ran short of descriptors
        try:
            while not self._stopping:
                pause = resume_at - time.monotonic()
                for key, _events in selector.select(pause if pause > 0 else None):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    elif key.data == "channel":
                        selector.unregister(self._ours)
                        self._receive_listeners()
                    elif not self._stopping and not self._accept(key.fileobj, key.data):
                        resume_at = time.monotonic() + _BACKOFF_SECONDS
                if self._stopping or not self._listeners:
                    continue
                if self._limits_reached():
                    self._close_listeners(selector)
                    continue
                # At the concurrency limit (or short of descriptors) stop
                # accepting: the kernel queues further connections until a
                # slot frees (which wakes this loop) or the pause ends.
                wanted = not self.budget.at_capacity and time.monotonic() >= resume_at
                if wanted != listening:
                    for index, listener in enumerate(self._listeners):
                        if wanted:
                            selector.register(listener, selectors.EVENT_READ, index)
                        else:
                            selector.unregister(listener)
                    listening = wanted
        finally:
            selector.close()

    def _limits_reached(self) -> bool:
        """Whether a limit closes the listeners; its refusal is recorded once."""
        byte_limit = self._byte_limit
        if not (byte_limit or self.budget.total_reached):
            return False
        with self._lock:
            refused, self._limit_refused = self._limit_refused, True
        if refused:
            return True
        if byte_limit:
            self._refuse("byte_limit", None, f"the step's {self._limits.bytes_max} bytes are "
                         "used: every connection cut, listeners closed")
        else:
            self._refuse("total_limit", None, f"the step made {self._limits.connections_total_max}"
                         " connections: listeners closed")
        return True

    def _close_listeners(self, selector: selectors.BaseSelector | None = None) -> None:
        with self._lock:
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            if selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(listener)
            listener.close()

    def _receive_listeners(self) -> None:
        """Take the listeners the sandbox init sent; anything unexpected is refused."""
        try:
            message, fds, flags, _addr = socket.recv_fds(
                self._ours, len(LISTENERS_MESSAGE) + 1, len(self.routes) + 1)
        except OSError as exc:
            self._problem = f"listeners not received ({exc.strerror})"
            return
        received = [socket.socket(fileno=fd) for fd in fds]
        if (message != LISTENERS_MESSAGE or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
                or len(received) != len(self.routes)
                or not all(self._is_listener(sock, route)
                           for sock, route in zip(received, self.routes, strict=False))):
            for sock in received:
                sock.close()
            self._problem = "listeners from the sandbox do not match the planned endpoints"
            return
        for sock in received:
            sock.setblocking(False)
        with self._lock:
            if self._stopping:
                for sock in received:
                    sock.close()
                return
            self._listeners = received

    @staticmethod
    def _is_listener(sock: socket.socket, route: EgressRoute) -> bool:
        try:
            return (sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                    and _same_address(sock.getsockname(), route))
        except OSError:
            return False

    def _accept(self, listener: Any, index: int) -> bool:
        """Accept what is queued while the limits allow.

        Returns:
            False when the engine is short of descriptors or memory (pause).
        """
        route = self.routes[index]
        while not self.budget.at_capacity and not self.budget.total_reached:
            try:
                client, _peer = listener.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                return exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
            if not self.budget.admit():
                client.close()
                return True
            client.setblocking(True)
            connection = _Connection(route=route, client=client, started=self._clock())
            with self._lock:
                self._active.add(connection)
            try:
                self._workers.submit(functools.partial(self._open, connection))
            except RuntimeError:  # no thread could be started: the engine is short
                self._finish(connection, "error")
                return False
        return True

    # -- forwarding --------------------------------------------------------------

    def _open(self, connection: _Connection) -> None:
        """Reach the destination, then serve both directions (one on a second worker)."""
        if self._byte_limit:
            # Accepted before the listeners closed: nothing more may flow.
            self._finish(connection, "byte_limit")
            return
        try:
            self._connect(connection)
        except OSError:
            self._finish(connection, "connect_failed")
            return
        upstream = connection.upstream
        if upstream is None:  # stopped while connecting
            self._finish(connection, "step_ended")
            return
        connection.running = 2
        try:
            self._workers.submit(functools.partial(self._direction, connection, upstream,
                                                   connection.client, "in"))
        except RuntimeError:  # no thread could be started: the engine is short
            connection.running = 1
            connection.endings.append("error")
            with self._lock:
                connection.abort("error")
        self._direction(connection, connection.client, upstream, "out")

    def _direction(self, connection: _Connection, source: socket.socket, sink: socket.socket,
                   direction: str) -> None:
        ended = self._pump(connection, source, sink, direction)
        with self._lock:
            connection.endings.append(ended)
            connection.running -= 1
            last = connection.running == 0
            connection.done = last
        if last:
            endings = set(connection.endings)
            outcome = next((o for o in ("byte_limit", "error", "reset", "step_ended")
                            if o in endings), "closed")
            self._finish(connection, outcome)

    def _finish(self, connection: _Connection, outcome: str) -> None:
        """Close both sockets, free the slot, queue the connection's record."""
        with self._lock:
            connection.done = True
            if connection.cut and outcome in ("closed", "reset"):
                outcome = "step_ended"
        sockets = [s for s in (connection.client, connection.upstream) if s is not None]
        if outcome != "closed":
            # RST rather than FIN on both sides where the end is not a clean
            # one: neither the step nor the destination may take a refused or
            # cut connection for a complete exchange. After a cut, the bytes
            # already forwarded arrive first; a failure is passed on at once.
            if outcome in ("byte_limit", "step_ended"):
                _drain(sockets, time.monotonic() + _DRAIN_SECONDS)
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_LINGER)
        for sock in sockets:
            sock.close()
        with self._lock:
            self._bytes["out"] += connection.bytes_out
            self._bytes["in"] += connection.bytes_in
            self._active.discard(connection)
            self._idle.notify_all()
        self.budget.release()
        self._wake()
        self._queue(ev.EgressConnection(
            step_id=self.step_id, endpoint=connection.route.endpoint,
            destination=connection.destination, outcome=outcome,
            bytes_out=connection.bytes_out, bytes_in=connection.bytes_in,
            duration_seconds=round(self._clock() - connection.started, 6)))

    def _connect(self, connection: _Connection) -> None:
        """Dial the route's destinations in order within the connect timeout.

        Leaves `connection.upstream` None when the forwarder stopped meanwhile.

        Raises:
            OSError: no destination answered in time.
        """
        route = connection.route
        deadline = time.monotonic() + self._limits.connect_timeout_seconds
        last = OSError(errno.ETIMEDOUT, "connect timeout")
        for address in route.destinations:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            upstream = socket.socket(family, socket.SOCK_STREAM)
            with self._lock:
                if self._stopping:
                    upstream.close()
                    return
                connection.upstream = upstream
            try:
                upstream.settimeout(remaining)
                upstream.connect((address, route.port))
                upstream.settimeout(None)
            except OSError as exc:
                with self._lock:
                    connection.upstream = None
                upstream.close()
                last = exc
                continue
            connection.destination = (f"[{address}]:{route.port}" if family == socket.AF_INET6
                                      else f"{address}:{route.port}")
            # Relay at once: the step's own sockets decide about batching. A
            # send blocked on a peer that does not read wakes now and then to
            # see a cut: only a FIN (shutdown) would wake it at once.
            for sock in (upstream, connection.client):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SEND_WAKE)
            return
        raise last

    def _pump(self, connection: _Connection, source: socket.socket, sink: socket.socket,
              direction: str) -> str | None:
        """Copy one direction until end of stream; return how it ended (None: EOF).

        Each chunk takes its share of the byte limit before it is written:
        the bytes past the limit are dropped, never forwarded. Only what this
        connection's `recv_into` wrote is sent: the buffer's older contents
        (an earlier connection of the same step) never are.
        """
        buffer: bytearray | None = getattr(_worker, "buffer", None)
        if buffer is None:
            buffer = _worker.buffer = bytearray(BUFFER_MIN_BYTES)
        view = memoryview(buffer)
        ended: str | None = None
        try:
            while True:
                size = source.recv_into(buffer)
                if size == 0:
                    with self._lock:
                        # A cut wakes the receive with an end of stream too:
                        # that one is never passed on as a clean end.
                        ended = connection.aborted
                        if ended is None:
                            # Counted and passed on under the lock: an exchange
                            # both sides completed is never taken for a cut
                            # one, and no FIN goes out once a cut is decided.
                            connection.ended += 1
                            with contextlib.suppress(OSError):
                                sink.shutdown(socket.SHUT_WR)
                    break
                if connection.aborted is not None:
                    ended = connection.aborted
                    break
                allowed = self.budget.take(size)
                if allowed and not self._send(connection, sink, view[:allowed], direction):
                    ended = connection.aborted
                    break
                if allowed < size:
                    self._byte_limit = True
                    ended = "byte_limit"
                    break
                if size == len(buffer) and len(buffer) < BUFFER_MAX_BYTES:
                    # A bulk transfer: fewer, larger copies.
                    view.release()
                    buffer = _worker.buffer = bytearray(len(buffer) * 4)
                    view = memoryview(buffer)
        except OSError:
            ended = connection.aborted or "reset"
        finally:
            view.release()
        if ended is not None:
            with self._lock:
                connection.abort(ended)
            if ended == "byte_limit":
                self._cut_all()
        return ended

    @staticmethod
    def _send(connection: _Connection, sink: socket.socket, data: memoryview,
              direction: str) -> bool:
        """Send all of `data` unless the connection is cut meanwhile (False).

        Counts what the kernel took, as it takes it.

        Raises:
            OSError: the sink failed.
        """
        sent = 0
        try:
            while sent < len(data):
                try:
                    sent += sink.send(data[sent:])
                except BlockingIOError:  # the send timeout: the peer reads nothing
                    if connection.aborted is not None:
                        return False
        finally:
            if direction == "out":
                connection.bytes_out += sent
            else:
                connection.bytes_in += sent
        return True

    def _cut_all(self) -> None:
        with self._lock:
            for connection in self._active:
                if not connection.done and connection.ended < 2:
                    connection.abort("byte_limit")
        self._wake()


def _drain(sockets: list[socket.socket], deadline: float) -> None:
    """Wait, until `deadline`, for the peers to acknowledge what was sent.

    A reset discards whatever the kernel has not delivered yet.
    """
    for sock in sockets:
        while time.monotonic() < deadline:
            try:
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                unacknowledged = struct.unpack(
                    "i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            except OSError:
                break
            if state == _TCP_CLOSE or unacknowledged <= 0:
                break
            time.sleep(_DRAIN_POLL_SECONDS)
