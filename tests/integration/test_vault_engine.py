# SPDX-License-Identifier: Apache-2.0
"""Per-step Vault tokens through the real engine and a real OpenBao dev server.

Threats T-V* (threat_model/vault.md): a step token is scoped, TTL-bounded,
revoked when the step ends, useless once leaked, and never written by the
engine anywhere.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.adversarial.helpers import traces
from tests.support.openbao import ENGINE_POLICY, REPORTS_POLICY, REPORTS_POLICY_HCL, OpenBaoServer
from tests.support.world import World, plan, py, read_json, sh, step

PROBE = r"""
import json, os, urllib.request, urllib.error
addr = os.environ["VAULT_ADDR"]
token = open(os.environ["HAIOS_VAULT_TOKEN_FILE"]).read().strip()
def get(path):
    req = urllib.request.Request(addr + path, headers={"X-Vault-Token": token})
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, None
allowed = get("/v1/secret/data/reports/q1")
denied = get("/v1/secret/data/other/x")
me = get("/v1/auth/token/lookup-self")  # needs the default policy, which the token lacks
json.dump({"token": token, "allowed": allowed[0], "value": allowed[1]["data"]["data"],
           "denied": denied[0], "lookup_self": me[0], "env": sorted(os.environ)},
          open("probe.json", "w"))
"""
ENV_PROBE = "import json, os; json.dump(sorted(os.environ), open('env.json', 'w'))"


@pytest.fixture
def vault_world(tmp_path: Path, openbao: OpenBaoServer) -> tuple[World, dict[str, str]]:
    world = World(tmp_path / "world", vault_scopes={"reports": {
        "policies": [REPORTS_POLICY], "ttl_seconds": 120}})
    env = {"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": openbao.create_token([ENGINE_POLICY])}
    return world, env


def _encodings(secret: str) -> list[bytes]:
    raw = secret.encode()
    return [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw), raw.hex().encode(),
            urllib.parse.quote(secret).encode()]


def _files_containing(root: Path, secret: str, skip: Callable[[Path], bool]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and not skip(path):
            data = path.read_bytes()
            if any(form in data for form in _encodings(secret)):
                hits.append(str(path.relative_to(root)))
    return hits


def test_scoped_step_reads_its_secret_and_token_dies_after(
        vault_world: tuple[World, dict[str, str]], openbao: OpenBaoServer) -> None:
    world, env = vault_world
    root = world.os_root(plan("vault", [
        step("probe", py(PROBE), profile="network", vault_scope="reports",
             products=["probe.json"], timeout_seconds=30),
        step("plain", py(ENV_PROBE), products=["env.json"]),
    ]))
    result = world.run(root, env=env)
    assert result.code == 0, result.stderr
    probe = read_json(root / "artefacts" / "probe.json")
    assert (probe["allowed"], probe["value"], probe["denied"]) == (200, {"total": "42"}, 403)
    assert probe["lookup_self"] == 403  # no `default` policy: only the scope's policies
    assert "VAULT_TOKEN" not in probe["env"] and "HAIOS_VAULT_TOKEN_FILE" in probe["env"]
    assert not {"VAULT_ADDR", "HAIOS_VAULT_TOKEN_FILE", "VAULT_TOKEN"} & set(
        read_json(root / "artefacts" / "env.json"))
    token = probe["token"]
    # The leaked token is useless now: Vault no longer knows it.
    client = openbao.client(token)
    with pytest.raises(Exception, match="permission denied|invalid token|bad token"):
        client.auth.token.lookup_self()
    audit = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]
    issued_records = [r["fields"] for r in audit if r["kind"] == "vault.token_issued"]
    accessors = [f["accessor"] for f in issued_records]
    assert [f["step_id"] for f in issued_records] == ["run", "probe"]  # session, then step
    assert all(openbao.lookup_accessor(a) is None for a in accessors)
    issued = issued_records[1]
    assert 0 < issued["ttl_seconds"] <= 30  # bounded by the step's timeout, under the scope's 120
    assert any(r["kind"] == "vault.token_revoked" for r in audit)
    state = read_json(root / "state.json")
    assert state["steps"]["probe"]["token_accessors"] == []
    assert state["vault_sessions"] == []  # the run's parent token was revoked too
    # The engine wrote the token nowhere; only the step's own product holds it.
    hits = _files_containing(root, token, skip=lambda p: p.name == "probe.json")
    assert hits == []
    assert token not in result.stdout + result.stderr
    assert not (root / ".haios" / "secret" / "probe").exists()


def test_vault_down_before_the_run_is_exit_6(vault_world: tuple[World, dict[str, str]],
                                            openbao_factory: Callable[[], OpenBaoServer]
                                            ) -> None:
    world, env = vault_world
    server = openbao_factory()
    env = {"VAULT_ADDR": server.addr, "VAULT_TOKEN": server.root_token}
    server.stop()
    root = world.os_root(plan("down", [step("probe", py(PROBE), profile="network",
                                            vault_scope="reports", products=["probe.json"])]))
    result = world.run(root, env=env)
    assert result.code == 6, result.stderr
    assert traces(root) == []


def test_missing_vault_environment_is_exit_6(vault_world: tuple[World, dict[str, str]]) -> None:
    world, _ = vault_world
    root = world.os_root(plan("noenv", [step("probe", py(PROBE), profile="network",
                                             vault_scope="reports", products=["probe.json"])]))
    result = world.run(root)
    assert result.code == 6 and "VAULT_ADDR" in result.stderr, result.stderr


def test_vault_dying_mid_run_fails_cleanly(vault_world: tuple[World, dict[str, str]],
                                          openbao_factory: Callable[[], OpenBaoServer]) -> None:
    world, _ = vault_world
    server = openbao_factory()
    server.write_policy(REPORTS_POLICY, REPORTS_POLICY_HCL)
    env = {"VAULT_ADDR": server.addr, "VAULT_TOKEN": server.root_token}
    root = world.os_root(plan("dies", [
        step("first", sh("sleep 3"), timeout_seconds=30),
        step("needs", py(PROBE), needs=["first"], profile="network", vault_scope="reports",
             products=["probe.json"]),
        step("later", sh("true"), needs=["needs"]),
    ]))
    engine = subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                               str(world.policy)], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = root / "state.json"
        if state.exists() and read_json(state)["steps"]["first"]["status"] == "running":
            break
        time.sleep(0.05)
    server.stop()
    _, stderr = engine.communicate(timeout=120)
    assert engine.returncode == 6, stderr
    assert "Traceback" not in stderr
    steps = read_json(root / "state.json")["steps"]
    assert steps["first"]["status"] == "succeeded"
    assert steps["needs"]["status"] == "failed" and steps["needs"]["started"] is not None
    assert steps["later"]["status"] == "skipped" and steps["later"]["started"] is None


def test_tokens_of_a_crashed_run_are_revoked_on_resume(
        vault_world: tuple[World, dict[str, str]], openbao: OpenBaoServer) -> None:
    world, env = vault_world
    root = world.os_root(plan("crash", [
        step("slow", sh("test -s \"$HAIOS_VAULT_TOKEN_FILE\" && sleep 3; echo ok > o.txt"),
             profile="network", vault_scope="reports", products=["o.txt"])]))
    engine = subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                               str(world.policy)], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    recorded: dict[str, object] = {}
    while time.monotonic() < deadline:
        state_file = root / "state.json"
        if state_file.exists():
            recorded = read_json(state_file)
            if recorded["steps"]["slow"]["token_accessors"]:
                break
        time.sleep(0.05)
    engine.kill()
    engine.wait()
    session = recorded["vault_sessions"][0]  # type: ignore[index]
    step_accessor = recorded["steps"]["slow"]["token_accessors"][0]  # type: ignore[index]
    assert openbao.lookup_accessor(step_accessor) is not None  # the dead engine revoked nothing
    result = world.run(root, env=env)
    assert result.code == 0, result.stderr
    assert openbao.lookup_accessor(session) is None
    assert openbao.lookup_accessor(step_accessor) is None
    assert read_json(root / "state.json")["vault_sessions"] == []
