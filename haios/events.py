# SPDX-License-Identifier: Apache-2.0
"""The engine's event stream: every decision, published once, to subscribers.

Each kind of decision is a frozen dataclass below, so mypy checks every
publisher's fields and subscribers dispatch on the type. `KIND` is the
name in the audit log (`audit.jsonl` records `kind` and `fields`); the
audit log, the metrics recorder and the progress display subscribe.
Subscribers ignore types they do not handle and never receive secrets:
events carry only accessors, names, ids, numbers and reasons. No I/O here.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """One decision. Every field holds a JSON-compatible value."""

    KIND: ClassVar[str] = ""

    def fields(self) -> dict[str, Any]:
        """The fields in declaration order, as the audit log records them."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunStarted(Event):
    """The run starts: `steps` in the plan, `steps_done` succeeded before it."""

    KIND: ClassVar[str] = "run.started"
    plan_id: str
    plan_sha256: str
    jobs: int
    steps: int
    steps_done: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Verification(Event):
    """One check: `kind` plan|artefact|link|digest, `result` ok|fail."""

    KIND: ClassVar[str] = "verification"
    kind: str
    result: str
    subject: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Rejection(Event):
    """The run was refused: a short label and the message."""

    KIND: ClassVar[str] = "rejection"
    reason: str
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StepStarted(Event):
    KIND: ClassVar[str] = "step.started"
    step_id: str
    profile: str
    attempt: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StepFinished(Event):
    """An attempt ended; `uid` is the leased uid (None when none was leased)."""

    KIND: ClassVar[str] = "step.finished"
    step_id: str
    status: str
    exit_code: int | None
    profile: str
    wall_seconds: float
    reason: str | None
    uid: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SandboxViolation(Event):
    """A limit or filter stopped the step: `kind` seccomp|memory|processes|..."""

    KIND: ClassVar[str] = "sandbox.violation"
    step_id: str
    kind: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CostRecorded(Event):
    KIND: ClassVar[str] = "cost.recorded"
    step_id: str
    cpu_seconds: float
    wall_seconds: float
    usd: float | int
    tokens: float | int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BudgetRemaining(Event):
    """What is left of one budget unit (None: unlimited)."""

    KIND: ClassVar[str] = "budget.remaining"
    unit: str
    value: float | None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BudgetHalt(Event):
    KIND: ClassVar[str] = "budget.halt"
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class KillSwitch(Event):
    """A flag was seen (`flag` is its base name, `scope` global|step)."""

    KIND: ClassVar[str] = "kill_switch"
    engaged: bool
    flag: str
    scope: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Kill(Event):
    """A step tree was killed (`scope` global|step|engine_lost)."""

    KIND: ClassVar[str] = "kill"
    scope: str
    flag: str
    step_id: str
    latency_seconds: float
    complete: bool


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VaultTokenIssued(Event):
    """A token exists (`step_id` "run" for the run's session)."""

    KIND: ClassVar[str] = "vault.token_issued"
    step_id: str
    accessor: str
    ttl_seconds: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VaultTokenRevoked(Event):
    KIND: ClassVar[str] = "vault.token_revoked"
    step_id: str
    accessor: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VaultRevokeFailed(Event):
    KIND: ClassVar[str] = "vault.revoke_failed"
    step_id: str
    accessor: str
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ProductRecorded(Event):
    KIND: ClassVar[str] = "product.recorded"
    step_id: str
    name: str
    sha256: str
    size: int


# Egress (docs/adr/0004-egress.md). Endpoints are the profile's entries
# ("vault", "pypi.org:443"); addresses are what the engine resolved.


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EgressResolved(Event):
    """An endpoint resolved and pinned at run start."""

    KIND: ClassVar[str] = "egress.resolved"
    profile: str
    endpoint: str
    port: int
    addresses: list[str]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EgressOpened(Event):
    """The step's network reach: `mode` egress|host, its endpoints and limits."""

    KIND: ClassVar[str] = "egress.opened"
    step_id: str
    mode: str
    endpoints: list[dict[str, Any]]
    limits: dict[str, Any] | None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EgressConnection(Event):
    """One connection the step made to an allowed endpoint."""

    KIND: ClassVar[str] = "egress.connection"
    step_id: str
    endpoint: str
    destination: str | None
    outcome: str
    bytes_out: int
    bytes_in: int
    duration_seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EgressRefused(Event):
    """A refused attempt (`step_id` None at run start, `endpoint` None if unknown)."""

    KIND: ClassVar[str] = "egress.refused"
    step_id: str | None
    endpoint: str | None
    reason: str
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EgressClosed(Event):
    KIND: ClassVar[str] = "egress.closed"
    step_id: str
    connections: int
    bytes_out: int
    bytes_in: int
    refusals: dict[str, int]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunFinished(Event):
    KIND: ClassVar[str] = "run.finished"
    status: str
    reason: str | None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditLeftover(Event):
    """An engine-created audit log left by a crash before the first signed
    state: unsignable, so set aside (kept in the run area)."""

    KIND: ClassVar[str] = "audit.leftover_set_aside"
    records: int
    sha256: str


#: every event type, by its audit kind
EVENT_TYPES: Final[Mapping[str, type[Event]]] = {
    cls.KIND: cls for cls in (
        RunStarted, Verification, Rejection, StepStarted, StepFinished, SandboxViolation,
        CostRecorded, BudgetRemaining, BudgetHalt, KillSwitch, Kill, VaultTokenIssued,
        VaultTokenRevoked, VaultRevokeFailed, ProductRecorded, EgressResolved, EgressOpened,
        EgressConnection, EgressRefused, EgressClosed, RunFinished, AuditLeftover,
    )
}


Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out: `publish` returns after every subscriber ran.

    Synchronous on purpose: the audit subscriber makes its record durable
    before the action it records takes effect.
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> None:
        """Add a subscriber; it sees every later event, in publish order."""
        with self._lock:
            self._subscribers.append(subscriber)

    def publish(self, event: Event) -> None:
        """Deliver one event to every subscriber, in subscription order."""
        with self._lock:
            for subscriber in self._subscribers:
                subscriber(event)
