# SPDX-License-Identifier: Apache-2.0
"""What the audit records tell: attempts per step, Vault tokens, kill events.

Pure functions over verified audit records (`chain.Record`); field values
come from os_root, so every one is type-checked before use and anything
unexpected is left out rather than trusted. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from haios.report.chain import Record
from haios.report.model import Attempt, KillEvent, VaultToken


def _text(value: Any) -> str | None:
    """The value if it is a string, else None."""
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    """The value if it is an integer (not a bool), else None."""
    return value if type(value) is int else None


def _number(value: Any) -> float | None:
    """The value as a float if it is an int or float (not a bool), else None."""
    if type(value) in (int, float):
        return float(value)
    return None


def attempts_by_step(records: Iterable[Record]) -> dict[str, list[Attempt]]:
    """Each step's attempts, in order, from `step.started` / `step.finished` pairs."""
    found: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        step_id = _text(record.fields.get("step_id"))
        if step_id is None:
            continue
        if record.kind == "step.started":
            found.setdefault(step_id, []).append({
                "attempt": _int(record.fields.get("attempt")) or 0,
                "started": record.time, "finished": None, "status": None,
                "exit_code": None, "uid": None, "reason": None})
        elif record.kind == "step.finished":
            runs = found.setdefault(step_id, [])
            if not runs or runs[-1]["finished"] is not None:
                runs.append({"attempt": 0, "started": None, "finished": None, "status": None,
                             "exit_code": None, "uid": None, "reason": None})
            reason = _text(record.fields.get("reason"))
            runs[-1].update(finished=record.time, status=_text(record.fields.get("status")),
                            exit_code=_int(record.fields.get("exit_code")),
                            uid=_int(record.fields.get("uid")),
                            reason=None if reason is None else reason[:4096])
    return {step_id: [Attempt.model_validate(run) for run in runs]
            for step_id, runs in found.items()}


def vault_tokens(records: Iterable[Record], *, run_ended: bool) -> list[VaultToken]:
    """Issue / revoke evidence per accessor, in the order tokens were issued.

    A token is `outstanding` when the run has ended and no revocation of its
    accessor was recorded (its TTL still bounds it).
    """
    tokens: dict[str, dict[str, Any]] = {}
    for record in records:
        if not record.kind.startswith("vault."):
            continue
        accessor = _text(record.fields.get("accessor"))
        if accessor is None:
            continue
        entry = tokens.setdefault(accessor, {
            "accessor": accessor, "step_id": _text(record.fields.get("step_id")) or "",
            "issued": None, "ttl_seconds": None, "revoked": None, "revoke_failed": None})
        if record.kind == "vault.token_issued":
            ttl = record.fields.get("ttl_seconds")
            entry.update(issued=record.time, ttl_seconds=ttl if _number(ttl) is not None else None)
        elif record.kind == "vault.token_revoked":
            entry.update(revoked=record.time, revoke_failed=None)
        elif record.kind == "vault.revoke_failed":
            message = _text(record.fields.get("message")) or "revocation failed"
            entry.update(revoke_failed=f"{record.time}: {message}"[:4096])
    return [VaultToken.model_validate({**entry, "outstanding": run_ended and
                                       entry["revoked"] is None})
            for entry in tokens.values()]


def kill_events(records: Sequence[Record]) -> list[KillEvent]:
    """Every `kill` and `kill_switch` record, in log order."""
    events = []
    for record in records:
        if record.kind not in ("kill", "kill_switch"):
            continue
        complete = record.fields.get("complete")
        events.append(KillEvent.model_validate({
            "seq": record.seq, "time": record.time, "kind": record.kind,
            "scope": _text(record.fields.get("scope")), "flag": _text(record.fields.get("flag")),
            "step_id": _text(record.fields.get("step_id")),
            "latency_seconds": _number(record.fields.get("latency_seconds")),
            "complete": complete if isinstance(complete, bool) else None}))
    return events
