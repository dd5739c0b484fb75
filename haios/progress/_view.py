# SPDX-License-Identifier: Apache-2.0
"""What a person sees of a run, folded from the engine's event stream. Pure: no I/O.

`RunView.apply` takes one engine event and returns the lines it adds to the
log; `RunView.snapshot` is the current picture for a live display. Both read
only the events (`haios.events`): no file, no state document, no second
source of truth. Durations of steps are the engine's measurements; only the
elapsed time of the whole run and of running steps come from the clock the
caller passes in. When `run.started` carries `steps` (the plan's step
count) and `steps_done` (steps an earlier run already finished), pending
and skipped counts show too; without them they are left out, never guessed.

What it never shows: token accessors (a person does not need them), the
leased uid, the engine's private area (`state_dir`) or any other absolute
host path in free text; a kill flag shows by its base name. Lines for the
time before the run starts (verification, a refusal's events) are held
back and shown when the run starts, so a refusal stays one diagnostic line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final, Literal

from haios import events as ev
from haios._util.strict_json import printable
from haios.events import Event
from haios.progress._format import (
    base_name,
    clean_text,
    exact_decimal,
    format_cost,
    format_seconds,
    plural,
)

Tone = Literal["info", "ok", "warn", "fail"]
Phase = Literal["verifying", "running", "finished"]

#: step statuses in the order a summary lists them
_STATUS_ORDER: Final = ("succeeded", "failed", "timed_out", "killed", "skipped")
_COST_UNITS: Final = ("cpu_seconds", "wall_seconds", "usd", "tokens")


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of the progress log.

    Attributes:
        text: the message, already cleaned (printable, no host path, no secret).
        tone: how a terminal may colour it.
        detail: True for lines a live display shows in its status block
            instead (a step starting, a Vault token issued or revoked).
    """

    text: str
    tone: Tone = "info"
    detail: bool = False


@dataclasses.dataclass(frozen=True)
class RunningStep:
    """A step that started and has not finished."""

    step_id: str
    attempt: int
    elapsed_seconds: float


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The run as a live display draws it at one instant.

    Attributes:
        pending: steps not yet started, when the run.started event says how
            many steps the run has; None when it does not.
        used: cost used by this run, as a phrase (zero units and wall time left out).
        left: budget left, as a phrase (unlimited units left out).
        notice: the latest kill switch or budget halt, if any.
    """

    phase: Phase
    plan_id: str | None
    elapsed_seconds: float
    checks: int
    finished: Mapping[str, int]
    running: tuple[RunningStep, ...]
    pending: int | None
    used: str
    left: str
    notice: str | None


def _text(value: object) -> str:
    """An id, a label or a status from an event, escaped."""
    return printable(str(value)) if value is not None else "?"


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _status_words(status: str) -> str:
    return status.replace("_", " ")


class RunView:
    """Folds engine events into log lines and a live snapshot.

    Not thread-safe by itself: a display that draws from another thread
    holds its own lock around `apply` and `snapshot`.
    """

    def __init__(self, *, now: Callable[[], float], state_dir: str | None = None) -> None:
        """Start an empty view.

        Args:
            now: a monotonic clock in seconds (elapsed times only).
            state_dir: the engine's private area, never shown.
        """
        self._now = now
        self._state_dir = state_dir
        self._created = now()
        self._phase: Phase = "verifying"
        self._held: list[Line] = []
        self._checks: dict[str, int] = {}
        self._last_check: float | None = None
        self._plan_id: str | None = None
        self._run_started: float | None = None
        self._total: int | None = None
        self._done_before = 0
        self._running: dict[str, tuple[int, float]] = {}
        self._attempts: dict[str, int] = {}
        self._finished: dict[str, int] = {}
        self._step_cost: dict[str, dict[str, float | int]] = {}
        self._used: dict[str, Decimal] = {unit: Decimal(0) for unit in _COST_UNITS}
        self._left: dict[str, float] = {}
        self._seen: set[str] = set()
        self._notice: str | None = None
        self._handlers: Mapping[type[ev.Event], Callable[[Mapping[str, Any]], list[Line]]] = {
            ev.Verification: self._on_verification,
            ev.Rejection: self._on_rejection,
            ev.RunStarted: self._on_run_started,
            ev.StepStarted: self._on_step_started,
            ev.CostRecorded: self._on_cost_recorded,
            ev.BudgetRemaining: self._on_budget_remaining,
            ev.StepFinished: self._on_step_finished,
            ev.SandboxViolation: self._on_sandbox_violation,
            ev.BudgetHalt: self._on_budget_halt,
            ev.KillSwitch: self._on_kill_switch,
            ev.Kill: self._on_kill,
            ev.VaultTokenIssued: self._on_vault_token_issued,
            ev.VaultTokenRevoked: self._on_vault_token_revoked,
            ev.VaultRevokeFailed: self._on_vault_revoke_failed,
            ev.RunFinished: self._on_run_finished,
        }

    # -- reading ------------------------------------------------------------

    def apply(self, event: Event) -> list[Line]:
        """The lines `event` adds to the log, in order (none for unknown kinds).

        Lines from before the run starts are held and returned with the
        run's first line; if the run never starts (a refusal) they are
        never returned.
        """
        handler = self._handlers.get(type(event))
        if handler is None:
            return []
        lines = handler(event.fields())
        if self._phase == "verifying":
            self._held.extend(lines)
            return []
        return lines

    def snapshot(self) -> Snapshot:
        """The run now, for a live display."""
        now = self._now()
        running = tuple(RunningStep(step_id, attempt, max(0.0, now - started))
                        for step_id, (attempt, started) in self._running.items())
        pending = None
        if self._total is not None:
            done = sum(self._finished.values())
            pending = max(0, self._total - self._done_before - done - len(running))
        left = format_cost(self._left, skip_zero=False) if self._left else ""
        return Snapshot(
            phase=self._phase, plan_id=self._plan_id,
            elapsed_seconds=max(0.0, now - self._created),
            checks=sum(self._checks.values()), finished=dict(self._finished),
            running=running, pending=pending, used=self._used_phrase(live=True), left=left,
            notice=self._notice)

    # -- helpers ------------------------------------------------------------

    def _clean(self, value: object) -> str:
        return clean_text(str(value), state_dir=self._state_dir)

    def _once(self, key: str) -> bool:
        """True the first time `key` is seen (kill switches and halts repeat)."""
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def _used_phrase(self, *, live: bool = False) -> str:
        # Live, the elapsed clock already stands for wall time.
        return format_cost({unit: amount for unit, amount in self._used.items()
                            if not (live and unit == "wall_seconds")}, skip_zero=True)

    def _verified_line(self) -> Line:
        took = (self._last_check if self._last_check is not None else self._now()) - self._created
        inputs = self._checks.get("digest", 0)
        parts = ["plan signature" if self._checks.get("plan") else "plan"]
        detail = ""
        if inputs:
            detail = (f" ({plural(inputs, 'digest')}, "
                      f"{plural(self._checks.get('artefact', 0), 'signature')}, "
                      f"{plural(self._checks.get('link', 0), 'link')})")
        parts.append(plural(inputs, "input") + detail)
        return Line(f"verified in {format_seconds(max(0.0, took))}: {', '.join(parts)}", "ok")

    def _start(self, lines: list[Line]) -> list[Line]:
        """Leave the verifying phase: held lines first, then `lines`."""
        self._phase = "running"
        held, self._held = self._held, []
        return [*held, *lines]

    # -- handlers -----------------------------------------------------------

    def _on_verification(self, fields: Mapping[str, Any]) -> list[Line]:
        kind = _text(fields.get("kind"))
        if fields.get("result") == "ok":
            self._checks[kind] = self._checks.get(kind, 0) + 1
            self._last_check = self._now()
            return []
        return [Line(f"verification failed: {kind} {self._clean(fields.get('subject'))}",
                     "fail")]

    def _on_rejection(self, fields: Mapping[str, Any]) -> list[Line]:
        return [Line(f"rejected: {_text(fields.get('reason'))}", "fail")]

    def _on_run_started(self, fields: Mapping[str, Any]) -> list[Line]:
        self._plan_id = _text(fields.get("plan_id"))
        self._run_started = self._now()
        self._total = _int(fields.get("steps"))
        self._done_before = _int(fields.get("steps_done")) or 0
        digest = _text(fields.get("plan_sha256"))[:12]
        jobs = _int(fields.get("jobs"))
        extra = [] if self._total is None else [plural(self._total, "step")]
        extra += [] if jobs is None else [f"jobs {jobs}"]
        text = f"run started: plan {self._plan_id} (sha256 {digest})"
        text += f", {', '.join(extra)}" if extra else ""
        return self._start([self._verified_line(), Line(text)])

    def _on_step_started(self, fields: Mapping[str, Any]) -> list[Line]:
        step_id = _text(fields.get("step_id"))
        attempt = _int(fields.get("attempt")) or 1
        self._running[step_id] = (attempt, self._now())
        self._attempts[step_id] = attempt
        return [Line(f"step {step_id}: started (attempt {attempt}, "
                     f"profile {_text(fields.get('profile'))})", detail=True)]

    def _on_cost_recorded(self, fields: Mapping[str, Any]) -> list[Line]:
        cost: dict[str, float | int] = {}
        for unit in _COST_UNITS:
            value = fields.get(unit)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            cost[unit] = value
            # Summed as exact decimals, as the ledger sums them: 0.1 + 0.2 is 0.3.
            self._used[unit] += exact_decimal(value)
        self._step_cost[_text(fields.get("step_id"))] = cost
        return []

    def _on_budget_remaining(self, fields: Mapping[str, Any]) -> list[Line]:
        unit = _text(fields.get("unit"))
        value = _float(fields.get("value"))
        if value is None:
            self._left.pop(unit, None)  # unlimited
        else:
            self._left[unit] = value
        return []

    def _on_step_finished(self, fields: Mapping[str, Any]) -> list[Line]:
        step_id = _text(fields.get("step_id"))
        status = _text(fields.get("status"))
        attempt, _ = self._running.pop(step_id, (self._attempts.get(step_id, 0), 0.0))
        self._finished[status] = self._finished.get(status, 0) + 1
        wall = _float(fields.get("wall_seconds"))
        code = _int(fields.get("exit_code"))
        text = f"step {step_id}: {_status_words(status)}"
        if wall is not None and wall > 0:
            text += f" in {format_seconds(wall)}"
        facts = [f"attempt {attempt}"] if attempt else []
        facts += [] if code is None else [f"exit {code}"]
        # The step's wall time is already the duration above.
        cost = format_cost({unit: value for unit, value in self._step_cost.pop(step_id, {}).items()
                            if unit != "wall_seconds"}, skip_zero=True)
        text += f" ({', '.join(facts)}{'; ' + cost if cost else ''})" if facts or cost else ""
        reason = fields.get("reason")
        if status != "succeeded" and reason:
            text += f": {self._clean(reason)}"
        return [Line(text, "ok" if status == "succeeded" else "fail")]

    def _on_sandbox_violation(self, fields: Mapping[str, Any]) -> list[Line]:
        return [Line(f"step {_text(fields.get('step_id'))}: sandbox violation "
                     f"({_text(fields.get('kind'))})", "fail")]

    def _on_budget_halt(self, fields: Mapping[str, Any]) -> list[Line]:
        reason = fields.get("reason") or f"budget exhausted: {_text(fields.get('unit'))}"
        text = f"budget halt: {self._clean(reason)}; no further step starts"
        self._notice = "budget exhausted"
        return [Line(text, "warn")] if self._once(text) else []

    def _on_kill_switch(self, fields: Mapping[str, Any]) -> list[Line]:
        if fields.get("engaged") is False:
            return []
        flag = base_name(str(fields.get("flag") or "?"))
        scope = fields.get("scope")
        self._notice = f"kill switch {flag}"
        text = f"kill switch engaged: {flag}" + (f" ({_text(scope)})" if scope else "")
        return [Line(text, "warn")] if self._once(f"switch:{flag}") else []

    def _on_kill(self, fields: Mapping[str, Any]) -> list[Line]:
        scope = _text(fields.get("scope"))
        step_id = fields.get("step_id")
        who = f"step {_text(step_id)}" if step_id else "every running step"
        if scope == "engine_lost":
            return [Line(f"{who}: process tree killed by the watchdog while no engine "
                         "was running (engine_lost)", "warn")]
        flag = base_name(str(fields.get("flag") or "?"))
        text = f"{who}: process tree killed by {flag}"
        latency = _float(fields.get("latency_seconds"))
        if latency is not None:
            text += f", {format_seconds(latency)} after the flag was seen"
        if fields.get("complete") is False:
            text += " (not every process confirmed gone)"
        return [Line(text, "warn")]

    def _on_vault_token_issued(self, fields: Mapping[str, Any]) -> list[Line]:
        ttl = _float(fields.get("ttl_seconds"))
        text = f"Vault token issued for {_text(fields.get('step_id'))}"
        text += f" (ttl {format_seconds(ttl)})" if ttl is not None else ""
        return [Line(text, detail=True)]

    def _on_vault_token_revoked(self, fields: Mapping[str, Any]) -> list[Line]:
        return [Line(f"Vault token for {_text(fields.get('step_id'))} revoked", detail=True)]

    def _on_vault_revoke_failed(self, fields: Mapping[str, Any]) -> list[Line]:
        return [Line(f"Vault token for {_text(fields.get('step_id'))} not revoked "
                     f"({self._clean(fields.get('message') or 'unknown')}); it will be retried",
                     "warn")]

    def _on_run_finished(self, fields: Mapping[str, Any]) -> list[Line]:
        status = _text(fields.get("status"))
        if self._phase == "verifying":
            # The idempotent case: verified, already succeeded, nothing ran.
            lines = self._start([self._verified_line(),
                                 Line(f"plan already {_status_words(status)}: nothing to run",
                                      "ok")])
            self._phase = "finished"
            return lines
        self._phase = "finished"
        elapsed = self._now() - (self._run_started if self._run_started is not None
                                 else self._created)
        text = f"plan {self._plan_id}: {_status_words(status)} in {format_seconds(elapsed)}"
        reason = fields.get("reason")
        if reason and status != "succeeded":
            text += f" ({self._clean(reason)})"
        counts = dict(self._finished)
        if self._total is not None:
            skipped = self._total - self._done_before - sum(counts.values())
            counts["skipped"] = counts.get("skipped", 0) + max(0, skipped)
        ordered = [s for s in _STATUS_ORDER if counts.get(s)]
        ordered += sorted(s for s in counts if s not in _STATUS_ORDER and counts[s])
        steps = ", ".join(f"{counts[s]} {_status_words(s)}" for s in ordered) or "none run"
        text += f"; steps: {steps}"
        used = self._used_phrase()
        text += f"; used {used}" if used else ""
        text += f"; budget left {format_cost(self._left)}" if self._left else ""
        return [Line(text, "ok" if status == "succeeded" else "fail")]
