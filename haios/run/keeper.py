# SPDX-License-Identifier: Apache-2.0
"""The run's state document (`state.json`): held in memory, published signed.

Every `commit` first flushes the run's durability barrier (the products,
signatures, cost records, links, logs and audit records the state refers
to), then raises `seq`, validates the whole document against the model,
signs it and publishes it atomically (haios/state/store.py), so a reader
sees either the previous signed state or this one. The first commit
also tells the history that the audit log is now covered by a signed state.
Accessors are committed before the caller may use their token.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any, Final

from haios._util.canonical import canonical_bytes
from haios._util.durability import Barrier
from haios._util.strict_json import dump_json
from haios.errors import InternalError
from haios.models.common import format_rfc3339
from haios.models.plan import ExecPlan
from haios.models.state import STATE_SCHEMA, CostTotals, PlanStatus, RunState, StepState
from haios.osroot import STATE_FILE, OsRoot
from haios.run.steps import StepRecord
from haios.signing import EngineSigner


class StateKeeper:
    """The run's mutable view of state.json; every `commit` is atomic and signed."""

    def __init__(self, osr: OsRoot, signer: EngineSigner, plan: ExecPlan, plan_sha256: str,
                 prior: RunState | None, *,
                 audit_head: Callable[[], dict[str, Any] | None],
                 written: Callable[[], None],
                 clock: Callable[[], dt.datetime],
                 barrier: Barrier | None = None) -> None:
        self.osr, self.signer, self.clock = osr, signer, clock
        self.barrier = barrier
        self.plan_id, self.plan_sha256 = plan.plan_id, plan_sha256
        self.seq = prior.seq if prior else 0
        self.status: PlanStatus = "pending"
        self.reason: str | None = None
        self.steps: dict[str, StepRecord] = {
            step.id: StepRecord.from_state(step.id, prior.steps.get(step.id) if prior else None)
            for step in plan.steps
        }
        self.totals = prior.cost.totals if prior else CostTotals()
        self.sessions: list[str] = list(prior.vault_sessions) if prior else []
        #: step id -> its validated `steps.<id>` entry, as last committed
        self._entries: dict[str, dict[str, Any]] = {}
        #: step id -> `"<id>":<entry>` encoded canonically and as the file has it
        self._fragments: dict[str, tuple[bytes, bytes]] = {}
        self._order = sorted(self.steps)  # JSON key order (ids are ASCII)
        self._audit_head = audit_head
        self._written = written
        self._first = True
        self.lock = threading.RLock()

    def succeeded(self) -> int:
        """How many steps have succeeded (in this run or an earlier one)."""
        return sum(1 for record in self.steps.values() if record.status == "succeeded")

    def outstanding_accessors(self) -> tuple[str, ...]:
        """Accessors recorded and not known revoked: sessions first, then steps."""
        return (*self.sessions,
                *(a for record in self.steps.values() for a in record.token_accessors))

    def document(self, now: dt.datetime) -> dict[str, Any]:
        """The current state as a JSON document, validated.

        The top level is validated whole; a step's entry only when its
        record changed since the last validation (`StepRecord.changed`).
        """
        for step_id, record in self.steps.items():
            if record.changed:
                entry = record.to_json()
                StepState.model_validate(entry)
                self._entries[step_id] = entry
                self._fragments[step_id] = _fragments(step_id, entry)
                record.changed = False
        document = self._top(now)
        document["steps"] = {step_id: self._entries[step_id] for step_id in self.steps}
        return document

    def _top(self, now: dt.datetime) -> dict[str, Any]:
        """Everything but the steps, validated, with `steps` empty."""
        top = RunState.model_validate({
            "schema": STATE_SCHEMA, "plan_id": self.plan_id, "plan_sha256": self.plan_sha256,
            "status": self.status, "reason": self.reason, "steps": {},
            "cost": {"totals": self.totals.model_dump(mode="json")},
            "updated": format_rfc3339(now), "seq": self.seq,
            "audit": self._audit_head(), "vault_sessions": self.sessions,
        })
        return top.model_dump(mode="json", by_alias=True)

    def commit(self) -> dict[str, Any]:
        """Publish the state atomically with a fresh engine signature; return it.

        The bytes are assembled from the top level and each step's cached
        fragment (re-encoded only when the step changed), so a commit costs
        the same at step 10 and at step 1,000 apart from copying bytes;
        they equal `dump_json(signer.embed(document))` (tests/unit/run).
        """
        with self.lock:
            self.seq += 1
            document = self.document(self.clock())
            # The signature covers everything but `signatures` (contract section 5).
            top = {key: value for key, value in document.items()
                   if key not in ("steps", "signatures")}
            top["steps"] = {}
            canonical = _splice(canonical_bytes(top), self._joined(0))
            top["signatures"] = [{"keyid": self.signer.keyid,
                                  "sig": self.signer.sign_bytes(canonical)}]
            data = _splice(dump_json(top), self._joined(1))
            # What the state refers to is made durable in the same flush as
            # the state's own bytes, before the state is renamed into place.
            if self.barrier is None:
                self.osr.root.write_atomic(STATE_FILE, data)
            else:
                self.osr.root.write_atomic_durable_with(STATE_FILE, data, self.barrier)
            if self._first:  # the audit log is now covered by a signed state
                self._written()
                self._first = False
            document["signatures"] = top["signatures"]
            return document

    def _joined(self, form: int) -> bytes:
        """The `steps` object's members in key order: canonical (0) or file (1) form."""
        return b",".join(self._fragments[step_id][form] for step_id in self._order)

    def record_session(self, accessor: str, live: bool) -> None:
        """Durably note (or forget, once revoked) a run session's Vault accessor."""
        with self.lock:
            if live:
                self.sessions.append(accessor)
            elif accessor in self.sessions:
                self.sessions.remove(accessor)
            self.commit()

    def record_accessor(self, step_id: str, accessor: str) -> None:
        """Durably note a Vault accessor before its token can be used (worker thread)."""
        with self.lock:
            self.steps[step_id].add_accessor(accessor)
            self.commit()


_EMPTY_STEPS: Final = b'"steps":{}'


def _fragments(step_id: str, entry: dict[str, Any]) -> tuple[bytes, bytes]:
    """`"<id>":<entry>` in the signed (canonical) and the written encoding."""
    member = {step_id: entry}
    return canonical_bytes(member)[1:-1], dump_json(member)[1:-2]


def _splice(encoded: bytes, members: bytes) -> bytes:
    """Put the steps' members into an encoding whose `steps` object is empty.

    Only the key can produce `"steps":{}` unescaped: inside a JSON string a
    quote is always escaped.
    """
    if encoded.count(_EMPTY_STEPS) != 1:
        raise InternalError("state encoding: `steps` not found exactly once")
    return encoded.replace(_EMPTY_STEPS, b'"steps":{' + members + b"}", 1)
