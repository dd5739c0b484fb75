# SPDX-License-Identifier: Apache-2.0
"""Human and JSON rendering of a state document. Pure: returns text."""

from __future__ import annotations

import json
from typing import Any

from haios.progress import format_cost


def render_json(document: dict[str, Any]) -> str:
    """Exactly one JSON object, one line."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)


def render_human(document: dict[str, Any]) -> str:
    """A short table: plan status, then one line per step, then totals."""
    lines = [f"plan {document.get('plan_id')}: {document.get('status')}"]
    if document.get("reason"):
        lines.append(f"  reason: {document['reason']}")
    steps = document.get("steps") or {}
    width = max((len(step_id) for step_id in steps), default=4)
    for step_id, step in steps.items():
        code = step.get("exit_code")
        lines.append(f"  {step_id:<{width}}  {step.get('status'):<10} "
                     f"exit={'-' if code is None else code}  attempts={step.get('attempts')}")
    totals = (document.get("cost") or {}).get("totals") or {}
    if totals:
        # For people: seconds to a sensible precision, money as its exact decimal.
        lines.append(f"  cost: {format_cost(totals)}")
    return "\n".join(lines)


def result_document(*, command: str | None, exit_code: int, reason: str,
                    error_class: str | None, message: str,
                    state: dict[str, Any] | None) -> dict[str, Any]:
    """The `CommandResult` object (ADR 0005) for a refusal, validated.

    The model checks the fields (exit code, status, reason shape, and the
    state against `RunState`); the state is then printed as the verified
    object itself, not a re-serialisation, so it equals `state.json`.

    Args:
        command: ``run``, ``state`` or None (arguments named neither).
        exit_code: the contract's exit code.
        reason: the error's stable reason label.
        error_class: the exception class name, or None.
        message: the diagnostic line (already escaped), cut to fit.
        state: the verified state object, or None.

    Returns:
        The object to print with `render_json`.

    Raises:
        pydantic.ValidationError: a field breaks the schema (a bug).
    """
    from haios.models.result import (
        COMMAND_RESULT_SCHEMA,
        MESSAGE_MAX_CHARS,
        STATUS_BY_EXIT,
        CommandResult,
    )

    document: dict[str, Any] = {
        "schema": COMMAND_RESULT_SCHEMA, "command": command, "ok": exit_code == 0,
        "exit_code": exit_code, "status": STATUS_BY_EXIT.get(exit_code, "internal_error"),
        "reason": reason, "error_class": error_class, "message": message[:MESSAGE_MAX_CHARS],
        "state": state,
    }
    CommandResult.model_validate(document)
    return document
