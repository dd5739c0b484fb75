# SPDX-License-Identifier: Apache-2.0
"""End-to-end runs of the real engine: real keys, real sandboxed children."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.adversarial.conftest import DATA, baseline_plan
from tests.adversarial.helpers import traces
from tests.support.world import World, plan, py, read_json, sh, step

COUNT = "tail -n +2 data.csv | wc -l | tr -d ' \\n' > count.txt"
REPORT = ("import json, os\nn = int(open('count.txt').read())\n"
          "open('report.txt', 'w').write(f'rows={n}\\n')\n"
          "json.dump({'usd': 0.25, 'tokens': 10}, open(os.environ['HAIOS_COST_REPORT'], 'w'))\n")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "world")


def two_step_plan() -> dict[str, object]:
    return plan("happy", [
        step("count", sh(COUNT), materials=["data.csv"], products=["count.txt"]),
        step("report", py(REPORT), needs=["count"], materials=["count.txt"],
             products=["report.txt"]),
    ], {"data.csv": DATA})


def test_happy_path_outputs_verify(world: World) -> None:
    root = world.os_root(two_step_plan(), {"data.csv": DATA})
    result = world.run(root, "--json")
    assert result.code == 0, result.stderr
    state = result.json()
    assert state["status"] == "succeeded"
    assert (root / "artefacts" / "report.txt").read_bytes() == b"rows=1\n"
    assert state["cost"]["totals"]["usd"] == 0.25 and state["cost"]["totals"]["tokens"] == 10
    assert read_json(root / "cost" / "report.json")["reported"] == {"usd": 0.25, "tokens": 10}
    assert world.state(root, "--json").json() == read_json(root / "state.json")
    registry = read_json(root / "registry_map.json")["artefacts"]
    assert registry["data.csv"]["origin"] == "input"
    assert registry["report.txt"]["origin"] == "step:report"


def test_engine_links_pass_stock_in_toto_verify(world: World, tmp_path: Path) -> None:
    from in_toto.models.layout import Layout, Step
    from in_toto.models.metadata import Metablock

    root = world.os_root(two_step_plan(), {"data.csv": DATA})
    assert world.run(root).code == 0
    owner = world.outsider
    layout = Layout()
    layout.set_relative_expiration(days=1)
    layout.add_functionary_key_from_path(str(world.engine.public_path))
    layout.steps = [
        Step(name="count", pubkeys=[world.engine.keyid], expected_command=["/bin/sh", "-c", COUNT],
             expected_materials=[["ALLOW", "data.csv"], ["DISALLOW", "*"]],
             expected_products=[["CREATE", "count.txt"], ["DISALLOW", "*"]]),
        Step(name="report", pubkeys=[world.engine.keyid],
             expected_command=["/usr/bin/python3", "-c", REPORT],
             expected_materials=[["MATCH", "count.txt", "WITH", "PRODUCTS", "FROM", "count"],
                                 ["DISALLOW", "*"]],
             expected_products=[["CREATE", "report.txt"], ["DISALLOW", "*"]]),
    ]
    block = Metablock(signed=layout)
    block.create_signature(owner.signer)
    block.dump(str(tmp_path / "root.layout"))
    verify = [str(Path(sys.executable).with_name("in-toto-verify")), "--layout",
              str(tmp_path / "root.layout"), "--verification-keys", str(owner.public_path),
              "--link-dir", str(root / "links")]
    done = subprocess.run(verify, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # Tampering with a product's recorded digest breaks verification.
    link = root / "links" / f"count.{world.engine.keyid[:8]}.link"
    link.write_text(link.read_text().replace('"sha256": "', '"sha256": "0', 1))
    done = subprocess.run(verify, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode != 0


def test_link_records_confinement(world: World) -> None:
    root = world.os_root(two_step_plan(), {"data.csv": DATA})
    assert world.run(root).code == 0
    link = read_json(root / "links" / f"count.{world.engine.keyid[:8]}.link")
    confinement = json.dumps(link["signed"]["environment"]["haios_confinement"])
    profile = (world.policy / "profiles" / "default.toml").read_bytes()
    assert hashlib.sha256(profile).hexdigest() in confinement
    assert '"network": "none"' in confinement


def test_idempotent_rerun_runs_nothing(world: World) -> None:
    root = world.os_root(plan("stamp", [step("stamp", py(
        "import os; open('s.txt','w').write(os.urandom(8).hex())"), products=["s.txt"])]))
    assert world.run(root).code == 0
    before = read_json(root / "state.json")
    stamp = (root / "artefacts" / "s.txt").read_bytes()
    again = world.run(root)
    assert again.code == 0, again.stderr
    assert read_json(root / "state.json")["steps"] == before["steps"]
    assert (root / "artefacts" / "s.txt").read_bytes() == stamp


def test_failing_step_halts_and_skips_dependents(world: World) -> None:
    root = world.os_root(plan("fail", [
        step("a", sh("echo boom >&2; exit 3"), products=["a.txt"]),
        step("b", sh("echo b > b.txt"), needs=["a"], products=["b.txt"]),
        step("c", sh("echo c > c.txt"), products=["c.txt"]),
    ]))
    result = world.run(root)
    assert result.code == 1, result.stderr
    state = read_json(root / "state.json")
    assert state["status"] == "failed"
    assert (state["steps"]["a"]["status"], state["steps"]["a"]["exit_code"]) == ("failed", 3)
    assert state["steps"]["b"]["status"] == "skipped" and state["steps"]["b"]["started"] is None
    assert b"boom" in (root / "logs" / "a.err").read_bytes()
    assert world.state(root).code == 0


def test_timeout_is_timed_out(world: World) -> None:
    root = world.os_root(plan("slow", [step("slow", sh("sleep 30"), timeout_seconds=1)]))
    started = time.monotonic()
    result = world.run(root)
    assert result.code == 1
    assert read_json(root / "state.json")["steps"]["slow"]["status"] == "timed_out"
    assert time.monotonic() - started < 25


def test_missing_product_fails_the_step(world: World) -> None:
    root = world.os_root(plan("missing", [step("s", sh("true"), products=["never.txt"])]))
    assert world.run(root).code == 1
    assert "not produced" in read_json(root / "state.json")["steps"]["s"]["reason"]


@pytest.mark.parametrize("report", ['{"usd": -5}', '{"usd": NaN}', '{"tokens": 1, "tokens": 2}',
                                   '{"usd": 1e400}', "x" * 5000, '{"other": 1}'])
def test_malformed_cost_report_fails_the_step(world: World, report: str) -> None:
    script = ("import os; open('o.txt','w').write('x'); "
              f"open(os.environ['HAIOS_COST_REPORT'],'w').write({report!r})")
    root = world.os_root(plan("cost", [step("s", py(script), products=["o.txt"])]))
    assert world.run(root).code == 1
    assert "malformed cost report" in read_json(root / "state.json")["steps"]["s"]["reason"]


def test_symlinked_product_fails_the_step(world: World) -> None:
    root = world.os_root(plan("link", [step("s", sh("ln -s /etc/passwd out.txt"),
                                            products=["out.txt"])]))
    assert world.run(root).code == 1
    assert "not a regular file" in read_json(root / "state.json")["steps"]["s"]["reason"]
    assert not (root / "artefacts" / "out.txt").exists()


def test_replayed_plan_into_history_is_refused(world: World) -> None:
    root = world.os_root(baseline_plan(), {"data.csv": DATA})
    assert world.run(root).code == 0
    state_before = (root / "state.json").read_bytes()
    other = baseline_plan()
    other["plan_id"] = "t2"
    world.write_plan(root, other)
    result = world.run(root)
    assert result.code == 3 and "another plan" in result.stderr
    assert (root / "state.json").read_bytes() == state_before  # history is never overwritten


@pytest.mark.parametrize("target", ["state.json", "registry_map.json", "cost/s1.json",
                                    "audit.jsonl"])
def test_tampered_engine_output_is_detected_by_state(world: World, target: str) -> None:
    root = world.os_root(baseline_plan(), {"data.csv": DATA})
    assert world.run(root).code == 0
    path = root / target
    data = path.read_bytes()
    index = data.index(b"t")
    path.write_bytes(data[:index] + b"T" + data[index + 1:])
    assert world.state(root).code == 3


def test_tampered_product_is_never_accepted_on_rerun(world: World) -> None:
    root = world.os_root(baseline_plan(), {"data.csv": DATA})
    assert world.run(root).code == 0
    (root / "artefacts" / "out.txt").write_bytes(b"evil")
    result = world.run(root)
    assert result.code == 3, result.stderr


def test_resume_after_engine_crash_does_not_rerun_succeeded_steps(world: World) -> None:
    root = world.os_root(plan("resume", [
        step("first", py("import os; open('a.txt','w').write(os.urandom(8).hex())"),
             products=["a.txt"]),
        step("second", sh("sleep 3; cp a.txt b.txt"), needs=["first"], materials=["a.txt"],
             products=["b.txt"], timeout_seconds=60),
    ]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    engine = subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                               str(world.policy)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state_file = root / "state.json"
        if state_file.exists() and read_json(state_file)["steps"]["second"]["status"] == "running":
            break
        time.sleep(0.05)
    first = (root / "artefacts" / "a.txt").read_bytes()
    os.kill(engine.pid, signal.SIGKILL)
    engine.wait()
    time.sleep(0.5)
    result = world.run(root, timeout=120)
    assert result.code == 0, result.stderr
    state = read_json(root / "state.json")
    assert state["steps"]["first"]["attempts"] == 1
    assert state["steps"]["second"]["attempts"] == 2
    assert (root / "artefacts" / "a.txt").read_bytes() == first
    assert (root / "artefacts" / "b.txt").read_bytes() == first


def test_rejected_run_leaves_no_trace_and_later_plan_runs(world: World) -> None:
    root = world.os_root(baseline_plan(), {"data.csv": DATA})
    (root / "exec_plan.json.sig").unlink()
    assert world.run(root).code == 3
    assert traces(root) == []
    world.write_plan(root, baseline_plan())
    assert world.run(root).code == 0


def test_many_steps_do_not_leak_descriptors(world: World) -> None:
    """100 steps under a soft limit of 64 open files: a per-step descriptor leak fails."""
    import resource

    root = world.os_root(plan("fds", [step(f"s{i:03d}", ["/bin/true"]) for i in range(100)]))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    done = subprocess.run(
        [sys.executable, "-m", "haios", "run", str(root), "--policy", str(world.policy)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)))
    assert done.returncode == 0, done.stderr
