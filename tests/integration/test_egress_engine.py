# SPDX-License-Identifier: Apache-2.0
"""Default-deny egress through the real engine (`haios run`), end to end.

Threats T-S04 and T-E01..T-E08 (threat_model/egress.md), ADR 0004. Real
parts: the OpenBao dev server, real listeners on the host's loopback,
another host (a network namespace this test creates, over a veth pair),
HTTPS servers with certificates from a CA made in the test. The step is
hostile: it tries every destination it was not given. Expected: the
allowed endpoints work transparently (same URL, verified TLS by name), all
else fails fast with nothing arriving, and the audit log, the metrics and
the engine's link agree with what happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.adversarial.helpers import traces
from tests.support.egress import (
    PROBE_NET,
    HttpsServer,
    OtherHost,
    Recorder,
    TestCA,
    UdpRecorder,
)
from tests.support.openbao import ENGINE_POLICY, REPORTS_POLICY, OpenBaoServer
from tests.support.world import PROFILES, World, plan, py, read_json, step

#: probe helpers: each attempt records its errno (0/None: worked) and its duration
NET = "import errno, json, os\nresults = {}\n" + PROBE_NET + r"""
def tcp(host, port):
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(b"escape")
        return conn.recv(100).decode()
"""
ECONNREFUSED, ENETUNREACH = 111, 101
FAST_SECONDS = 1.0


def audit(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]


def records(root: Path, kind: str) -> list[dict[str, Any]]:
    return [record["fields"] for record in audit(root) if record["kind"] == kind]


def metric(root: Path, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families((root / "metrics.prom").read_text()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def link_egress(world: World, root: Path, step_id: str) -> Any:
    link = read_json(root / "links" / f"{step_id}.{world.engine.keyid[:8]}.link")
    return link["signed"]["environment"]["haios_confinement"]


def add_profile(world: World, name: str, egress: list[str]) -> None:
    text = (PROFILES / "network.toml").read_text().replace(
        'egress = ["vault"]', f"egress = {json.dumps(egress)}")
    path = world.policy / "profiles" / f"{name}.toml"
    path.write_text(text)
    path.chmod(0o644)


def assert_refused_fast(results: dict[str, Any], name: str, code: int) -> None:
    assert results[name] == code, (name, results[name])
    assert results[f"{name}_seconds"] < FAST_SECONDS, (name, results[f"{name}_seconds"])


def assert_metrics_match_audit(root: Path) -> None:
    connections = records(root, "egress.connection")
    for outcome in {c["outcome"] for c in connections}:
        expected = sum(1 for c in connections if c["outcome"] == outcome)
        assert metric(root, "haios_egress_connections_total", outcome=outcome) == expected
    assert metric(root, "haios_egress_bytes_total", direction="out") == sum(
        c["bytes_out"] for c in connections)
    assert metric(root, "haios_egress_bytes_total", direction="in") == sum(
        c["bytes_in"] for c in connections)
    for summary in records(root, "egress.closed"):
        mine = [c for c in connections if c["step_id"] == summary["step_id"]]
        assert summary["connections"] == len(mine)
        assert summary["bytes_out"] == sum(c["bytes_out"] for c in mine)


VAULT_PROBE = NET + r"""
addr = os.environ["VAULT_ADDR"]
token = open(os.environ["HAIOS_VAULT_TOKEN_FILE"]).read().strip()
request = urllib.request.Request(addr + "/v1/secret/data/reports/q1",
                                 headers={"X-Vault-Token": token})
with urllib.request.urlopen(request, timeout=5) as response:
    results["secret"] = json.load(response)["data"]["data"]
results["vault_addr"] = addr
port = int(addr.rsplit(":", 1)[1])
others = json.loads(os.environ["OTHERS"])
attempt("other_port", lambda: tcp("127.0.0.1", others["port"]))
attempt("other_address", lambda: tcp("127.0.0.2", port))
attempt("other_host", lambda: tcp(others["host"], others["host_port"]))
attempt("udp", lambda: udp("127.0.0.1", others["udp"]))
attempt("udp_other_host", lambda: udp(others["host"], others["host_port"]))
json.dump(results, open("probe.json", "w"))
"""

OFFLINE_PROBE = NET + r"""
others = json.loads(os.environ["OTHERS"])
attempt("vault", lambda: tcp("127.0.0.1", others["vault"]))
attempt("other_host", lambda: tcp(others["host"], others["host_port"]))
attempt("udp", lambda: udp("127.0.0.1", others["udp"]))
json.dump(results, open("offline.json", "w"))
"""


@pytest.fixture
def vault_world(tmp_path: Path, openbao: OpenBaoServer) -> tuple[World, dict[str, str]]:
    world = World(tmp_path / "world", vault_scopes={"reports": {
        "policies": [REPORTS_POLICY], "ttl_seconds": 120}})
    env = {"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": openbao.create_token([ENGINE_POLICY])}
    return world, env


def test_vault_step_reaches_vault_and_nothing_else(
        vault_world: tuple[World, dict[str, str]], openbao: OpenBaoServer,
        tmp_path: Path) -> None:
    world, env = vault_world
    with (Recorder() as host_service, Recorder(address="127.0.0.2", port=openbao.port)
          as other_address, UdpRecorder() as udp, OtherHost(tmp_path) as other_host):
        others = json.dumps({"port": host_service.port, "udp": udp.port,
                             "host": other_host.address, "host_port": other_host.port,
                             "vault": openbao.port})
        root = world.os_root(plan("egress", [
            step("secret", py(VAULT_PROBE), profile="network", vault_scope="reports",
                 products=["probe.json"], env={"OTHERS": others}),
            step("offline", py(OFFLINE_PROBE), products=["offline.json"],
                 env={"OTHERS": others}),
        ]))
        result = world.run(root, env=env)
        assert result.code == 0, result.stderr
        probe = read_json(root / "artefacts" / "probe.json")
        offline = read_json(root / "artefacts" / "offline.json")
        # Transparent: the same VAULT_ADDR, through the forwarder.
        assert probe["vault_addr"] == openbao.addr
        assert probe["secret"] == {"total": "42"}
        assert_refused_fast(probe, "other_port", ECONNREFUSED)
        assert_refused_fast(probe, "other_address", ECONNREFUSED)
        assert_refused_fast(probe, "other_host", ENETUNREACH)
        assert_refused_fast(probe, "udp", ECONNREFUSED)
        assert_refused_fast(probe, "udp_other_host", ENETUNREACH)
        # A default step has no route anywhere, not even to Vault.
        for name in ("vault", "other_host", "udp"):
            assert_refused_fast(offline, name, ENETUNREACH)
        assert host_service.received() == []
        assert other_address.received() == []
        assert udp.received() == []
        assert other_host.received("tcp") == []
        assert other_host.received("udp") == []
    opened = records(root, "egress.opened")
    assert [(o["step_id"], o["mode"]) for o in opened] == [("secret", "egress")]
    assert [e["endpoint"] for e in opened[0]["endpoints"]] == ["vault"]
    assert records(root, "egress.resolved") == [{
        "profile": "network", "endpoint": "vault", "port": openbao.port,
        "addresses": ["127.0.0.1"]}]
    connections = records(root, "egress.connection")
    assert connections and all(
        c["step_id"] == "secret" and c["endpoint"] == "vault" and c["outcome"] == "closed"
        and c["destination"] == f"127.0.0.1:{openbao.port}" and c["bytes_out"] > 0
        and c["bytes_in"] > 0 for c in connections)
    assert records(root, "egress.refused") == []
    assert_metrics_match_audit(root)
    confinement = link_egress(world, root, "secret")
    assert confinement["network"] == "egress"
    assert confinement["egress"]["endpoints"] == [{
        "endpoint": "vault", "dial": "127.0.0.1", "listen": "127.0.0.1", "port": openbao.port,
        "destinations": ["127.0.0.1"]}]
    assert link_egress(world, root, "offline")["network"] == "none"


HTTPS_PROBE = NET + r"""
ports = json.loads(os.environ["PORTS"])
context = ssl.create_default_context(cafile="ca.pem")
def get(url):
    with urllib.request.urlopen(url, context=context, timeout=5) as response:
        return response.read().decode()
attempt("allowed", lambda: get(f"https://localhost:{ports['allowed']}/report"))
attempt("unlisted", lambda: get(f"https://localhost:{ports['unlisted']}/x"))
attempt("unlisted_ip", lambda: get(f"https://127.0.0.1:{ports['unlisted']}/y"))
json.dump(results, open("https.json", "w"))
"""


def test_https_endpoint_on_localhost_with_verified_tls(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("localhost", ["localhost"])
    world = World(tmp_path / "world")
    with (HttpsServer(cert, key, b"allowed\n") as allowed,
          HttpsServer(cert, key, b"unlisted\n") as unlisted):
        add_profile(world, "api", [f"localhost:{allowed.port}"])
        ports = json.dumps({"allowed": allowed.port, "unlisted": unlisted.port})
        root = world.os_root(plan("tls", [
            step("fetch", py(HTTPS_PROBE), profile="api", materials=["ca.pem"],
                 products=["https.json"], env={"PORTS": ports}),
        ], {"ca.pem": ca.pem}), {"ca.pem": ca.pem})
        result = world.run(root)
        assert result.code == 0, result.stderr
        fetched = read_json(root / "artefacts" / "https.json")
        assert fetched["allowed"] == "allowed\n"
        assert_refused_fast(fetched, "unlisted", ECONNREFUSED)
        assert_refused_fast(fetched, "unlisted_ip", ECONNREFUSED)
        assert allowed.served == ["/report"]
        assert unlisted.served == []
    connections = records(root, "egress.connection")
    assert [(c["endpoint"], c["outcome"]) for c in connections] == [
        (f"localhost:{allowed.port}", "closed")]
    assert_metrics_match_audit(root)
    assert link_egress(world, root, "fetch")["egress"]["endpoints"][0]["dial"] == "localhost"


@pytest.fixture
def hosts_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "hosts"
    yield path


def run_with_hosts(world: World, root: Path, hosts: Path) -> subprocess.CompletedProcess[str]:
    """`haios run` in a private mount namespace whose /etc/hosts is `hosts`.

    The engine resolves names with the host's resolver; this test gives that
    resolver its own names without touching the machine's /etc/hosts.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(hosts), sys.executable, "-m", "haios", "run", str(root), "--policy",
         str(world.policy)], capture_output=True, text=True, timeout=120, env=env, check=False)


NAME_PROBE = NET + r"""
target = json.loads(os.environ["TARGET"])
context = ssl.create_default_context(cafile="ca.pem")
def get(url):
    with urllib.request.urlopen(url, context=context, timeout=5) as response:
        return response.read().decode()
attempt("allowed", lambda: get(f"https://peer.haios.test:{target['port']}/by-name"))
attempt("unlisted", lambda: get(f"https://peer.haios.test:{target['other']}/x"))
attempt("raw_address", lambda: tcp(target["address"], target["port"]))
results["hosts"] = open("/etc/hosts").read()
json.dump(results, open("name.json", "w"))
"""


def test_a_name_is_resolved_by_the_engine_and_tls_verified_by_name(
        tmp_path: Path, hosts_file: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("peer", ["peer.haios.test"])
    servers = [{"port": 8443, "cert": str(cert), "key": str(key)},
               {"port": 9443, "cert": str(cert), "key": str(key)}]
    world = World(tmp_path / "world")
    with OtherHost(tmp_path, https=servers) as other_host:
        hosts_file.write_text(f"127.0.0.1 localhost\n{other_host.address} peer.haios.test\n")
        add_profile(world, "peer", ["peer.haios.test:8443"])
        target = json.dumps({"port": 8443, "other": 9443, "address": other_host.address})
        root = world.os_root(plan("byname", [
            step("fetch", py(NAME_PROBE), profile="peer", materials=["ca.pem"],
                 products=["name.json"], env={"TARGET": target}),
        ], {"ca.pem": ca.pem}), {"ca.pem": ca.pem})
        result = run_with_hosts(world, root, hosts_file)
        assert result.returncode == 0, result.stderr
        fetched = read_json(root / "artefacts" / "name.json")
        assert fetched["allowed"] == "other host over TLS\n"
        assert_refused_fast(fetched, "unlisted", ECONNREFUSED)
        # The real address is not reachable: only the name's listener is.
        assert_refused_fast(fetched, "raw_address", ENETUNREACH)
        assert fetched["hosts"] == "127.0.0.1 localhost\n127.200.0.1 peer.haios.test\n"
        assert other_host.received("https") == [b"/by-name"]
    assert records(root, "egress.resolved") == [{
        "profile": "peer", "endpoint": "peer.haios.test:8443", "port": 8443,
        "addresses": [other_host.address]}]
    assert [c["destination"] for c in records(root, "egress.connection")] == [
        f"{other_host.address}:8443"]
    assert_metrics_match_audit(root)


@pytest.mark.parametrize(("answer", "reason"), [
    ("127.0.0.1", "loopback"),
    ("169.254.169.254", "metadata"),
    ("own", "an address of this host"),
], ids=["loopback", "metadata", "host_address"])
def test_a_name_resolving_to_a_forbidden_address_refuses_the_run(
        tmp_path: Path, hosts_file: Path, answer: str, reason: str) -> None:
    """T-E01/T-E02: DNS rebinding is refused before anything runs (never dialled)."""
    if answer == "own":
        answer = _own_address()
    world = World(tmp_path / "world")
    hosts_file.write_text(f"127.0.0.1 localhost\n{answer} rebind.haios.test\n")
    add_profile(world, "rebind", ["rebind.haios.test:443"])
    root = world.os_root(plan("rebind", [
        step("s", py("open('x', 'w').write('ran')"), profile="rebind", products=["x"])]))
    result = run_with_hosts(world, root, hosts_file)
    assert result.returncode == 6, result.stderr
    assert "rebind.haios.test" in result.stderr and reason in result.stderr
    assert traces(root) == []


def _own_address() -> str:
    """A non-loopback address configured on this host (from `ip -o addr`)."""
    output = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"],
                            capture_output=True, text=True, check=True).stdout
    for line in output.splitlines():
        return line.split()[3].split("/")[0]
    pytest.fail("the test host has no global IPv4 address")
