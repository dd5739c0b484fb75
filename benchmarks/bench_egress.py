# SPDX-License-Identifier: Apache-2.0
"""Egress forwarder cost: throughput and connection latency vs a direct connection.

In the same run, interleaved so drift hits both alike, a client process
talks to a server process on 127.0.0.1:

- direct:    client -> server;
- forwarded: client -> a listener -> haios's `Forwarder` -> server, the
             forwarder recording every connection through the engine's event
             bus into a real, fsynced audit log and the metrics recorder.

The listener is bound on a private loopback address of the host and handed
to the forwarder over its channel exactly as the sandbox init hands over the
listeners it creates in a step's network namespace: the data path (loopback
TCP, then the forwarder, then TCP to the destination) is the one a step gets.
Client and server are separate processes, as the step and the destination
are.

Measured: bulk transfers of 1 MiB and 100 MiB (client sends, server counts
and answers; median of the repetitions, each client process warmed by one
transfer first), the forwarder's CPU time per GiB forwarded, and 1,000
short connections (connect, one byte each way, close). A forwarded byte
crosses two loopback TCP connections and the forwarder, a third busy
process: with fewer than three CPUs the three compete, so the ratio falls
towards the share of CPU the forwarder takes. Goal (issue 12): forwarded throughput
>= 0.8x direct; < 1 ms added per connection.

Run from the repository root (root is not needed):

    python -m benchmarks.bench_egress [--reps 7] [--connections 1000]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from haios.audit import AuditLog
from haios.egress.forward import Forwarder
from haios.egress.limits import ForwardLimits
from haios.events import EventBus
from haios.metrics import MetricsRecorder
from haios.sandbox.netns import LISTENERS_MESSAGE
from haios.sandbox.spec import EgressRoute

MIB = 1 << 20
LISTEN = "127.77.0.1"

SERVER = r"""
import socket, sys, threading
server = socket.create_server(("127.0.0.1", 0), backlog=1024)
print(server.getsockname()[1], flush=True)
def serve(conn):
    buffer = bytearray(1 << 20)
    received = 0
    with conn:
        while True:
            size = conn.recv_into(buffer)
            if not size:
                break
            received += size
        conn.sendall(b"%d" % received)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

CLIENT = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
size, count = int(sys.argv[3]), int(sys.argv[4])
chunk = memoryview(bytearray(1 << 20))
def once(nbytes):
    with socket.create_connection((host, port)) as conn:
        left = nbytes
        while left:
            left -= conn.send(chunk[:min(left, len(chunk))])
        conn.shutdown(socket.SHUT_WR)
        answer = conn.recv(64)
    assert int(answer) == nbytes, answer
times = []
for _ in range(count):
    start = time.perf_counter()
    once(size)
    times.append(time.perf_counter() - start)
print(" ".join(repr(t) for t in times))
"""


def _client(host: str, port: int, size: int, count: int) -> list[float]:
    done = subprocess.run([sys.executable, "-c", CLIENT, host, str(port), str(size),
                           str(count)], capture_output=True, text=True, check=True)
    return [float(value) for value in done.stdout.split()]


def _forwarder(port: int, bus: EventBus) -> Forwarder:
    route = EgressRoute("bench", None, LISTEN, port, ("127.0.0.1",))
    limits = ForwardLimits(connections_max=16, connections_total_max=65536,
                           bytes_max=1 << 40, connect_timeout_seconds=5)
    forwarder = Forwarder.open("bench", (route,), limits, bus.publish)
    forwarder.start()
    listener = socket.create_server((LISTEN, port), backlog=1024)
    channel = socket.socket(fileno=os.dup(forwarder.step_egress.channel_fd))
    with channel, listener:
        socket.send_fds(channel, [LISTENERS_MESSAGE], [listener.fileno()])
    return forwarder


def _bulk(port: int, size: int, reps: int) -> tuple[float, float, float]:
    """Median throughput direct and forwarded, and the forwarder's CPU per GiB."""
    direct: list[float] = []
    forwarded: list[float] = []
    cpu = 0.0
    for _ in range(2):  # two interleaved blocks, each client process warm after its first
        direct += _client("127.0.0.1", port, size, reps)[1:]
        before = resource.getrusage(resource.RUSAGE_SELF)
        forwarded += _client(LISTEN, port, size, reps)[1:]
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu += after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    moved_gib = 2 * reps * size / (1 << 30)
    return (size / statistics.median(direct), size / statistics.median(forwarded),
            cpu / moved_gib)


def _connections(port: int, count: int) -> tuple[list[float], list[float]]:
    direct: list[float] = []
    forwarded: list[float] = []
    block = max(1, count // 10)
    for _ in range(count // block):
        direct += _client("127.0.0.1", port, 1, block)
        forwarded += _client(LISTEN, port, 1, block)
    return direct, forwarded


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    """Run the benchmark and print the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=7, help="bulk repetitions per size")
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    with tempfile.TemporaryDirectory() as scratch:
        dir_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        bus = EventBus()
        audit = AuditLog.open(dir_fd)
        recorder = MetricsRecorder()
        bus.subscribe(audit.subscriber)
        bus.subscribe(recorder.on_event)
        forwarder = _forwarder(port, bus)
        try:
            print(f"egress forwarder vs direct loopback, {os.cpu_count()} CPUs, "
                  f"medians of {args.reps} runs (client and server are separate processes)")
            ok = True
            for size in (MIB, 100 * MIB):
                direct, forwarded, cpu_per_gib = _bulk(port, size, args.reps)
                ratio = forwarded / direct
                ok &= ratio >= 0.8
                print(f"  {size // MIB:>3} MiB transfer: direct {direct / MIB:8.1f} MiB/s   "
                      f"forwarded {forwarded / MIB:8.1f} MiB/s   ratio {ratio:.2f} "
                      f"(goal >= 0.80); forwarder CPU {cpu_per_gib:.2f} s/GiB")
            direct_c, forwarded_c = _connections(port, args.connections)
            added = statistics.mean(forwarded_c) - statistics.mean(direct_c)
            ok &= added < 0.001
            print(f"  {len(direct_c)} short connections: direct mean "
                  f"{statistics.mean(direct_c) * 1e6:7.0f} us (p50 "
                  f"{_percentile(direct_c, 0.5) * 1e6:.0f}, p99 "
                  f"{_percentile(direct_c, 0.99) * 1e6:.0f})   forwarded mean "
                  f"{statistics.mean(forwarded_c) * 1e6:7.0f} us (p50 "
                  f"{_percentile(forwarded_c, 0.5) * 1e6:.0f}, p99 "
                  f"{_percentile(forwarded_c, 0.99) * 1e6:.0f})")
            print(f"  added per connection: {added * 1e6:.0f} us mean, "
                  f"{(_percentile(forwarded_c, 0.5) - _percentile(direct_c, 0.5)) * 1e6:.0f} us "
                  f"p50 (goal < 1000 us)")
        finally:
            forwarder.stop()
            audit.close()
            os.close(dir_fd)
            server.kill()
            server.wait()
        records = len(Path(scratch, "audit.jsonl").read_text().splitlines())
        print(f"  audit records written: {records} (one per connection, plus the summary)")
        print("  goals met" if ok else "  goals NOT met on this machine")


if __name__ == "__main__":
    main()
