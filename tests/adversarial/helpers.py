# SPDX-License-Identifier: Apache-2.0
"""Assertions shared by adversarial tests: exact refusal, nothing ran."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.world import Result, World

TRACEBACK = "Traceback (most recent call last)"


def traces(root: Path) -> list[str]:
    """Every sign that a step ran: products, cost, logs, engine links, started steps."""
    found = []
    for sub in ("artefacts", "cost", "logs"):
        directory = root / sub
        if directory.is_dir():
            found += [f"{sub}/{p.name}" for p in directory.iterdir()]
    state = root / "state.json"
    if state.is_file():
        for step_id, entry in json.loads(state.read_text()).get("steps", {}).items():
            if entry.get("started") is not None or entry.get("status") not in (
                    "pending", "skipped"):
                found.append(f"state.steps.{step_id}")
    return found


def assert_refused(result: Result, code: int, root: Path | None = None, *,
                   reason: str | None = None, world: World | None = None) -> None:
    """Exit `code`, a one-line reason on stderr, no traceback, no step traces."""
    assert result.code == code, (result.code, result.stdout[-2000:], result.stderr[-2000:])
    assert TRACEBACK not in result.stderr, result.stderr
    assert result.stderr.strip(), "a refusal must explain itself on stderr"
    if reason is not None:
        assert reason in result.stderr, result.stderr
    if root is not None:
        assert traces(root) == [], traces(root)
    if root is not None and code == 3 and world is not None:
        state = json.loads((root / "state.json").read_text())
        assert state["status"] == "rejected" and state["reason"], state
        assert world.state(root).code == 0  # the rejected state verifies
