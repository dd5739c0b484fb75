# SPDX-License-Identifier: Apache-2.0
"""`MetricsRecorder`: engine events in, metric updates out, on a private registry.

It owns a private `CollectorRegistry` (never the global one, so runs and
tests stay isolated), subscribes to the engine's events and dispatches on
their types. A value outside the contract's lists is a publisher bug
(InternalError). In-memory; `serve` and `write_textfile` hand over to
`server.py` and `textfile.py`.
"""

from __future__ import annotations

import decimal
import math
import threading
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

import haios
from haios import events
from haios.errors import InternalError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from haios.events import Event

from haios.metrics.families import (
    COST_UNITS,
    EGRESS_OUTCOMES,
    EGRESS_REFUSAL_REASONS,
    KILL_SCOPES,
    METRICS_FILE_NAME,
    OTHER,
    PLAN_OUTCOMES,
    PROFILE_LABELS_MAX,
    PROFILE_RE,
    REJECTION_REASONS,
    SANDBOX_VIOLATION_KINDS,
    SHIPPED_PROFILES,
    STEP_OUTCOMES,
    VERIFICATION_KINDS,
    VERIFICATION_RESULTS,
    define_families,
    preinitialise,
)
from haios.metrics.server import MetricsServer, serve_registry
from haios.metrics.textfile import write_atomically


class MetricsRecorder:
    """The contract's metrics, fed by engine events. Thread-safe.

    Attributes:
        registry: the private registry holding every contract metric.
    """

    def __init__(self, version: str = haios.__version__) -> None:
        """Create the registry and every contract metric, at zero.

        Args:
            version: the `version` label of `haios_build_info`.
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self._families = define_families(self.registry)
        preinitialise(self._families, version)
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._profiles: set[str] = set(SHIPPED_PROFILES)
        self._handlers: Mapping[type[Event], Callable[[Mapping[str, Any]], None]] = {
            events.Verification: self._on_verification,
            events.Rejection: self._on_rejection,
            events.StepStarted: self._on_step_started,
            events.StepFinished: self._on_step_finished,
            events.SandboxViolation: self._on_sandbox_violation,
            events.CostRecorded: self._on_cost_recorded,
            events.BudgetRemaining: self._on_budget_remaining,
            events.KillSwitch: self._on_kill_switch,
            events.Kill: self._on_kill,
            events.VaultTokenIssued: self._on_vault_token_issued,
            events.VaultTokenRevoked: self._on_vault_token_revoked,
            events.RunFinished: self._on_run_finished,
            events.EgressConnection: self._on_egress_connection,
            events.EgressRefused: self._on_egress_refused,
        }

    def on_event(self, event: Event) -> None:
        """Update the metrics for one event; pass this to `EventBus.subscribe`.

        Kinds without a metric (run.started, budget.halt, product.recorded,
        vault.revoke_failed, which shows as issued minus revoked,
        egress.resolved, egress.opened, egress.closed) and unknown kinds are
        ignored.

        Args:
            event: an engine event.

        Raises:
            InternalError: a field the contract enumerates (a status, a
                verification kind or result, a kill scope, a cost unit) has
                a value outside its list, or a number field is missing,
                negative or not finite. These are publisher bugs.
        """
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event.fields())

    def render(self) -> bytes:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve `/metrics` from this registry on `host:port` only.

        Args:
            host: an IP literal or `localhost` (see `parse_metrics_addr`).
            port: a TCP port; 0 picks a free one (see `MetricsServer.address`).

        Returns:
            The running server.

        Raises:
            EnvironmentUnavailableError: the address cannot be resolved or bound.

        Side Effects:
            Binds a listening socket and starts a daemon thread serving it;
            each client gets its own thread (at most `SCRAPE_CLIENTS_MAX` at
            once), dropped after `SCRAPE_TIMEOUT_SECONDS` of silence.
        """
        return serve_registry(self.registry, host, port)

    def write_textfile(self, dir_fd: int, name: str = METRICS_FILE_NAME) -> None:
        """Write the metrics to `name` in `dir_fd` atomically.

        Args:
            dir_fd: an open `O_DIRECTORY|O_NOFOLLOW` descriptor of os_root.
            name: the file name inside it (a single path component).

        Raises:
            PathError: `name` is not a plain file name, or a symlink, FIFO,
                device, directory or hardlinked file is at the path.
            EnvironmentUnavailableError: writing, syncing or renaming failed.

        Side Effects:
            Creates a temporary file (O_EXCL, no-follow, mode 0o600) in
            `dir_fd`, writes and fsyncs it, renames it over `name`, fsyncs the
            directory. On failure the temporary file is removed.
        """
        write_atomically(dir_fd, name, self.render())

    # -- event handlers (each gets the event's fields) -----------------------

    def _on_verification(self, fields: Mapping[str, Any]) -> None:
        """Count one verification by kind and result."""
        kind = _enumerated(fields, "kind", VERIFICATION_KINDS)
        result = _enumerated(fields, "result", VERIFICATION_RESULTS)
        self._families.verifications.labels(kind=kind, result=result).inc()

    def _on_rejection(self, fields: Mapping[str, Any]) -> None:
        """Count one rejection; an unlisted reason counts as `other`."""
        reason = _allowlisted(fields.get("reason"), REJECTION_REASONS)
        self._families.rejections.labels(reason=reason).inc()

    def _on_step_started(self, fields: Mapping[str, Any]) -> None:
        """Mark the step running (idempotent per step id)."""
        with self._lock:
            self._running.add(str(fields.get("step_id")))
            self._families.steps_running.set(len(self._running))

    def _on_step_finished(self, fields: Mapping[str, Any]) -> None:
        """Count the outcome, observe the duration, mark the step not running."""
        outcome = _enumerated(fields, "status", STEP_OUTCOMES)
        measured = fields.get("wall_seconds") is not None
        duration = _non_negative(fields, "wall_seconds") if measured else 0.0
        with self._lock:
            # The step id is only a set key here, never a label.
            self._running.discard(str(fields.get("step_id")))
            self._families.steps_running.set(len(self._running))
            profile = self._profile_label(fields.get("profile"))
        self._families.steps.labels(outcome=outcome).inc()
        if measured:
            self._families.step_duration.labels(profile=profile).observe(duration)

    def _on_sandbox_violation(self, fields: Mapping[str, Any]) -> None:
        """Count one violation; an unlisted kind counts as `other`."""
        kind = _allowlisted(fields.get("kind"), SANDBOX_VIOLATION_KINDS)
        self._families.sandbox_violations.labels(kind=kind).inc()

    def _on_cost_recorded(self, fields: Mapping[str, Any]) -> None:
        """Add each unit the cost record carries."""
        # Check every unit before counting any: a bad record changes nothing.
        amounts = {unit: _non_negative(fields, unit) for unit in COST_UNITS if unit in fields}
        for unit, amount in amounts.items():
            self._families.cost.labels(unit=unit).inc(amount)

    def _on_budget_remaining(self, fields: Mapping[str, Any]) -> None:
        """Set what remains of one unit; None (unlimited) is +Inf."""
        unit = _enumerated(fields, "unit", COST_UNITS)
        value = math.inf if fields.get("value") is None else _finite(fields, "value")
        self._families.budget_remaining.labels(unit=unit).set(value)

    def _on_kill_switch(self, fields: Mapping[str, Any]) -> None:
        """Show whether a kill switch is engaged."""
        engaged = fields.get("engaged")
        if not isinstance(engaged, bool):
            msg = "event kill_switch: field 'engaged' is not a bool"
            raise InternalError(msg)
        self._families.kill_switch_engaged.set(1 if engaged else 0)

    def _on_kill(self, fields: Mapping[str, Any]) -> None:
        """Count one kill and observe its latency when measured."""
        scope = _enumerated(fields, "scope", KILL_SCOPES)
        measured = fields.get("latency_seconds") is not None
        latency = _non_negative(fields, "latency_seconds") if measured else 0.0
        self._families.kills.labels(scope=scope).inc()
        if measured:
            self._families.kill_latency.observe(latency)

    def _on_vault_token_issued(self, _fields: Mapping[str, Any]) -> None:
        """Count one issued token (the accessor stays out of metrics)."""
        self._families.vault_tokens_issued.inc()

    def _on_vault_token_revoked(self, _fields: Mapping[str, Any]) -> None:
        """Count one revoked token."""
        self._families.vault_tokens_revoked.inc()

    def _on_egress_connection(self, fields: Mapping[str, Any]) -> None:
        """Count one forwarded connection by outcome and add its bytes."""
        # Check both numbers before counting anything: a bad record changes nothing.
        sent = _non_negative(fields, "bytes_out")
        received = _non_negative(fields, "bytes_in")
        outcome = _allowlisted(fields.get("outcome"), EGRESS_OUTCOMES)
        self._families.egress_connections.labels(outcome=outcome).inc()
        self._families.egress_bytes.labels(direction="out").inc(sent)
        self._families.egress_bytes.labels(direction="in").inc(received)

    def _on_egress_refused(self, fields: Mapping[str, Any]) -> None:
        """Count one refusal; an unlisted reason counts as `other`."""
        reason = _allowlisted(fields.get("reason"), EGRESS_REFUSAL_REASONS)
        self._families.egress_refusals.labels(reason=reason).inc()

    def _on_run_finished(self, fields: Mapping[str, Any]) -> None:
        """Count one finished run by its plan status."""
        outcome = _enumerated(fields, "status", PLAN_OUTCOMES)
        self._families.plan_runs.labels(outcome=outcome).inc()

    def _profile_label(self, value: object) -> str:
        """A profile name as a label: known, or new and within the cap, else `other`."""
        if not isinstance(value, str) or not PROFILE_RE.fullmatch(value):
            return OTHER
        if value not in self._profiles:
            if len(self._profiles) >= PROFILE_LABELS_MAX:
                return OTHER
            self._profiles.add(value)
        return value


# -- field helpers (pure) --------------------------------------------------------


def _enumerated(fields: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    """A field whose values the contract enumerates; anything else is a bug."""
    value = fields.get(name)
    if value not in allowed:
        # The value is not echoed: it may be anything a publisher got wrong.
        msg = f"event field {name!r} is not one of {', '.join(allowed)}"
        raise InternalError(msg)
    return str(value)


def _allowlisted(value: object, allowed: tuple[str, ...]) -> str:
    """A label from a fixed list; anything else, attacker text included, is `other`."""
    if isinstance(value, str) and value in allowed:
        return value
    return OTHER


def _finite(fields: Mapping[str, Any], name: str) -> float:
    """A finite number field (int, float or Decimal, not bool) as a float."""
    value = fields.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float | decimal.Decimal):
        msg = f"event field {name!r} is not a number"
        raise InternalError(msg)
    number = float(value)
    if not math.isfinite(number):
        msg = f"event field {name!r} is not finite"
        raise InternalError(msg)
    return number


def _non_negative(fields: Mapping[str, Any], name: str) -> float:
    """A finite, non-negative number field as a float."""
    number = _finite(fields, name)
    if number < 0:
        msg = f"event field {name!r} is negative"
        raise InternalError(msg)
    return number
