# SPDX-License-Identifier: Apache-2.0
"""The engine's event stream: every decision, published once, to subscribers.

The engine publishes an `Event` for each decision it takes; the audit log
and the metrics recorder subscribe. Subscribers must not raise for an event
kind they do not know (they ignore it), and must never receive secrets:
publishers put only accessors, names, ids, numbers and reasons in `fields`.
No I/O here.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

# Event kinds and the fields each carries.
# plan_id, plan_sha256, jobs, steps (in the plan), steps_done (succeeded before this run)
RUN_STARTED: Final = "run.started"
VERIFICATION: Final = "verification"  # kind (plan|artefact|link|digest), result (ok|fail), subject
REJECTION: Final = "rejection"  # reason (short label), message
STEP_STARTED: Final = "step.started"  # step_id, profile, attempt
# step_id, status, uid (the leased uid), exit_code, profile, wall_seconds, reason
STEP_FINISHED: Final = "step.finished"
SANDBOX_VIOLATION: Final = "sandbox.violation"  # step_id, kind
COST_RECORDED: Final = "cost.recorded"  # step_id, cpu_seconds, wall_seconds, usd, tokens
BUDGET_REMAINING: Final = "budget.remaining"  # unit, value (float, or None when unlimited)
BUDGET_HALT: Final = "budget.halt"  # unit, step_id
KILL_SWITCH: Final = "kill_switch"  # engaged (bool), flag
KILL: Final = "kill"  # scope (global|step|engine_lost), flag, step_id, latency_seconds
VAULT_TOKEN_ISSUED: Final = "vault.token_issued"  # step_id, accessor, ttl_seconds
VAULT_TOKEN_REVOKED: Final = "vault.token_revoked"  # step_id, accessor
VAULT_REVOKE_FAILED: Final = "vault.revoke_failed"  # step_id, accessor, message
PRODUCT_RECORDED: Final = "product.recorded"  # step_id, name, sha256, size
# Egress (docs/adr/0004-egress.md). Endpoints are the profile's entries
# ("vault", "pypi.org:443"); addresses are what the engine resolved.
EGRESS_RESOLVED: Final = "egress.resolved"  # profile, endpoint, port, addresses (run start)
# step_id, mode (egress|host), endpoints [{endpoint, dial, port, destinations}], limits
EGRESS_OPENED: Final = "egress.opened"
# step_id, endpoint, destination ("ip:port" or None), outcome, bytes_out, bytes_in,
# duration_seconds; one per connection the step made to an allowed endpoint
EGRESS_CONNECTION: Final = "egress.connection"
# step_id (None at run start), endpoint (or None), reason, message
EGRESS_REFUSED: Final = "egress.refused"
EGRESS_CLOSED: Final = "egress.closed"  # step_id, connections, bytes_out, bytes_in, refusals
RUN_FINISHED: Final = "run.finished"  # status, reason
# records, sha256: an engine-created audit log left by a crash before the first
# signed state, unsignable and so set aside (kept in the run area)
AUDIT_LEFTOVER: Final = "audit.leftover_set_aside"


@dataclasses.dataclass(frozen=True)
class Event:
    """One decision. `fields` hold JSON-compatible values only."""

    kind: str
    fields: Mapping[str, Any]


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

    def publish(self, event_kind: str, /, **fields: Any) -> None:
        """Deliver one event to every subscriber, in subscription order."""
        event = Event(event_kind, dict(fields))
        with self._lock:
            for subscriber in self._subscribers:
                subscriber(event)
