# SPDX-License-Identifier: Apache-2.0
"""Egress escapes from inside a real sandboxed step, through the real forwarder.

Threats T-S04 (network) of threat_model/sandbox.md and T-E02..T-E06 of
threat_model/egress.md. The attacker controls the step's code and has a
profile that allows some endpoints. It tries every other destination: the
host's other loopback ports and addresses, another host (a network
namespace this test creates, reached over a veth pair), UDP, its own
network configuration, the listeners' descriptors, more connections and
bytes than its limits. Expected: the allowed endpoint works (verified TLS
by host name included); everything else fails fast inside the step's own
namespace (ECONNREFUSED on a loopback address nothing listens on,
ENETUNREACH elsewhere) and the listeners prove nothing arrived; limits cut
with a record.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from haios.egress.forward import Forwarder
from haios.egress.limits import ForwardLimits
from haios.events import Event
from haios.sandbox.launcher import Launcher
from haios.sandbox.runner import NamespaceRunner
from haios.sandbox.spec import EgressRoute
from tests.support.egress import (
    PROBE_NET,
    HttpsServer,
    OtherHost,
    Recorder,
    TestCA,
    UdpRecorder,
)
from tests.support.sandbox import PRELUDE, ProbeRun, make_spec, run_spec, workspace_path

LIMITS = ForwardLimits(connections_max=4, connections_total_max=64, bytes_max=1 << 20,
                       connect_timeout_seconds=5)
#: a refused or unroutable attempt must fail well within this (no timeout)
FAST_SECONDS = 1.0

#: helpers run inside the probe: each attempt records its errno (0: worked)
#: and how long it took
NET = PROBE_NET + r"""
def tcp(host, port, payload=b"escape"):
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return data.decode(errors="replace")
            data += chunk
"""


@pytest.fixture(params=["direct", "launcher"])
def runner(request: pytest.FixtureRequest) -> Iterator[NamespaceRunner]:
    if request.param == "direct":
        yield NamespaceRunner()
    else:
        with Launcher.start() as launcher:
            yield NamespaceRunner(launcher=launcher)


def run_forwarded(runner: NamespaceRunner, tmp_path: Path, body: str,
                  routes: tuple[EgressRoute, ...], *, limits: ForwardLimits = LIMITS,
                  files: dict[str, bytes] | None = None, profile: str = "network",
                  ) -> tuple[ProbeRun, list[tuple[str, dict[str, Any]]]]:
    """Run `NET + body` in the sandbox with a forwarder for `routes`."""
    events: list[tuple[str, dict[str, Any]]] = []

    def publish(event: Event, /) -> None:
        events.append((event.KIND, event.fields()))

    forwarder = Forwarder.open("probe", routes, limits, publish)
    spec = make_spec(tmp_path, ("/usr/bin/python3", "-c", PRELUDE + NET + body),
                     profile=profile, egress=forwarder.step_egress, timeout_seconds=60)
    for name, data in (files or {}).items():
        (workspace_path(spec) / name).write_bytes(data)
    forwarder.start()
    try:
        probe = run_spec(runner, spec)
    finally:
        forwarder.stop()
    return probe, events


def kinds(events: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [fields for name, fields in events if name == kind]


def local_route(port: int, endpoint: str | None = None) -> EgressRoute:
    """`localhost:port` as the resolver makes it."""
    return EgressRoute(endpoint or f"localhost:{port}", "localhost", "127.0.0.1", port,
                       ("127.0.0.1",))


def assert_fast_failure(results: dict[str, Any], name: str, *expected: int) -> None:
    assert results[name] in expected, (name, results[name], errno.errorcode.get(results[name]))
    assert results[f"{name}_seconds"] < FAST_SECONDS, (name, results[f"{name}_seconds"])


def test_only_the_allowed_endpoint_is_reachable(runner: NamespaceRunner,
                                                tmp_path: Path) -> None:
    """T-E03: allowed endpoint works; other ports, addresses, hosts and UDP fail fast."""
    with (Recorder() as allowed, Recorder() as other_port,
          Recorder(address="127.0.0.2", port=0) as other_address, UdpRecorder() as udp,
          OtherHost(tmp_path) as other_host):
        body = "\n".join([
            f"attempt('allowed', lambda: tcp('localhost', {allowed.port}, b'hello'))",
            f"attempt('other_port', lambda: tcp('127.0.0.1', {other_port.port}))",
            f"attempt('other_address', lambda: tcp('127.0.0.2', {other_address.port}))",
            f"attempt('other_address_same_port', lambda: tcp('127.0.0.2', {allowed.port}))",
            f"attempt('other_host', lambda: tcp('{other_host.address}', {other_host.port}))",
            f"attempt('host_side_of_veth', lambda: tcp('{other_host.host_address}', "
            f"{other_port.port}))",
            f"attempt('udp_loopback', lambda: udp('127.0.0.1', {udp.port}))",
            f"attempt('udp_other_host', lambda: udp('{other_host.address}', {other_host.port}))",
            "attempt('dns_name', lambda: socket.getaddrinfo('example.org', 443))",
            "save()",
        ])
        probe, events = run_forwarded(runner, tmp_path, body, (local_route(allowed.port),))
        results = probe.results
        assert probe.outcome.exit_code == 0, probe.stderr
        assert results["allowed"] == "recorder\n"
        assert_fast_failure(results, "other_port", errno.ECONNREFUSED)
        assert_fast_failure(results, "other_address", errno.ECONNREFUSED)
        assert_fast_failure(results, "other_address_same_port", errno.ECONNREFUSED)
        assert_fast_failure(results, "other_host", errno.ENETUNREACH)
        assert_fast_failure(results, "host_side_of_veth", errno.ENETUNREACH)
        assert_fast_failure(results, "udp_loopback", errno.ECONNREFUSED)
        assert_fast_failure(results, "udp_other_host", errno.ENETUNREACH)
        # No resolver in the step: a name outside its /etc/hosts does not resolve.
        assert results["dns_name"] != 0
        assert results["dns_name_seconds"] < FAST_SECONDS
        # The listeners prove it: only the allowed one saw anything.
        assert allowed.received() == [b"hello"]
        assert other_port.received() == []
        assert other_address.received() == []
        assert udp.received() == []
        assert other_host.received("tcp") == []
        assert other_host.received("udp") == []
    records = kinds(events, "egress.connection")
    assert [(r["endpoint"], r["outcome"], r["bytes_out"], r["bytes_in"]) for r in records] == [
        (f"localhost:{allowed.port}", "closed", 5, len(b"recorder\n"))]
    assert records[0]["destination"] == f"127.0.0.1:{allowed.port}"
    assert kinds(events, "egress.closed") == [{
        "step_id": "probe", "connections": 1, "bytes_out": 5, "bytes_in": 9, "refusals": {}}]


def test_default_profile_has_no_route_anywhere(tmp_path: Path) -> None:
    """T-S04: without endpoints the namespace's only interface is down."""
    with Recorder() as listener, UdpRecorder() as udp, OtherHost(tmp_path) as other_host:
        body = "\n".join([
            f"attempt('loopback', lambda: tcp('127.0.0.1', {listener.port}))",
            f"attempt('other_host', lambda: tcp('{other_host.address}', {other_host.port}))",
            f"attempt('udp', lambda: udp('127.0.0.1', {udp.port}))",
            "save()",
        ])
        spec = make_spec(tmp_path, ("/usr/bin/python3", "-c", PRELUDE + NET + body))
        probe = run_spec(NamespaceRunner(), spec)
        assert probe.outcome.exit_code == 0, probe.stderr
        for name in ("loopback", "other_host", "udp"):
            assert_fast_failure(probe.results, name, errno.ENETUNREACH)
        assert listener.received() == []
        assert udp.received() == []
        assert other_host.received("tcp") == []


def test_verified_tls_by_host_name_through_the_forwarder(runner: NamespaceRunner,
                                                         tmp_path: Path) -> None:
    """T-E05: TLS is end to end: the step verifies the real server's certificate by name."""
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("api", ["api.haios.test", "localhost"])
    with (HttpsServer(cert, key, b"allowed over TLS\n") as allowed,
          HttpsServer(cert, key, b"not listed\n") as unlisted):
        route = EgressRoute(f"api.haios.test:{allowed.port}", "api.haios.test", "127.200.0.1",
                            allowed.port, ("127.0.0.1",))
        body = "\n".join([
            "context = ssl.create_default_context(cafile='ca.pem')",
            "def get(url):",
            "    with urllib.request.urlopen(url, context=context, timeout=5) as response:",
            "        return response.read().decode()",
            f"attempt('allowed', lambda: get('https://api.haios.test:{allowed.port}/a'))",
            f"attempt('unlisted', lambda: get('https://api.haios.test:{unlisted.port}/b'))",
            f"attempt('unlisted_localhost', lambda: get('https://localhost:{unlisted.port}/c'))",
            "def wrong_name():",
            f"    with socket.create_connection(('127.200.0.1', {allowed.port}), 5) as raw:",
            "        context.wrap_socket(raw, server_hostname='evil.haios.test')",
            "attempt('wrong_name', wrong_name)",
            "results['hosts'] = open('/etc/hosts').read()",
            "save()",
        ])
        probe, events = run_forwarded(runner, tmp_path, body, (route,),
                                      files={"ca.pem": ca.pem})
        results = probe.results
        assert probe.outcome.exit_code == 0, probe.stderr
        assert results["allowed"] == "allowed over TLS\n"
        assert_fast_failure(results, "unlisted", errno.ECONNREFUSED)
        assert_fast_failure(results, "unlisted_localhost", errno.ECONNREFUSED)
        # Verification is the step's own: a name the certificate lacks fails.
        assert results["wrong_name"] not in (0, None)
        assert results["hosts"] == "127.0.0.1 localhost\n127.200.0.1 api.haios.test\n"
        assert allowed.served == ["/a"]
        assert unlisted.served == []
    outcomes = [r["outcome"] for r in kinds(events, "egress.connection")]
    # The request, then the handshake the step itself aborted.
    assert len(outcomes) == 2 and outcomes[0] == "closed"


def test_address_endpoint_is_dialled_at_the_very_address(tmp_path: Path) -> None:
    """An address endpoint: the step dials the address itself (added to its loopback)."""
    with OtherHost(tmp_path) as other_host:
        route = EgressRoute(f"{other_host.address}:{other_host.port}", None, other_host.address,
                            other_host.port, (other_host.address,))
        body = "\n".join([
            f"attempt('allowed', lambda: tcp('{other_host.address}', {other_host.port}, b'hi'))",
            f"attempt('other_port', lambda: tcp('{other_host.address}', {other_host.port + 1}))",
            "save()",
        ])
        probe, events = run_forwarded(NamespaceRunner(), tmp_path, body, (route,))
        assert probe.outcome.exit_code == 0, probe.stderr
        assert probe.results["allowed"] == "other-host\n"
        assert_fast_failure(probe.results, "other_port", errno.ECONNREFUSED)
        assert other_host.received("tcp") == [b"hi"]
    record = kinds(events, "egress.connection")[0]
    assert record["destination"] == f"{other_host.address}:{other_host.port}"


def test_ipv6_address_endpoint_is_dialled_at_the_very_address(tmp_path: Path) -> None:
    """An IPv6 address endpoint is added to the namespace's loopback as a /128."""
    with Recorder() as allowed:
        # 2001:db8::/32 is documentation space: it exists only inside the step.
        route = EgressRoute(f"[2001:db8::7]:{allowed.port}", None, "2001:db8::7", allowed.port,
                            ("127.0.0.1",))
        body = "\n".join([
            f"attempt('allowed', lambda: tcp('2001:db8::7', {allowed.port}, b'v6'))",
            f"attempt('other', lambda: tcp('2001:db8::8', {allowed.port}))",
            "save()",
        ])
        probe, _events = run_forwarded(NamespaceRunner(), tmp_path, body, (route,))
        assert probe.outcome.exit_code == 0, probe.stderr
        assert probe.results["allowed"] == "recorder\n"
        assert_fast_failure(probe.results, "other", errno.ENETUNREACH)
        assert allowed.received() == [b"v6"]


def test_an_unreachable_destination_resets_the_step_connection(tmp_path: Path) -> None:
    """The step's connect succeeds in its namespace; the forwarder then resets it."""
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = reserved.getsockname()[1]
        body = f"attempt('dead', lambda: tcp('localhost', {port}))\nsave()"
        probe, events = run_forwarded(NamespaceRunner(), tmp_path, body, (local_route(port),))
    assert probe.outcome.exit_code == 0, probe.stderr
    assert probe.results["dead"] in (errno.ECONNRESET, errno.EPIPE)
    assert [r["outcome"] for r in kinds(events, "egress.connection")] == ["connect_failed"]


def test_the_step_holds_no_listener_and_cannot_reconfigure_its_network(
        tmp_path: Path) -> None:
    """T-E06: the listeners and the channel never reach the step; netlink is refused."""
    with Recorder() as allowed:
        body = "\n".join([
            "import os",
            "results['fds'] = sorted(os.listdir('/proc/self/fd'))",
            "attempt('netlink', lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))",
            "def steal():",
            "    sock = socket.socket()",
            f"    sock.bind(('127.0.0.1', {allowed.port}))",
            "    sock.listen(1)",
            "attempt('steal', steal)",
            "attempt('raw', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))",
            "attempt('ping', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 1))",
            "save()",
        ])
        probe, _events = run_forwarded(NamespaceRunner(), tmp_path, body,
                                       (local_route(allowed.port),))
    results = probe.results
    assert probe.outcome.exit_code == 0, probe.stderr
    assert results["fds"] == ["0", "1", "2", "3"]  # 3: the listdir itself
    assert results["netlink"] == errno.EAFNOSUPPORT
    assert results["steal"] == errno.EADDRINUSE
    assert results["raw"] == errno.EPERM
    assert results["ping"] in (errno.EACCES, errno.EPERM)


def test_connections_past_the_total_are_refused(tmp_path: Path) -> None:
    """T-E04: a connection flood stops at connections_total_max; listeners close."""
    limits = ForwardLimits(connections_max=2, connections_total_max=5, bytes_max=1 << 20,
                           connect_timeout_seconds=5)
    with Recorder() as allowed:
        body = "\n".join([
            "for n in range(12):",
            f"    attempt(f'c{{n}}', lambda: tcp('localhost', {allowed.port}, b'x'))",
            "save()",
        ])
        probe, events = run_forwarded(NamespaceRunner(), tmp_path, body,
                                      (local_route(allowed.port),), limits=limits)
        assert len(allowed.received()) == 5
    results = probe.results
    assert [results[f"c{n}"] for n in range(5)] == ["recorder\n"] * 5
    for n in range(6, 12):
        assert_fast_failure(results, f"c{n}", errno.ECONNREFUSED)
    assert len(kinds(events, "egress.connection")) == 5
    refused = kinds(events, "egress.refused")
    assert [(r["reason"], r["endpoint"]) for r in refused] == [("total_limit", None)]
    assert kinds(events, "egress.closed")[0]["refusals"] == {"total_limit": 1}


def test_concurrent_connections_wait_for_a_slot(tmp_path: Path) -> None:
    """T-E04: past connections_max, connections queue in the kernel, then proceed."""
    limits = ForwardLimits(connections_max=1, connections_total_max=16, bytes_max=1 << 20,
                           connect_timeout_seconds=5)
    with Recorder() as allowed:
        body = "\n".join([
            f"first = socket.create_connection(('localhost', {allowed.port}), timeout=5)",
            "assert first.recv(100) == b'recorder\\n'",
            f"second = socket.create_connection(('localhost', {allowed.port}), timeout=5)",
            "second.settimeout(0.5)",
            "attempt('second_while_first_open', lambda: second.recv(100).decode())",
            "first.close()",
            "second.settimeout(5)",
            "attempt('second_after_first_closed', lambda: second.recv(100).decode())",
            "save()",
        ])
        probe, _events = run_forwarded(NamespaceRunner(), tmp_path, body,
                                       (local_route(allowed.port),), limits=limits)
    assert probe.outcome.exit_code == 0, probe.stderr
    assert probe.results["second_while_first_open"] == "timeout"
    assert probe.results["second_after_first_closed"] == "recorder\n"


def test_byte_limit_is_never_exceeded(tmp_path: Path) -> None:
    """T-E04: past bytes_max nothing more is forwarded; the connection is cut."""
    limit = 64 * 1024
    limits = ForwardLimits(connections_max=4, connections_total_max=16, bytes_max=limit,
                           connect_timeout_seconds=5)
    with Recorder() as sink:
        body = "\n".join([
            f"attempt('flood', lambda: tcp('localhost', {sink.port}, b'z' * (4 << 20)))",
            f"attempt('after', lambda: tcp('localhost', {sink.port}, b'more'))",
            "save()",
        ])
        probe, events = run_forwarded(NamespaceRunner(), tmp_path, body,
                                      (local_route(sink.port),), limits=limits)
        received = sink.received(settle_seconds=0.5)
    assert probe.outcome.exit_code == 0, probe.stderr
    # How the cut shows depends on where the step's send was when it came.
    assert probe.results["flood"] in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
    # Refused once the listeners are closed; reset if it was queued just before.
    assert_fast_failure(probe.results, "after", errno.ECONNREFUSED, errno.ECONNRESET)
    connections = kinds(events, "egress.connection")
    assert {r["outcome"] for r in connections} == {"byte_limit"}
    # Exactly the limit crossed, both directions together, not one byte more;
    # a connection queued as the limit was reached moved nothing.
    assert sum(r["bytes_out"] + r["bytes_in"] for r in connections) == limit
    assert sum(len(data) for data in received) == sum(r["bytes_out"] for r in connections)
    assert [r["reason"] for r in kinds(events, "egress.refused")] == ["byte_limit"]


def test_records_are_plain_json_without_secrets(tmp_path: Path) -> None:
    """Records carry names, addresses and counts: the bytes themselves never."""
    with Recorder() as allowed:
        body = f"attempt('a', lambda: tcp('localhost', {allowed.port}, b'SECRET-PAYLOAD'))\nsave()"
        _probe, events = run_forwarded(NamespaceRunner(), tmp_path, body,
                                       (local_route(allowed.port),))
    text = json.dumps(events)
    assert "SECRET-PAYLOAD" not in text
    assert json.loads(text) == [list(item) for item in events]
