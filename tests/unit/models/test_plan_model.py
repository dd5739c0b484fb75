# SPDX-License-Identifier: Apache-2.0
"""exec_plan.json parsing refuses every malformed plan the catalog lists (A1-A15)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from haios.errors import InputError, SchemaError
from haios.load.parse import parse_model
from haios.models.plan import ExecPlan

BASE: dict[str, Any] = {
    "schema": "haios/exec_plan/v1", "plan_id": "t", "expires": "2030-01-01T00:00:00Z",
    "budget": {}, "inputs": [{"name": "data.csv", "sha256": "a" * 64}],
    "steps": [
        {"id": "s1", "run": ["/bin/sh", "-c", "cat data.csv > out.txt"], "needs": [],
         "materials": ["data.csv"], "products": ["out.txt"], "profile": "default",
         "vault_scope": None, "env": {}, "timeout_seconds": 30},
        {"id": "s2", "run": ["/bin/true"], "needs": ["s1"], "materials": ["out.txt"],
         "products": ["final.txt"]},
    ],
}


def parse(plan: dict[str, Any]) -> ExecPlan:
    return parse_model(ExecPlan, json.dumps(plan).encode(), label="exec_plan.json", max_depth=32)


def mutated(path: str, value: Any) -> dict[str, Any]:
    plan = copy.deepcopy(BASE)
    target: Any = plan
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return plan


def test_base_plan_parses() -> None:
    plan = parse(BASE)
    assert plan.step("s2").profile == "default"
    assert plan.producer_of() == {"out.txt": "s1", "final.txt": "s2"}


@pytest.mark.parametrize(("path", "value"), [
    ("steps.0.privileged", True), ("steps.0.uid", 0), ("schema", "haios/exec_plan/v2"),
    ("priority", "high"),
    ("steps.0.timeout_seconds", True), ("steps.0.timeout_seconds", 30.0),
    ("steps.0.timeout_seconds", "30"), ("steps.0.timeout_seconds", 0),
    ("steps.0.timeout_seconds", -1), ("steps.0.timeout_seconds", 10**15),
    ("steps.0.run", "rm -rf ~"), ("steps.0.run", []), ("steps.0.run", ["sh", "-c", "x"]),
    ("steps.0.run", ["/bin/echo", "a\x00b"]), ("steps.0.needs", "s0"), ("steps.0.env", []),
    ("plan_id", "S1"), ("plan_id", "s1\n"), ("plan_id", "\u0455" + "1"), ("plan_id", "a" * 65),
    ("plan_id", ""), ("steps.0.id", "S1"),
    ("steps.0.products", ["../policy"]), ("steps.0.products", ["/etc/passwd"]),
    ("steps.0.products", ["a/b"]), ("steps.0.products", ["x.sig"]),
    ("steps.0.products", ["-rf"]), ("steps.0.products", [".hidden"]),
    ("steps.0.products", ["a" * 129]), ("steps.0.products", ["data.csv "]),
    ("steps.0.products", ["data.csv"]), ("steps.0.products", ["out.txt", "out.txt"]),
    ("steps.1.products", ["out.txt"]), ("steps.1.products", ["OUT.txt"]),
    ("steps.0.needs", ["s2"]), ("steps.0.needs", ["s1"]), ("steps.0.needs", ["nope"]),
    ("steps.1.needs", []), ("steps.1.materials", ["ghost.txt"]),
    ("expires", "2026-13-01T00:00:00Z"), ("expires", "2030-01-01T00:00:00"),
    ("expires", "2030-01-01T23:59:60Z"), ("expires", "2030-01-01T00:00:00." + "1" * 10000 + "Z"),
    ("budget", {"usd": -5}), ("budget", {"usd": "1"}), ("budget", {"gpu": 1}),
    ("steps.0.env", {"ld_preload": "x"}), ("steps.0.env", {"A=B": "x"}),
    ("steps.0.env", {"X": "a\x00"}), ("inputs", [{"name": "data.csv", "sha256": "A" * 64}]),
    ("steps", []),
])
def test_malformed_plans_are_refused(path: str, value: Any) -> None:
    with pytest.raises(InputError):
        parse(mutated(path, value))


@pytest.mark.parametrize("raw", [
    b'{"schema": "haios/exec_plan/v1", "budget": {"usd": NaN}}',
    b'{"budget": {"cpu_seconds": Infinity}}', b'{"budget": {"usd": 1e400}}',
    b"\xef\xbb\xbf{}", b"[]", b"{} {}",
])
def test_malformed_json_is_refused(raw: bytes) -> None:
    with pytest.raises(InputError):
        parse_model(ExecPlan, raw, label="exec_plan.json", max_depth=32)


def test_duplicate_run_key_is_refused_not_last_wins() -> None:
    text = json.dumps(BASE).replace('"run": ["/bin/true"]',
                                    '"run": ["/bin/true"], "run": ["/bin/sh"]', 1)
    with pytest.raises(InputError, match="duplicate key 'run'"):
        parse_model(ExecPlan, text.encode(), label="exec_plan.json", max_depth=32)


def test_unknown_field_reason_names_the_field() -> None:
    with pytest.raises(SchemaError, match="steps.0.privileged: unknown field"):
        parse(mutated("steps.0.privileged", True))


def test_cycle_reason_names_the_cycle() -> None:
    with pytest.raises(SchemaError, match="cycle"):
        parse(mutated("steps.0.needs", ["s2"]))


CONTROL_KEYS = {
    "nul": ("\x00", "\\x00"),
    "escape_sequence": ("\x1b[2J\x1b[31mx", "\\x1b[2J\\x1b[31mx"),
    "osc_title": ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
    "newline": ("a\nb", "a\\x0ab"),
    "delete": ("a\x7fb", "a\\x7fb"),
    "c1_csi": ("\x9b31m", "\\x9b31m"),
    "line_separator": ("\u2028", "\\u2028"),
    "bidi_override": ("\u202etxt_exe", "\\u202etxt_exe"),
}


@pytest.mark.parametrize(("key", "shown"), list(CONTROL_KEYS.values()), ids=list(CONTROL_KEYS))
def test_unknown_key_with_control_characters_is_a_schema_error_escaped(key: str,
                                                                       shown: str) -> None:
    with pytest.raises(SchemaError) as caught:
        parse(mutated(f"steps.0.{key}", True))
    message = str(caught.value)
    assert message == f"exec_plan.json: steps.0.{shown}: unknown field"
    assert message.isprintable()


@pytest.mark.parametrize(("key", "shown"), list(CONTROL_KEYS.values()), ids=list(CONTROL_KEYS))
def test_env_key_with_control_characters_is_escaped(key: str, shown: str) -> None:
    with pytest.raises(SchemaError) as caught:
        parse(mutated("steps.0.env", {key: "x"}))
    message = str(caught.value)
    assert shown in message and message.isprintable()
