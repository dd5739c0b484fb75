# SPDX-License-Identifier: Apache-2.0
"""Budgets halt plans (exit 5); metrics are served live and written at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.world import World, plan, py, read_json, sh, step

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
CHILD_BURN = ("import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
              "'import time\\nt = time.process_time()\\n"
              "while time.process_time() - t < 1.0: pass'], check=True)\n"
              "open('o.txt', 'w').write('x')\n")
REPORT = ("import json, os\njson.dump({{'usd': {usd}, 'tokens': {tokens}}}, "
          "open(os.environ['HAIOS_COST_REPORT'], 'w'))\n")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "world")


def _statuses(root: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in read_json(root / "state.json")["steps"].items()}


def test_cpu_budget_cuts_a_step_and_halts(world: World) -> None:
    root = world.os_root(plan("cpu", [
        step("burn", py(BURN.format(s=30))),
        step("later", sh("true"), needs=["burn"]),
    ], budget={"cpu_seconds": 1}))
    result = world.run(root)
    assert result.code == 5, result.stderr
    state = read_json(root / "state.json")
    assert state["status"] == "budget_exhausted"
    assert state["steps"]["burn"]["status"] == "failed"
    assert "budget" in state["steps"]["burn"]["reason"]
    assert state["steps"]["later"]["status"] == "skipped"


def test_wall_budget_bounds_the_timeout(world: World) -> None:
    root = world.os_root(plan("wall", [step("sleep", sh("sleep 20"), timeout_seconds=60)],
                              budget={"wall_seconds": 1}))
    started = time.monotonic()
    assert world.run(root).code == 5
    assert time.monotonic() - started < 15
    assert read_json(root / "state.json")["status"] == "budget_exhausted"


@pytest.mark.parametrize(("usd", "tokens", "budget"), [
    (0.6, 0, {"usd": 1.0}), (0, 600, {"tokens": 1000})])
def test_reported_costs_halt_before_the_next_step(world: World, usd: float, tokens: int,
                                                  budget: dict[str, float]) -> None:
    steps = [step(f"s{i}", py(REPORT.format(usd=usd, tokens=tokens)),
                  needs=[f"s{i - 1}"] if i else []) for i in range(4)]
    root = world.os_root(plan("reported", steps, budget=budget))
    assert world.run(root).code == 5
    statuses = _statuses(root)
    assert statuses["s0"] == statuses["s1"] == "succeeded"
    assert statuses["s2"] == statuses["s3"] == "skipped"


def test_cpu_of_children_is_counted(world: World) -> None:
    root = world.os_root(plan("children", [step("parent", py(CHILD_BURN), products=["o.txt"])]))
    assert world.run(root).code == 0
    measured = read_json(root / "cost" / "parent.json")["measured"]
    assert measured["cpu_seconds"] >= 0.9, measured


def test_budget_is_not_refunded_on_resume(world: World) -> None:
    root = world.os_root(plan("resume", [
        step("a", py(REPORT.format(usd=0.6, tokens=0))),
        step("b", sh("exit 1"), needs=["a"]),
    ], budget={"usd": 1.0}))
    assert world.run(root).code == 1
    first = read_json(root / "state.json")["cost"]["totals"]["usd"]
    assert first == pytest.approx(0.6)
    assert world.run(root).code == 1
    assert read_json(root / "state.json")["cost"]["totals"]["usd"] == pytest.approx(0.6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CONTRACT = {
    "haios_build_info": ("gauge", {"version", "contract"}),
    "haios_plan_runs": ("counter", {"outcome"}),
    "haios_steps": ("counter", {"outcome"}),
    "haios_steps_running": ("gauge", set()),
    "haios_step_duration_seconds": ("histogram", {"profile"}),
    "haios_verifications": ("counter", {"kind", "result"}),
    "haios_rejections": ("counter", {"reason"}),
    "haios_kill_switch_engaged": ("gauge", set()),
    "haios_kills": ("counter", {"scope"}),
    "haios_kill_latency_seconds": ("histogram", set()),
    "haios_vault_tokens_issued": ("counter", set()),
    "haios_vault_tokens_revoked": ("counter", set()),
    "haios_cost": ("counter", {"unit"}),
    "haios_budget_remaining": ("gauge", {"unit"}),
    "haios_sandbox_violations": ("counter", {"kind"}),
    # ADR 0004 (egress) adds these to the contract's table
    "haios_egress_connections": ("counter", {"outcome"}),
    "haios_egress_refusals": ("counter", {"reason"}),
    "haios_egress_bytes": ("counter", {"direction"}),
}


def _check_contract(text: str, forbidden: list[str]) -> None:
    families = {f.name: f for f in text_string_to_metric_families(text)
                if not f.name.endswith("_created")}  # the client's timestamps series
    assert set(families) == set(CONTRACT), sorted(set(families) ^ set(CONTRACT))
    for name, (kind, labels) in CONTRACT.items():
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            assert set(sample.labels) - {"le"} == labels, (sample.name, sample.labels)
            for value in sample.labels.values():
                assert not any(bad in value for bad in forbidden), (sample.name, value)


def test_metrics_scraped_live_and_written_at_the_end(world: World) -> None:
    root = world.os_root(plan("metrics", [step("wait", sh("sleep 2; echo ok > o.txt"),
                                               products=["o.txt"])]))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    engine = subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                               str(world.policy), "--metrics-addr", f"127.0.0.1:{port}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    text = ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                text = r.read().decode()
            if "haios_steps_running 1.0" in text:
                break
        except OSError:
            pass
        time.sleep(0.05)
    assert engine.wait(60) == 0
    assert "haios_steps_running 1.0" in text
    _check_contract(text, ["wait", str(root)])
    final = (root / "metrics.prom").read_text()
    _check_contract(final, ["wait", str(root)])
    assert 'haios_steps_total{outcome="succeeded"} 1.0' in final
