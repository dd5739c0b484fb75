# SPDX-License-Identifier: Apache-2.0
"""The forwarder on its own: listeners handed over the channel as the sandbox init does.

Threats T-E04 (forwarder exhaustion), T-E06 (listeners that are not the
planned ones) and T-E08 (records lost) of threat_model/egress.md. The test
plays the sandbox init: it binds listeners on a private loopback address of
the host and sends them over the forwarder's channel; destinations are
servers on 127.0.0.1. Only loopback is dialled.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from haios.egress import forward
from haios.egress.forward import Forwarder
from haios.egress.limits import ForwardLimits
from haios.errors import EnvironmentUnavailableError, SandboxSetupError
from haios.events import Event
from haios.metrics import families as metrics
from haios.sandbox.netns import LISTENERS_MESSAGE
from haios.sandbox.spec import EgressRoute

LIMITS = ForwardLimits(connections_max=4, connections_total_max=32, bytes_max=1 << 20,
                       connect_timeout_seconds=2)
_addresses = itertools.count(1)


class Echo:
    """A destination on 127.0.0.1 that echoes until end of stream."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.server.close()


class Sink:
    """A destination on 127.0.0.1 that counts what each connection delivered."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received: list[int] = []
        #: how each connection ended (`read_to_end`)
        self.endings: list[str] = []
        self.done = threading.Semaphore(0)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                total, ending = read_to_end(conn, 1 << 20)
            self.received.append(total)
            self.endings.append(ending)
            self.done.release()

    def close(self) -> None:
        self.server.close()


class Source:
    """A destination on 127.0.0.1 that sends `size` bytes, then ends as told.

    `then`: "read" reads until the end (the connection stays open meanwhile),
    "half_close" ends its own stream and reads until the end, "reset" aborts
    (and waits for a first byte before sending: a reset before the
    forwarder's connect returns would fail the connect instead). What it
    read from each connection lands in `received`.
    """

    def __init__(self, size: int, then: str = "read") -> None:
        self.size = size
        self.then = then
        self.received: list[int] = []
        self.done = threading.Semaphore(0)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        total = 0
        with conn, contextlib.suppress(OSError):
            if self.then == "reset":
                conn.recv(1)
            conn.sendall(os.urandom(self.size))
            if self.then == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if self.then == "half_close":
                conn.shutdown(socket.SHUT_WR)
            total = read_to_end(conn)[0]
        self.received.append(total)
        self.done.release()

    def close(self) -> None:
        self.server.close()


class Harness:
    """A forwarder whose listeners the test made (on 127.77.x.y), with its events."""

    def __init__(self, ports: list[int], limits: ForwardLimits = LIMITS,
                 destinations: tuple[str, ...] = ("127.0.0.1",)) -> None:
        index = next(_addresses)
        self.listen = f"127.77.{index // 250}.{index % 250 + 1}"
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.routes = tuple(EgressRoute(f"e{port}", None, self.listen, port, destinations)
                            for port in ports)
        self.forwarder = Forwarder.open("s", self.routes, limits, self.publish)
        self.forwarder.start()

    def publish(self, event: Event, /) -> None:
        self.events.append((event.KIND, event.fields()))

    def hand_over(self, listeners: list[socket.socket] | None = None,
                  message: bytes = LISTENERS_MESSAGE) -> None:
        """Send listeners over the channel, as the sandbox init does."""
        if listeners is None:
            listeners = [socket.create_server((self.listen, route.port))
                         for route in self.routes]
        channel = socket.socket(fileno=os.dup(self.forwarder.step_egress.channel_fd))
        with channel:
            socket.send_fds(channel, [message], [sock.fileno() for sock in listeners])
        for sock in listeners:
            sock.close()

    def connect(self, port: int) -> socket.socket:
        return socket.create_connection((self.listen, port), timeout=5)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == kind]


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


def read_to_end(conn: socket.socket, size: int = 65536) -> tuple[int, str]:
    """Read until the end of stream: how many bytes, and whether it ended
    cleanly ("eof"), was reset ("reset") or failed otherwise."""
    total = 0
    try:
        while data := conn.recv(size):
            total += len(data)
    except ConnectionResetError:
        return total, "reset"
    except OSError as exc:
        return total, f"failed: {exc!r}"
    return total, "eof"


def roundtrip(conn: socket.socket, payload: bytes) -> bytes:
    conn.sendall(payload)
    conn.shutdown(socket.SHUT_WR)
    received = b""
    while data := conn.recv(65536):
        received += data
    conn.close()
    return received


def test_bytes_flow_both_ways_and_each_connection_is_recorded(echo: Echo) -> None:
    harness = Harness([echo.port])
    harness.hand_over()
    payload = os.urandom(300_000)
    assert roundtrip(harness.connect(echo.port), payload) == payload
    assert roundtrip(harness.connect(echo.port), b"x") == b"x"
    harness.forwarder.stop()
    records = harness.kinds("egress.connection")
    assert [(r["outcome"], r["bytes_out"], r["bytes_in"]) for r in records] == [
        ("closed", 300_000, 300_000), ("closed", 1, 1)]
    assert all(r["destination"] == f"127.0.0.1:{echo.port}" and r["step_id"] == "s"
               and r["endpoint"] == f"e{echo.port}" and r["duration_seconds"] >= 0
               for r in records)
    assert harness.kinds("egress.closed") == [{
        "step_id": "s", "connections": 2, "bytes_out": 300_001, "bytes_in": 300_001,
        "refusals": {}}]
    assert harness.events[-1][0] == "egress.closed"  # the summary comes last


def test_the_byte_limit_is_exact_with_bulk_buffers_kept_by_workers() -> None:
    # The first connection grows the workers' buffers to their largest; the
    # second is cut inside a full read, at a limit aligned to no buffer size.
    sink = Sink()
    limit = (3 << 20) + 12_345
    harness = Harness([sink.port], limits=ForwardLimits(1, 8, limit, 2))
    harness.hand_over()
    for size in (2 << 20, 4 << 20):
        conn = harness.connect(sink.port)
        with contextlib.suppress(OSError):  # the cut may reach the sender first
            conn.sendall(os.urandom(size))
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)
        conn.close()
        assert sink.done.acquire(timeout=10)
    harness.forwarder.stop()
    sink.close()
    assert sink.received == [2 << 20, limit - (2 << 20)]
    records = harness.kinds("egress.connection")
    assert [(r["outcome"], r["bytes_out"], r["bytes_in"]) for r in records] == [
        ("closed", 2 << 20, 0), ("byte_limit", limit - (2 << 20), 0)]
    assert harness.kinds("egress.closed")[0]["bytes_out"] == limit
    assert [r["reason"] for r in harness.kinds("egress.refused")] == ["byte_limit"]


@pytest.mark.parametrize("attempt", range(5))
def test_a_download_cut_by_the_byte_limit_is_reset_not_ended(attempt: int) -> None:
    # A step reading to the end must tell a truncated download from a
    # complete one: the cut is a reset, never a clean end of stream.
    limit = 100_000 + attempt * 7_919
    source = Source(1 << 20)
    harness = Harness([source.port], limits=ForwardLimits(2, 8, limit, 2))
    harness.hand_over()
    conn = harness.connect(source.port)
    # Every byte forwarded arrives, then the reset.
    assert read_to_end(conn) == (limit, "reset")
    conn.close()
    harness.forwarder.stop()
    source.close()
    records = harness.kinds("egress.connection")
    assert [(r["outcome"], r["bytes_out"], r["bytes_in"]) for r in records] == [
        ("byte_limit", 0, limit)]
    assert [r["reason"] for r in harness.kinds("egress.refused")] == ["byte_limit"]


@pytest.mark.parametrize("attempt", range(3))
def test_an_upload_cut_by_the_byte_limit_is_reset_at_the_destination(attempt: int) -> None:
    limit = 100_000 + attempt * 7_919
    sink = Sink()
    harness = Harness([sink.port], limits=ForwardLimits(2, 8, limit, 2))
    harness.hand_over()
    conn = harness.connect(sink.port)
    with contextlib.suppress(OSError):  # the cut may reach the sender first
        conn.sendall(os.urandom(1 << 20))
        conn.shutdown(socket.SHUT_WR)
    assert read_to_end(conn)[1] == "reset"
    conn.close()
    assert sink.done.acquire(timeout=10)
    harness.forwarder.stop()
    sink.close()
    assert (sink.received, sink.endings) == ([limit], ["reset"])
    records = harness.kinds("egress.connection")
    assert [(r["outcome"], r["bytes_out"], r["bytes_in"]) for r in records] == [
        ("byte_limit", limit, 0)]
    assert [r["reason"] for r in harness.kinds("egress.refused")] == ["byte_limit"]


def test_the_byte_limit_resets_every_open_connection(echo: Echo) -> None:
    source = Source(1 << 20)
    harness = Harness([echo.port, source.port], limits=ForwardLimits(2, 8, 100_000, 2))
    harness.hand_over()
    idle = harness.connect(echo.port)
    idle.sendall(b"i")
    assert idle.recv(10) == b"i"
    cut = harness.connect(source.port)
    assert read_to_end(cut) == (100_000 - 2, "reset")
    assert read_to_end(idle) == (0, "reset")
    for conn in (idle, cut):
        conn.close()
    harness.forwarder.stop()
    source.close()
    records = harness.kinds("egress.connection")
    assert sorted((r["endpoint"], r["outcome"], r["bytes_out"], r["bytes_in"])
                  for r in records) == sorted([(f"e{echo.port}", "byte_limit", 1, 1),
                                               (f"e{source.port}", "byte_limit", 0, 99_998)])
    assert [r["reason"] for r in harness.kinds("egress.refused")] == ["byte_limit"]


def test_an_end_from_the_far_side_stays_a_half_close() -> None:
    # The destination ends its stream: the step reads a clean end and can
    # still send, and the destination still reads what it sends.
    source = Source(200_000, then="half_close")
    harness = Harness([source.port])
    harness.hand_over()
    conn = harness.connect(source.port)
    assert read_to_end(conn) == (200_000, "eof")
    conn.sendall(b"after the end")
    conn.shutdown(socket.SHUT_WR)
    assert source.done.acquire(timeout=10)
    conn.close()
    harness.forwarder.stop()
    source.close()
    assert source.received == [len(b"after the end")]
    records = harness.kinds("egress.connection")
    assert [(r["outcome"], r["bytes_out"], r["bytes_in"]) for r in records] == [
        ("closed", len(b"after the end"), 200_000)]


@pytest.mark.parametrize("attempt", range(3))
def test_a_reset_by_the_destination_reaches_the_step_as_a_reset(attempt: int) -> None:
    source = Source(50_000 + attempt, then="reset")
    harness = Harness([source.port])
    harness.hand_over()
    conn = harness.connect(source.port)
    conn.sendall(b"g")
    assert read_to_end(conn)[1] == "reset"
    conn.close()
    harness.forwarder.stop()
    source.close()
    assert [r["outcome"] for r in harness.kinds("egress.connection")] == ["reset"]


def test_destinations_are_tried_in_order(echo: Echo) -> None:
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    harness = Harness([echo.port], destinations=("127.0.0.9", "127.0.0.1"))
    harness.hand_over()
    assert roundtrip(harness.connect(echo.port), b"ok") == b"ok"
    harness.forwarder.stop()
    assert harness.kinds("egress.connection")[0]["destination"] == f"127.0.0.1:{echo.port}"
    refused = Harness([dead_port])
    refused.hand_over()
    conn = refused.connect(dead_port)
    with pytest.raises(ConnectionResetError):
        conn.recv(10)
    conn.close()
    refused.forwarder.stop()
    assert [r["outcome"] for r in refused.kinds("egress.connection")] == ["connect_failed"]
    assert refused.kinds("egress.connection")[0]["destination"] is None


def test_stop_cuts_connections_still_open(echo: Echo) -> None:
    harness = Harness([echo.port])
    harness.hand_over()
    conn = harness.connect(echo.port)
    conn.sendall(b"held")
    assert conn.recv(10) == b"held"
    started = time.monotonic()
    harness.forwarder.stop()
    assert time.monotonic() - started < 5
    with pytest.raises(ConnectionResetError):  # a cut, never a clean end
        conn.recv(10)
    conn.close()
    assert [r["outcome"] for r in harness.kinds("egress.connection")] == ["step_ended"]
    harness.forwarder.stop()  # idempotent


@pytest.mark.parametrize("case", ["wrong_port", "wrong_message", "too_few", "not_listening"])
def test_listeners_that_are_not_the_planned_ones_fail_the_step(echo: Echo, case: str) -> None:
    harness = Harness([echo.port])
    if case == "wrong_port":
        harness.hand_over([socket.create_server((harness.listen, 0))])
    elif case == "wrong_message":
        harness.hand_over(message=b"something else")
    elif case == "too_few":
        harness.hand_over([])
    else:
        harness.hand_over([socket.socket()])
    time.sleep(0.1)
    with pytest.raises(SandboxSetupError, match="egress"):
        harness.forwarder.stop()
    with pytest.raises(ConnectionRefusedError):
        harness.connect(echo.port)


def test_no_listeners_at_all_is_not_an_egress_failure(echo: Echo) -> None:
    # The sandbox failed before its network stage: the runner reports that.
    harness = Harness([echo.port])
    harness.forwarder.stop()
    assert harness.kinds("egress.closed")[0]["connections"] == 0


def test_a_forwarder_never_started_records_nothing(echo: Echo) -> None:
    events: list[tuple[str, Any]] = []
    forwarder = Forwarder.open("s", (EgressRoute("e", None, "127.77.9.9", echo.port,
                                                 ("127.0.0.1",)),), LIMITS,
                               lambda event: events.append((event.KIND, event.fields())))
    forwarder.stop()
    assert events == []


def test_a_record_that_cannot_be_published_stops_the_run(echo: Echo) -> None:
    harness = Harness([echo.port])

    def failing(event: Event, /) -> None:
        raise EnvironmentUnavailableError("audit.jsonl: cannot append")

    harness.forwarder._publish = failing  # the audit log failing
    harness.hand_over()
    assert roundtrip(harness.connect(echo.port), b"a") == b"a"
    with pytest.raises(EnvironmentUnavailableError, match="audit"):
        harness.forwarder.stop()


def test_leaving_the_context_stops_without_masking_an_error(echo: Echo) -> None:
    harness = Harness([echo.port])
    harness.hand_over()
    with pytest.raises(RuntimeError, match="runner"), harness.forwarder:
        raise RuntimeError("runner failed")
    assert harness.kinds("egress.closed")


def test_workers_are_reused_not_started_per_connection(echo: Echo) -> None:
    harness = Harness([echo.port], limits=ForwardLimits(2, 1000, 1 << 30, 2))
    harness.hand_over()
    def forwarder_threads() -> int:
        # Only the forwarder's own threads: the test's echo server starts
        # and ends its own, at its own pace.
        return sum(1 for t in threading.enumerate() if t.name.startswith("haios-egress-"))

    before = forwarder_threads()
    assert before >= 2  # the accept and recorder threads are counted
    for _ in range(50):
        assert roundtrip(harness.connect(echo.port), b"r") == b"r"
    assert forwarder_threads() - before <= 4
    harness.forwarder.stop()
    assert len(harness.kinds("egress.connection")) == 50


def test_metric_label_lists_match_the_forwarder() -> None:
    assert set(forward.OUTCOMES) == set(metrics.EGRESS_OUTCOMES) - {metrics.OTHER}
    assert set(forward.REFUSAL_REASONS) == set(metrics.EGRESS_REFUSAL_REASONS) - {metrics.OTHER}
    assert forward.DIRECTIONS == metrics.EGRESS_DIRECTIONS
