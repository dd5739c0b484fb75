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
