# SPDX-License-Identifier: Apache-2.0
"""Hostile client inputs are refused with the exact exit code; nothing runs.

Threats T-I01..T-I10 (threat_model/README.md); catalog sections A, B, D.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from haios.cli.client import sign_file, write_link
from tests.adversarial.conftest import DATA, baseline_plan
from tests.adversarial.helpers import assert_refused
from tests.support.keys import KeyFile
from tests.support.world import World, expires, plan, sh, step


def test_unsigned_plan(world: World, baseline: Path) -> None:
    (baseline / "exec_plan.json.sig").unlink()
    assert_refused(world.run(baseline), 3, baseline, reason="exec_plan.json.sig: missing",
                   world=world)


def test_empty_signature_file(world: World, baseline: Path) -> None:
    (baseline / "exec_plan.json.sig").write_bytes(b"")
    assert_refused(world.run(baseline), 3, baseline, world=world)


def test_plan_signed_by_wrong_key(world: World, baseline: Path) -> None:
    world.write_plan(baseline, baseline_plan(), key=world.outsider)
    assert_refused(world.run(baseline), 3, baseline, reason="no valid signature", world=world)


def test_plan_signed_by_functionary_role_confusion(world: World, baseline: Path) -> None:
    world.write_plan(baseline, baseline_plan(), key=world.agent)
    assert_refused(world.run(baseline), 3, baseline, world=world)


def test_below_threshold(world: World, tmp_path: Path) -> None:
    second = KeyFile(tmp_path / "k2", "planner2")
    world.write_policy(world.policy, planners=[world.planner, second], threshold=2)
    root = world.os_root(baseline_plan(), {"data.csv": DATA})
    assert_refused(world.run(root), 3, root, reason="1 of 2", world=world)


def test_same_key_twice_in_policy_is_invalid(world: World, baseline: Path) -> None:
    pem = world.planner.public_path.read_bytes()
    (world.policy / "keys" / "copy.pub.pem").write_bytes(pem.replace(b"\n", b"\n\n", 1))
    os.chmod(world.policy / "keys" / "copy.pub.pem", 0o644)
    text = (world.policy / "policy.toml").read_text().replace(
        'keys = ["keys/planner.pub.pem"]\nthreshold = 1',
        'keys = ["keys/planner.pub.pem", "keys/copy.pub.pem"]\nthreshold = 2')
    (world.policy / "policy.toml").write_text(text)
    assert_refused(world.run(baseline), 6, baseline, reason="same key")


def test_one_byte_changed_after_signing(world: World, baseline: Path) -> None:
    data = (baseline / "exec_plan.json").read_bytes()
    (baseline / "exec_plan.json").write_bytes(data + b"\n")
    assert_refused(world.run(baseline), 3, baseline, reason="digest", world=world)


def test_subject_swap(world: World, baseline: Path) -> None:
    (baseline / "inbox" / "other.csv").write_bytes(DATA)
    sign_file(baseline / "inbox" / "other.csv", world.agent.private_path)
    os.replace(baseline / "inbox" / "other.csv.sig", baseline / "inbox" / "data.csv.sig")
    assert_refused(world.run(baseline), 3, baseline, reason="signs 'other.csv'", world=world)


def test_input_digest_mismatch(world: World, baseline: Path) -> None:
    (baseline / "inbox" / "data.csv").write_bytes(b"evil\n")
    assert_refused(world.run(baseline), 3, baseline, reason="differs from the plan", world=world)


def test_expired_plan(world: World) -> None:
    root = world.os_root(baseline_plan(expires=expires(-1)), {"data.csv": DATA})
    assert_refused(world.run(root), 3, root, reason="expired", world=world)


def test_unknown_field(world: World) -> None:
    document = baseline_plan()
    document["steps"][0]["privileged"] = True  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    assert_refused(world.run(root), 3, root, reason="privileged: unknown field", world=world)


def test_duplicate_keys_in_plan(world: World, baseline: Path) -> None:
    text = json.dumps(baseline_plan()).replace(
        '"run": [', '"run": ["/bin/true"], "run": [', 1)
    world.write_plan(baseline, text.encode())
    assert_refused(world.run(baseline), 3, baseline, reason="duplicate key", world=world)


def test_dependency_cycle(world: World) -> None:
    document = plan("t", [step("a", sh("true"), needs=["b"]), step("b", sh("true"), needs=["a"])])
    root = world.os_root(document)
    assert_refused(world.run(root), 3, root, reason="cycle", world=world)


@pytest.mark.parametrize("name", ["../policy", "/etc/passwd", "a/b", ".hidden", "x.sig"])
def test_traversal_names(world: World, name: str) -> None:
    document = baseline_plan()
    document["steps"][0]["products"] = [name]  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    assert_refused(world.run(root), 3, root, world=world)


def test_symlinked_input(world: World, baseline: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_bytes(DATA)
    (baseline / "inbox" / "data.csv").unlink()
    (baseline / "inbox" / "data.csv").symlink_to(outside)
    assert_refused(world.run(baseline), 3, baseline, reason="symlink", world=world)


def test_fifo_plan_does_not_block(world: World, baseline: Path) -> None:
    (baseline / "exec_plan.json").unlink()
    os.mkfifo(baseline / "exec_plan.json")
    assert_refused(world.run(baseline, timeout=20), 3, baseline, reason="FIFO")


def test_symlinked_inbox_directory(world: World, baseline: Path, tmp_path: Path) -> None:
    os.replace(baseline / "inbox", tmp_path / "real-inbox")
    (baseline / "inbox").symlink_to(tmp_path / "real-inbox")
    assert_refused(world.run(baseline), 3, baseline, world=world)


def test_missing_link(world: World) -> None:
    root = world.os_root(baseline_plan(), {"data.csv": DATA}, links=False)
    assert_refused(world.run(root), 3, root, reason="no functionary-signed in-toto link",
                   world=world)


def test_link_by_untrusted_signer(world: World) -> None:
    root = world.os_root(baseline_plan(), {"data.csv": DATA}, links=False)
    write_link(["data.csv"], root / "inbox", root / "links", world.outsider.private_path)
    assert_refused(world.run(root), 3, root, reason="in-toto link", world=world)


def test_link_with_other_digest(world: World) -> None:
    root = world.os_root(baseline_plan(), {"data.csv": DATA}, links=False)
    (root / "inbox" / "data.csv").write_bytes(b"other")
    write_link(["data.csv"], root / "inbox", root / "links", world.agent.private_path)
    (root / "inbox" / "data.csv").write_bytes(DATA)
    assert_refused(world.run(root), 3, root, reason="in-toto link", world=world)


def test_oversize_plan_is_refused_without_reading(world: World, baseline: Path) -> None:
    with open(baseline / "exec_plan.json", "wb") as handle:
        handle.truncate(10 << 30)
    assert_refused(world.run(baseline, timeout=20), 3, baseline, reason="exceeds")


def test_deeply_nested_signature(world: World, baseline: Path) -> None:
    (baseline / "exec_plan.json.sig").write_bytes(b"[" * 30_000 + b"]" * 30_000)
    assert_refused(world.run(baseline, timeout=20), 3, baseline, reason="nesting", world=world)


@pytest.mark.parametrize("name", ["LD_PRELOAD", "PYTHONSTARTUP", "HAIOS_COST_REPORT",
                                  "BASH_ENV", "PATH"])
def test_denied_environment(world: World, name: str) -> None:
    document = baseline_plan()
    document["steps"][0]["env"] = {name: "x"}  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    assert_refused(world.run(root), 3, root, reason="denied", world=world)


def test_unknown_profile_and_scope(world: World) -> None:
    document = baseline_plan()
    document["steps"][0]["profile"] = "unconfined"  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    assert_refused(world.run(root), 3, root, reason="not in the policy", world=world)


def test_vault_scope_under_no_network_profile(tmp_path: Path) -> None:
    world = World(tmp_path / "w", vault_scopes={"reports": {"policies": ["haios-reports-read"]}})
    document = baseline_plan()
    document["steps"][0]["vault_scope"] = "reports"  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    assert_refused(world.run(root), 3, root, reason="network", world=world)


@pytest.mark.parametrize("planted", ["registry_map.json", "artefacts/out.txt", "cost/s1.json"])
def test_planted_engine_output_on_fresh_os_root(world: World, baseline: Path,
                                                planted: str) -> None:
    (baseline / planted).parent.mkdir(exist_ok=True)
    (baseline / planted).write_text("{}")
    result = world.run(baseline)
    assert result.code == 3 and "fresh os_root" in result.stderr, result.stderr


def test_planted_symlink_state_is_never_written_through(world: World, baseline: Path,
                                                        tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (baseline / "state.json").symlink_to(victim)
    result = world.run(baseline)
    assert result.code == 3, result.stderr
    assert victim.read_text() == "precious"


def test_global_kill_flag_refuses_before_reading_inputs(world: World, baseline: Path) -> None:
    (baseline / "control" / "KILL").mkdir()  # any entry type engages it
    assert_refused(world.run(baseline), 4, baseline, reason="KILL")


@pytest.mark.parametrize("args", [["--jobs", "0"], ["--jobs", "-1"], ["--jobs", "99999"],
                                  ["--metrics-addr", "999.1.1.1:x"], ["--bogus"]])
def test_usage_errors(world: World, baseline: Path, args: list[str]) -> None:
    result = world.run(baseline, *args)
    assert result.code == 2, result.stderr
    assert not (baseline / "state.json").exists()


@pytest.mark.parametrize("mutation", ["threshold0", "missing", "writable", "ledger"])
def test_hostile_policy_is_exit_6(world: World, baseline: Path, mutation: str) -> None:
    policy_file = world.policy / "policy.toml"
    if mutation == "threshold0":
        policy_file.write_text(policy_file.read_text().replace("threshold = 1", "threshold = 0", 1))
    elif mutation == "missing":
        policy_file.unlink()
    elif mutation == "writable":
        os.chmod(policy_file, 0o666)
    else:
        policy_file.write_text(policy_file.read_text() + '\n[ledger]\npath = "/var/lib/l"\n')
    assert_refused(world.run(baseline), 6, baseline)
    assert_refused(world.state(baseline), 6)


@pytest.mark.parametrize("planted", ["logs/s1.out", "artefacts/out.txt", "cost/s1.json",
                                     "metrics.prom"])
def test_planted_symlink_on_resume_is_refused_before_anything_runs(
        world: World, tmp_path: Path, planted: str) -> None:
    document = baseline_plan()
    document["steps"][0]["run"] = ["/bin/sh", "-c", "exit 1"]  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    assert world.run(root).code == 1  # history exists now: this is a resume
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = root / planted
    path.parent.mkdir(exist_ok=True)
    if path.exists():
        path.unlink()
    path.symlink_to(victim)
    attempts = json.loads((root / "state.json").read_text())["steps"]["s1"]["attempts"]
    result = world.run(root)
    assert result.code == 3 and "symlink" in result.stderr, result.stderr
    assert victim.read_text() == "precious"
    assert json.loads((root / "state.json").read_text())["steps"]["s1"]["attempts"] == attempts
