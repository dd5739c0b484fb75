# SPDX-License-Identifier: Apache-2.0
"""The scheduler: which step starts next, and what its end means for the plan.

Steps start in the plan's deterministic topological order, at most `jobs`
at a time, each only when every step it needs has succeeded. Before each
start: the guard's fatal failure, the kill flags, then the budget. One
signed state write per turn of the loop records both the steps that just
ended and the steps about to start, before any of the latter can act.

The first halt decides the plan's status; a kill outranks a failure that it
caused. An environment failure mid-run (Vault, watchdog, sandbox setup) is
kept in `fatal` so the run exits with its code. Does I/O through the
executor, the keeper and the bus.
"""

from __future__ import annotations

import concurrent.futures as cf

from haios import events as ev
from haios.cost import BudgetLedger, Reservation
from haios.decide.dag import dependents_closure
from haios.errors import (
    EXIT_STEP_FAILED,
    BudgetExhaustedError,
    HaiosError,
    KilledError,
)
from haios.execute import RunContext, StepExecutor, StepResult
from haios.intake import StoredArtefact
from haios.models.common import format_rfc3339
from haios.models.state import PlanStatus
from haios.run.keeper import StateKeeper
from haios.run.ready import ReadySteps
from haios.watchdog.flags import engaged_flag


class Scheduler:
    """Starts ready steps in deterministic order, at most `jobs` at a time."""

    def __init__(self, ctx: RunContext, keeper: StateKeeper, ledger: BudgetLedger,
                 order: list[str], jobs: int, known: dict[str, StoredArtefact]) -> None:
        self.ctx, self.keeper, self.ledger = ctx, keeper, ledger
        self.jobs, self.known = jobs, known
        self.executor = StepExecutor(ctx)
        self.graph = {s.id: tuple(s.needs) for s in ctx.plan.steps}
        self.ready = ReadySteps(order, self.graph, lambda step_id: keeper.steps[step_id].status)
        self.halt: tuple[PlanStatus, str] | None = None
        self.fatal: HaiosError | None = None
        self.dirty = False  # ended steps not yet in a signed state write

    def run(self) -> None:
        """Run until every step is done or the plan halts, then close out."""
        running: dict[cf.Future[StepResult], str] = {}
        with cf.ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="step") as pool:
            while True:
                starting = self._admit(len(running)) if self.halt is None else []
                for step_id, _ in starting:
                    self.ctx.bus.publish(ev.StepStarted(
                        step_id=step_id, profile=self.ctx.plan.step(step_id).profile,
                        attempt=self.keeper.steps[step_id].attempts))
                if starting or self.dirty:
                    # One barrier and one signed state per turn: the steps that
                    # ended and those about to start, durable before they act.
                    self.keeper.commit()
                    self.dirty = False
                for step_id, reservation in starting:
                    running[pool.submit(self._attempt, step_id, reservation)] = step_id
                if not running:
                    break
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: self.ready.rank(running[f])):
                    self._finish(running.pop(future), future)
        self._close_out()

    def _admit(self, busy: int) -> list[tuple[str, Reservation]]:
        """Start the next ready steps (not yet durable) with their reservations."""
        admitted: list[tuple[str, Reservation]] = []
        while (step_id := self.ready.first()) is not None:
            if busy + len(admitted) >= self.jobs or not self._may_start(step_id):
                break
            reservation = self.ledger.reserve(self.jobs - busy - len(admitted))
            with self.keeper.lock:
                self.keeper.steps[step_id].start(format_rfc3339(self.ctx.now()))
            self.ready.started(step_id)
            admitted.append((step_id, reservation))
        return admitted

    def _may_start(self, step_id: str) -> bool:
        """False (and the plan halts) when a failure, a kill flag or the budget forbids it."""
        try:
            self._check_start(step_id)
        except KilledError as exc:
            self._halt("killed", str(exc))
            return False
        except BudgetExhaustedError as exc:
            self._halt("budget_exhausted", str(exc))
            return False
        except HaiosError as exc:
            self._halt("failed", str(exc))
            self.fatal = self.fatal or exc
            return False
        return True

    def _check_start(self, step_id: str) -> None:
        failure = self.ctx.guard.failure()
        if failure is not None:
            raise failure
        flag = engaged_flag(self.ctx.osr.path / "control", self.ctx.policy.kill_paths, step_id)
        if flag is not None:
            raise KilledError(f"kill switch {flag} engaged")
        unit = self.ledger.exhausted()
        if unit is not None:
            raise BudgetExhaustedError(f"budget exhausted: {unit}")

    def _attempt(self, step_id: str, reservation: Reservation) -> StepResult:
        result = self.executor.execute(self.ctx.plan.step(step_id), reservation)
        self.ledger.settle(reservation, cpu_seconds=result.cpu_seconds,
                           wall_seconds=result.wall_seconds, usd=result.usd,
                           tokens=result.tokens)
        return result

    def _finish(self, step_id: str, future: cf.Future[StepResult]) -> None:
        try:
            result = future.result()
        except HaiosError as exc:
            self._finish_without_result(step_id, exc)
            return
        self._record(step_id, result)
        if result.status == "killed":
            self._halt("killed", result.reason or "killed")
        elif result.budget_cut:
            self._halt("budget_exhausted", result.reason or "budget exhausted")
        elif result.status != "succeeded":
            self._halt("failed", f"step {step_id} {result.status}: {result.reason}")
        else:
            exhausted = self.ledger.exhausted()
            if exhausted is not None and self._has_pending():
                self._halt("budget_exhausted", f"budget exhausted: {exhausted}")
        failure = self.ctx.guard.failure()
        if failure is not None:
            self._halt("failed", str(failure))
            self.fatal = self.fatal or failure
        self.dirty = True

    def _record(self, step_id: str, result: StepResult) -> None:
        """Put an attempt's result in the state and the run's artefacts; publish it."""
        with self.keeper.lock:
            record = self.keeper.steps[step_id]
            record.end(result.status, exit_code=result.exit_code, reason=result.reason,
                       started=result.started, finished=result.finished,
                       products={name: digest for name, (digest, _) in result.products.items()})
            record.keep_accessors(self.ctx.guard.unrevoked())
            self.keeper.totals = self.ledger.totals()
        if result.status == "succeeded":
            self.ready.succeeded(step_id)
        for name, (digest, size) in result.products.items():
            self.known[name] = StoredArtefact(name, digest, size, f"step:{step_id}",
                                              (self.ctx.signer.keyid,))
            self.ctx.digests[name] = digest
        bus = self.ctx.bus
        bus.publish(ev.CostRecorded(step_id=step_id, cpu_seconds=result.cpu_seconds,
                    wall_seconds=result.wall_seconds, usd=result.usd, tokens=result.tokens))
        for unit, value in self.ledger.remaining().items():
            bus.publish(ev.BudgetRemaining(unit=unit, value=value))
        bus.publish(ev.StepFinished(step_id=step_id, status=result.status, uid=result.uid,
                    exit_code=result.exit_code, profile=self.ctx.plan.step(step_id).profile,
                    wall_seconds=result.wall_seconds, reason=result.reason))

    def _finish_without_result(self, step_id: str, exc: HaiosError) -> None:
        """A step that raised instead of ending: killed at registration, or the
        environment broke (sandbox setup, Vault, watchdog)."""
        killed = isinstance(exc, KilledError)
        with self.keeper.lock:
            record = self.keeper.steps[step_id]
            record.abort(killed=killed, reason=str(exc), now=format_rfc3339(self.ctx.now()))
        self.ctx.bus.publish(ev.StepFinished(step_id=step_id, status=record.status,
                             exit_code=None, profile=self.ctx.plan.step(step_id).profile,
                             wall_seconds=0.0, reason=exc.reason))
        self._halt("killed" if killed else "failed", str(exc))
        if not killed and exc.exit_code != EXIT_STEP_FAILED and self.fatal is None:
            self.fatal = exc  # the environment broke mid-run: exit with its code
        self.dirty = True

    def _has_pending(self) -> bool:
        return any(record.status == "pending" for record in self.keeper.steps.values())

    def _halt(self, status: PlanStatus, reason: str) -> None:
        # The first halt decides; a kill outranks a failure that it caused.
        if self.halt is None or (status == "killed" and self.halt[0] != "killed"):
            self.halt = (status, reason)
        if status == "budget_exhausted":
            self.ctx.bus.publish(ev.BudgetHalt(reason=reason))

    def _close_out(self) -> None:
        """Skip what can no longer run; set the plan's status from the halt."""
        steps = self.keeper.steps
        with self.keeper.lock:
            failed = {s for s, record in steps.items() if record.status != "succeeded"}
            for step_id in sorted(dependents_closure(self.graph, failed) | failed):
                if steps[step_id].status == "pending":
                    steps[step_id].skip()
            if self.halt is not None:
                self.keeper.status, self.keeper.reason = self.halt
            else:
                self.keeper.status, self.keeper.reason = "succeeded", None
