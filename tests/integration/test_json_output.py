# SPDX-License-Identifier: Apache-2.0
"""`--json` prints exactly one JSON object on every exit code (ADR 0005).

Threat: a client (an orchestrator piping `haios run --json` to `jq`) that gets
no object on a refusal reads "nothing" as success (`jq` exits 0 on empty
input). Each exit code is staged through the real CLI in a fresh process;
stdout must parse as one object (with `json.loads` and, when installed,
`jq -e`), validate against `schemas/`, and diagnostics stay on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.support.world import World, plan, py, read_json, sh, step

PROJECT = Path(__file__).resolve().parents[2]
SCHEMAS = PROJECT / "schemas"
RESULT_SCHEMA = json.loads((SCHEMAS / "command_result.schema.json").read_text())
STATE_SCHEMA = json.loads((SCHEMAS / "state.schema.json").read_text())


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "world")


def one_object(stdout: str) -> dict[str, Any]:
    """stdout is one JSON object on one line; jq agrees when it is installed."""
    assert stdout.count("\n") == 1 and stdout.endswith("\n"), repr(stdout)
    document = json.loads(stdout)
    assert isinstance(document, dict)
    jq = shutil.which("jq")
    if jq is None and os.environ.get("CI"):
        pytest.fail("jq is missing; CI installs Debian's jq package")
    if jq is not None:
        done = subprocess.run(
            [jq, "-e", "-c", ".schema"],
            input=stdout,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == document["schema"]
    return document


def refusal(stdout: str, *, code: int, status: str, reason: str | None = None) -> dict[str, Any]:
    document = one_object(stdout)
    jsonschema.validate(document, RESULT_SCHEMA)
    assert document["schema"] == "haios/command_result/v1"
    assert (document["exit_code"], document["status"], document["ok"]) == (code, status, False)
    if reason is not None:
        assert document["reason"] == reason
    assert document["message"]
    return document


def healthy_plan(plan_id: str = "json") -> dict[str, Any]:
    return plan(plan_id, [step("s", sh("echo ok > out.txt"), products=["out.txt"])])


def test_success_prints_the_state(world: World) -> None:
    root = world.os_root(healthy_plan())
    result = world.run(root, "--json")
    assert result.code == 0, result.stderr
    document = one_object(result.stdout)
    assert document == read_json(root / "state.json")
    jsonschema.validate(document, STATE_SCHEMA)


def test_step_failure_prints_the_state(world: World) -> None:
    root = world.os_root(plan("fails", [step("s", sh("exit 9"))]))
    result = world.run(root, "--json")
    assert result.code == 1, result.stderr
    document = one_object(result.stdout)
    assert document == read_json(root / "state.json")
    assert document["status"] == "failed"


def test_budget_halt_prints_the_state(world: World) -> None:
    spend = py(
        "import json, os; json.dump({'usd': 2.0, 'tokens': 0}, "
        "open(os.environ['HAIOS_COST_REPORT'], 'w'))"
    )
    root = world.os_root(
        plan("budget", [step("a", spend), step("b", sh("true"), needs=["a"])], budget={"usd": 1.0})
    )
    result = world.run(root, "--json")
    assert result.code == 5, result.stderr
    document = one_object(result.stdout)
    assert document["status"] == "budget_exhausted"
    assert document == read_json(root / "state.json")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["run", "--json"], id="missing-os-root"),
        pytest.param(["run", "/nonexistent", "--json", "--jobs", "0"], id="jobs-zero"),
        pytest.param(
            ["run", "/nonexistent", "--json", "--metrics-addr", "example.com:1"],
            id="metrics-addr-hostname",
        ),
        pytest.param(["state", "--json", "--bogus"], id="unknown-option"),
    ],
)
def test_usage_error_prints_one_object(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "haios", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    document = refusal(done.stdout, code=2, status="usage_error", reason="usage")
    assert document["command"] == args[0]
    assert document["state"] is None
    assert "Usage:" in done.stderr  # the human diagnostic stays on stderr


def test_usage_error_without_json_keeps_stdout_empty() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "haios", "run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (2, "")


def test_unsigned_plan_prints_the_rejected_state(world: World) -> None:
    root = world.os_root(healthy_plan())
    (root / "exec_plan.json.sig").unlink()
    result = world.run(root, "--json")
    assert result.code == 3, result.stderr
    document = refusal(result.stdout, code=3, status="rejected")
    assert document["command"] == "run"
    assert document["error_class"].endswith("Error")
    # the engine wrote a `rejected` state for this fresh os_root; it is the one printed
    assert document["state"] == read_json(root / "state.json")
    assert document["state"]["status"] == "rejected"
    assert document["message"] in result.stderr  # the same diagnostic, on stderr


def test_rejection_into_history_reports_the_untouched_state(world: World) -> None:
    root = world.os_root(healthy_plan())
    assert world.run(root).code == 0
    world.write_plan(root, healthy_plan("other"))
    result = world.run(root, "--json")
    assert result.code == 3, result.stderr
    document = refusal(result.stdout, code=3, status="rejected")
    # this invocation was rejected; the os_root still holds the earlier success
    assert document["state"]["status"] == "succeeded"


def test_kill_flag_at_start_prints_one_object(world: World) -> None:
    root = world.os_root(healthy_plan())
    (root / "control" / "KILL").write_text("")
    result = world.run(root, "--json")
    assert result.code == 4, result.stderr
    document = refusal(result.stdout, code=4, status="killed", reason="killed")
    assert document["state"] is None


def test_invalid_policy_prints_one_object(world: World) -> None:
    root = world.os_root(healthy_plan())
    (world.policy / "policy.toml").write_text('schema = "haios/policy/v1"\n')
    result = world.run(root, "--json")
    assert result.code == 6, result.stderr
    document = refusal(result.stdout, code=6, status="environment_unavailable", reason="policy")
    assert document["state"] is None
    state = world.state(root, "--json")
    assert state.code == 6
    refusal(state.stdout, code=6, status="environment_unavailable", reason="policy")


def test_busy_os_root_prints_one_object(world: World) -> None:
    root = world.os_root(plan("busy", [step("slow", sh("sleep 5"), timeout_seconds=60)]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    first = subprocess.Popen(
        [sys.executable, "-m", "haios", "run", str(root), "--policy", str(world.policy)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state_file = root / "state.json"
            if state_file.exists() and read_json(state_file)["status"] == "running":
                break
            time.sleep(0.05)
        result = world.run(root, "--json")
        assert result.code == 7, result.stderr
        refusal(result.stdout, code=7, status="busy", reason="busy")
    finally:
        first.wait(timeout=60)
    assert first.returncode == 0


def test_internal_error_prints_one_object(world: World) -> None:
    """A bug (here: run_command replaced by one that raises) is exit 70 with its object."""
    root = world.os_root(healthy_plan())
    program = (
        "import sys, haios.app\n"
        "def broken(*a, **k):\n"
        "    raise RuntimeError('secret-looking text that must not be printed')\n"
        "haios.app.run_command = broken\n"
        "from haios.cli.main import main\n"
        "main(sys.argv[1:])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, "run", str(root), "--policy", str(world.policy), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 70, done.stderr
    document = refusal(done.stdout, code=70, status="internal_error", reason="internal")
    assert document["error_class"] == "RuntimeError"
    assert "secret-looking" not in done.stdout + done.stderr


def test_state_of_an_empty_os_root_prints_one_object(world: World) -> None:
    root = world.os_root(healthy_plan())
    result = world.state(root, "--json")
    assert result.code == 3, result.stderr
    document = refusal(result.stdout, code=3, status="rejected", reason="input")
    assert document["command"] == "state"
    assert document["state"] is None


def test_state_of_a_tampered_state_prints_one_object(world: World) -> None:
    root = world.os_root(healthy_plan())
    assert world.run(root).code == 0
    state = read_json(root / "state.json")
    state["steps"]["s"]["attempts"] = 2
    (root / "state.json").write_text(json.dumps(state))
    result = world.state(root, "--json")
    assert result.code == 3, result.stderr
    document = refusal(result.stdout, code=3, status="rejected", reason="tampered")
    assert document["state"] is None
    run = world.run(root, "--json")
    assert run.code == 3
    assert refusal(run.stdout, code=3, status="rejected")["state"] is None


def test_refusal_without_json_keeps_stdout_empty(world: World) -> None:
    root = world.os_root(healthy_plan())
    (root / "exec_plan.json.sig").unlink()
    result = world.run(root)
    assert (result.code, result.stdout) == (3, "")
    assert result.stderr.strip()
