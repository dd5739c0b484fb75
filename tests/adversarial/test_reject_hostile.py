# SPDX-License-Identifier: Apache-2.0
"""Hostile bytes in names and layout are refused like any other contract violation.

Threats T-I02 (unknown fields) and T-I07 (symlink tricks in os_root). The
attacker writes os_root: a signed plan whose step carries an unknown key
made of control characters (NUL, an escape sequence, a line separator), a
file whose name holds such characters, or a client directory replaced by a
symlink. Expected: exit 3, a one-line stderr reason with every control
character escaped, nothing ran, and the same signed `rejected` state and
audit record as every other refusal (T-MT08).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from haios._util.strict_json import printable
from tests.adversarial.conftest import DATA, baseline_plan
from tests.adversarial.helpers import assert_refused
from tests.support.world import World

HOSTILE_KEYS = {
    "nul": "\x00",
    "nul_inside": "priv\x00ileged",
    "escape": "\x1b",
    "escape_sequence": "\x1b[2J\x1b[31mred",
    "osc_title": "\x1b]0;owned\x07",
    "newline": "ok\nhaios: fake second line",
    "carriage_return": "\rhidden",
    "delete": "\x7f",
    "c1_csi": "\x9b2J",
    "line_separator": "\u2028",
}


def _assert_no_raw_controls(text: str) -> None:
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].isprintable(), repr(text)


def _audit_rejections(root: Path) -> list[dict[str, object]]:
    records = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]
    return [record["fields"] for record in records if record["kind"] == "rejection"]


@pytest.mark.parametrize("key", list(HOSTILE_KEYS.values()), ids=list(HOSTILE_KEYS))
def test_unknown_step_key_with_control_characters_is_rejected(world: World, key: str) -> None:
    document = baseline_plan()
    document["steps"][0][key] = True  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    result = world.run(root)
    assert_refused(result, 3, root, reason=f"steps.0.{printable(key)}: unknown field",
                   world=world)
    _assert_no_raw_controls(result.stderr)
    state = json.loads((root / "state.json").read_text())
    assert state["reason"] == f"exec_plan.json: steps.0.{printable(key)}: unknown field"
    assert _audit_rejections(root) == [{"reason": "schema", "message": state["reason"]}]


@pytest.mark.parametrize("key", ["\x00", "\x1b[31m", "\u2028"], ids=["nul", "escape", "ls"])
def test_env_key_with_control_characters_is_rejected(world: World, key: str) -> None:
    document = baseline_plan()
    document["steps"][0]["env"] = {key: "x"}  # type: ignore[index]
    root = world.os_root(document, {"data.csv": DATA})
    result = world.run(root)
    assert_refused(result, 3, root, reason=printable(key), world=world)
    _assert_no_raw_controls(result.stderr)


def test_unknown_top_level_key_with_nul_is_rejected(world: World) -> None:
    document = baseline_plan()
    document["\x00"] = 1
    root = world.os_root(document, {"data.csv": DATA})
    result = world.run(root)
    assert_refused(result, 3, root, reason="exec_plan.json: \\x00: unknown field", world=world)
    _assert_no_raw_controls(result.stderr)


def test_signature_envelope_key_with_nul_is_rejected(world: World, baseline: Path) -> None:
    sig = baseline / "exec_plan.json.sig"
    envelope = json.loads(sig.read_text())
    envelope["\x00\x1b[2J"] = "x"
    sig.write_text(json.dumps(envelope))
    result = world.run(baseline)
    assert_refused(result, 3, baseline, world=world)
    _assert_no_raw_controls(result.stderr)


HOSTILE_LINK = "\x1b]0;owned\x07\x7f.link"


def _plant_hostile_link_name(root: Path) -> None:
    (root / "links" / HOSTILE_LINK).symlink_to("/etc/passwd")


def test_hostile_file_name_is_escaped_in_state_and_audit(world: World, baseline: Path) -> None:
    _plant_hostile_link_name(baseline)
    result = world.run(baseline)
    assert result.code == 3, result.stderr
    state = json.loads((baseline / "state.json").read_text())
    assert state["status"] == "rejected"
    assert state["reason"] == f"os_root/links/{printable(HOSTILE_LINK)}: cannot open (a symlink)"
    assert _audit_rejections(baseline) == [{"reason": "path", "message": state["reason"]}]
    assert world.state(baseline).code == 0


def test_hostile_file_name_is_escaped_on_stderr(world: World, baseline: Path) -> None:
    _plant_hostile_link_name(baseline)
    result = world.run(baseline)
    assert result.code == 3
    _assert_no_raw_controls(result.stderr)


@pytest.mark.parametrize("name", ["links", "artefacts", "cost", "logs"])
def test_client_directory_replaced_by_symlink_is_rejected_and_recorded(
        world: World, tmp_path: Path, name: str) -> None:
    root = world.os_root(baseline_plan(), {"data.csv": DATA})
    elsewhere = tmp_path / f"real-{name}"
    if (root / name).exists():
        os.replace(root / name, elsewhere)
    else:
        elsewhere.mkdir()
    (root / name).symlink_to(elsewhere)
    result = world.run(root)
    assert_refused(result, 3, root, reason=f"os_root/{name}")
    assert (root / name).is_symlink()  # refused, never replaced or followed
    state = json.loads((root / "state.json").read_text())
    assert state["status"] == "rejected" and f"os_root/{name}" in state["reason"], state
    assert _audit_rejections(root) == [{"reason": "path", "message": state["reason"]}]
    # `haios state` verifies the rejected state; it reads cost/ as well, so it
    # refuses the symlinked cost/ in turn.
    assert world.state(root).code == (3 if name == "cost" else 0)
