# SPDX-License-Identifier: Apache-2.0
"""Egress forwarder cost: throughput and connection latency vs a direct connection.

In the same run, interleaved so drift hits both alike, a client process
talks to a server process on 127.0.0.1:

- direct:    client -> server;
- forwarded: client -> a listener -> haios's `Forwarder` -> server, the
             forwarder recording every connection through the engine's event
             bus into a real, fsynced audit log and the metrics recorder;
- socat:     client -> `socat` (a native userspace forwarder in C, one
             forked process per connection, copying in chunks of up to 1 MiB
             as the forwarder does) -> server: what any userspace hop costs
             on this machine, without the forwarder's limits and records.
             Skipped, and said so, when socat is not installed.

The listener is bound on a private loopback address of the host and handed
to the forwarder over its channel exactly as the sandbox init hands over the
listeners it creates in a step's network namespace: the data path (loopback
TCP, then the forwarder, then TCP to the destination) is the one a step gets.
Client and server are separate processes, as the step and the destination
are.

Measured: bulk transfers of 1 MiB and 100 MiB (client sends, server counts
and answers; median of the repetitions, each client process warmed by one
transfer first), each forwarder's CPU time per GiB forwarded, and 1,000
short connections (connect, one byte each way, close). A forwarded byte
crosses two loopback TCP connections and the forwarder, a third busy
process: with fewer than three CPUs the three compete, so the ratio falls
towards the share of CPU the forwarder takes. The socat row shows where
that bound lies here: forwarder/socat near 1 means the rest of the gap is
the hop itself, not haios. Goal (issue 12): forwarded throughput >= 0.8x
direct; < 1 ms added per connection.

Run from the repository root (root is not needed):

    python -m benchmarks.bench_egress [--reps 7] [--connections 1000] [--socat-block BYTES]
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
SOCAT_LISTEN = "127.78.0.1"

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


def _socat(port: int, block: int) -> subprocess.Popen[bytes] | None:
    """socat forwarding SOCAT_LISTEN:port to the server; None when not installed."""
    binary = shutil.which("socat")
    if binary is None:
        return None
    process = subprocess.Popen([binary, "-b", str(block),
                                f"TCP-LISTEN:{port},bind={SOCAT_LISTEN},reuseaddr,fork,"
                                "backlog=1024", f"TCP:127.0.0.1:{port}"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # listening once a connect succeeds
        try:
            socket.create_connection((SOCAT_LISTEN, port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.02)
    process.kill()
    process.wait()
    raise RuntimeError("socat did not start listening")


def _process_cpu(pid: int) -> float:
    """CPU seconds of a process and of its reaped children (socat's forks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Hop:
    """One way from the client to the server, and what it measured."""

    name: str
    host: str
    cpu: Callable[[], float] | None = None  # CPU seconds the hop itself used so far
    #: the `cpu` clock's resolution, and how long its reading lags (socat's reaping)
    cpu_tick: float = 1e-6
    settle: float = 0.0
    times: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    moved: int = 0  # bytes sent by clients while `cpu_seconds` was counted

    def run(self, port: int, size: int, count: int, warm: bool) -> None:
        before = self.cpu() if self.cpu else 0.0
        times = _client(self.host, port, size, count + warm)
        if self.cpu:
            time.sleep(self.settle)
            self.cpu_seconds += self.cpu() - before
            self.moved += size * len(times)
        self.times += times[warm:]

    def cpu_per_gib(self) -> str:
        if self.cpu_seconds < 20 * self.cpu_tick:
            return "n/a (below the clock's resolution)"
        return f"{self.cpu_seconds / (self.moved / (1 << 30)):.2f} s/GiB"


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _bulk(hops: list[Hop], port: int, size: int, reps: int) -> None:
    """Two interleaved blocks, each client process warm after its first transfer."""
    for hop in hops:
        hop.times, hop.cpu_seconds, hop.moved = [], 0.0, 0
    for _ in range(2):
        for hop in hops:
            hop.run(port, size, reps, warm=True)


def _connections(hops: list[Hop], port: int, count: int) -> None:
    for hop in hops:
        hop.times = []
    block = max(1, count // 10)
    for _ in range(count // block):
        for hop in hops:
            hop.run(port, 1, block, warm=False)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    """Run the benchmark and print the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=7, help="bulk repetitions per size")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--socat-block", type=int, default=MIB,
                        help="socat's -b, bytes per copy (socat's own default is 8192; the "
                        "forwarder's largest buffer is 1 MiB)")
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    socat = _socat(port, args.socat_block)
    with tempfile.TemporaryDirectory() as scratch:
        dir_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        bus = EventBus()
        audit = AuditLog.open(dir_fd)
        recorder = MetricsRecorder()
        bus.subscribe(audit.subscriber)
        bus.subscribe(recorder.on_event)
        forwarder = _forwarder(port, bus)
        direct = Hop("direct", "127.0.0.1")
        haios = Hop("forwarded", LISTEN, _self_cpu)
        hops = [direct, haios]
        peer: Hop | None = None
        if socat is not None:
            # socat's forks count once reaped, in clock ticks
            peer = Hop("socat", SOCAT_LISTEN, functools.partial(_process_cpu, socat.pid),
                       cpu_tick=1 / os.sysconf("SC_CLK_TCK"), settle=0.05)
            hops.append(peer)
        try:
            print(f"egress forwarder vs direct loopback, {os.cpu_count()} CPUs, medians of "
                  f"{2 * args.reps} transfers per size (client and server are separate processes)")
            if peer is None:
                print("  socat: not installed, its row is skipped (apt-get install -y socat)")
            else:
                print(f"  socat peer: -b {args.socat_block}, one forked process per connection")
            ok = True
            for size in (MIB, 100 * MIB):
                _bulk(hops, port, size, args.reps)
                rate = {hop.name: size / statistics.median(hop.times) for hop in hops}
                print(f"  {size // MIB} MiB transfer:")
                for hop in hops:
                    line = f"    {hop.name:<9} {rate[hop.name] / MIB:8.1f} MiB/s"
                    if hop is not direct:
                        line += (f"   {rate[hop.name] / rate['direct']:.2f}x direct   "
                                 f"hop CPU {hop.cpu_per_gib()}")
                    print(line)
                ratio = rate["forwarded"] / rate["direct"]
                ok &= ratio >= 0.8
                summary = f"    ratios: forwarder/direct {ratio:.2f} (goal >= 0.80)"
                if peer is not None:
                    summary += (f", socat/direct {rate['socat'] / rate['direct']:.2f}, "
                                f"forwarder/socat {rate['forwarded'] / rate['socat']:.2f}")
                print(summary)
            _connections(hops, port, args.connections)
            print(f"  {len(direct.times)} short connections (connect, 1 byte each way, close):")
            for hop in hops:
                line = (f"    {hop.name:<9} mean {statistics.mean(hop.times) * 1e6:7.0f} us "
                        f"(p50 {_percentile(hop.times, 0.5) * 1e6:.0f}, p99 "
                        f"{_percentile(hop.times, 0.99) * 1e6:.0f})")
                if hop is not direct:
                    added = statistics.mean(hop.times) - statistics.mean(direct.times)
                    line += f"   added {added * 1e6:.0f} us mean"
                    if hop is haios:
                        ok &= added < 0.001
                        line += " (goal < 1000 us)"
                print(line)
        finally:
            forwarder.stop()
            audit.close()
            os.close(dir_fd)
            for process in (server, socat):
                if process is not None:
                    process.kill()
                    process.wait()
        records = len(Path(scratch, "audit.jsonl").read_text().splitlines())
        print(f"  audit records written: {records} (one per connection, plus the summary)")
        print("  goals met" if ok else "  goals NOT met on this machine")


if __name__ == "__main__":
    main()
