# SPDX-License-Identifier: Apache-2.0
"""The one orchestrator: load -> verify -> decide -> scope secrets -> run -> record.

`run_plan` reads as the contract's checklist; the first refusal decides the
exit code in the contract's order (section 12): busy (7), a global kill flag
(4), a contract violation (3), then environment preflight (6). A refusal
runs nothing. Does I/O through the modules it calls.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from haios import events as ev
from haios._util.clock import wall_clock
from haios._util.safedir import SafeDir
from haios.area import RunArea
from haios.cost import BudgetLedger, Reservation
from haios.decide.dag import dependents_closure, topological_order
from haios.decide.plan_policy import decide_plan
from haios.errors import (
    EXIT_BUDGET,
    EXIT_KILLED,
    EXIT_OK,
    EXIT_STEP_FAILED,
    BudgetExhaustedError,
    EngineKeyError,
    HaiosError,
    KilledError,
)
from haios.execute import (
    RunContext,
    StepBounds,
    StepExecutor,
    StepGuard,
    StepResult,
    TreeTracker,
    UidSource,
)
from haios.history import History, check_engine_paths, check_fresh_outputs, verify_outputs
from haios.intake import StoredArtefact, read_plan_bytes, verify_inputs, verify_plan
from haios.journal_ingest import ingest_watchdog_journal
from haios.load.policy import Policy
from haios.models.common import format_rfc3339
from haios.models.plan import ExecPlan, PlanStep
from haios.models.state import (
    STATE_SCHEMA,
    CostTotals,
    PlanStatus,
    RunState,
    StepState,
    StepStatus,
)
from haios.osroot import STATE_FILE, OsRoot
from haios.registry import write_registry
from haios.sandbox.spec import StepRunner
from haios.signing import EngineSigner
from haios.state.store import write_signed

#: makes one step's limits, given the step and its kill cgroup (if any)
BoundsFactory = Callable[[PlanStep, Path | None], StepBounds]


@dataclasses.dataclass
class Services:
    """The engine's external parts, so tests and the CLI can choose them."""

    runner_factory: Callable[[Policy], StepRunner]
    guard_factory: Callable[[GuardRequest], StepGuard]
    preflight: Callable[[Policy, ExecPlan], None]
    subscribers: list[ev.Subscriber] = dataclasses.field(default_factory=list)
    #: the step identity pool, given the area's uid lease directory
    uid_source: Callable[[Policy, SafeDir], UidSource] | None = None
    #: per-step memory/process limits, given the policy and the run id
    bounds_factory: Callable[[Policy, str], BoundsFactory] | None = None
    #: a watcher of whole step trees (SIGSYS anywhere in them), started per run
    tree_tracker: Callable[[], TreeTracker] | None = None
    #: called with the os_root descriptor as the run ends, lock still held
    finish: Callable[[SafeDir], None] | None = None
    #: the wall clock (verification's "now", step and state timestamps)
    clock: Callable[[], dt.datetime] = wall_clock


@dataclasses.dataclass(frozen=True)
class GuardRequest:
    """What the guard factory needs to watch and scope one run."""

    osr: OsRoot
    policy: Policy
    plan: ExecPlan
    bus: ev.EventBus
    run_id: str
    #: where the watchdog journals kills (inside the engine's run area)
    journal_path: Path
    #: Vault accessors a previous run recorded as not yet revoked
    leftover_accessors: tuple[str, ...] = ()
    #: durably records a token accessor in state before the token is handed out
    record_accessor: Callable[[str, str], None] | None = None
    #: durably records (True) or forgets (False) a run session's accessor
    record_session: Callable[[str, bool], None] | None = None


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """The end of `haios run`: exit code, final state document, one-line message."""

    exit_code: int
    state: dict[str, Any] | None
    message: str


STATUS_EXIT: dict[str, int] = {
    "succeeded": EXIT_OK, "failed": EXIT_STEP_FAILED, "killed": EXIT_KILLED,
    "budget_exhausted": EXIT_BUDGET,
}


class StateKeeper:
    """The run's mutable view of state.json; every `commit` is atomic and signed."""

    def __init__(self, osr: OsRoot, signer: EngineSigner, plan: ExecPlan, plan_sha256: str,
                 prior: RunState | None, bus: ev.EventBus,
                 audit_head: Callable[[], dict[str, Any] | None],
                 written: Callable[[], None],
                 clock: Callable[[], dt.datetime] = wall_clock) -> None:
        self.osr, self.signer, self.bus = osr, signer, bus
        self.clock = clock
        self.plan_id, self.plan_sha256 = plan.plan_id, plan_sha256
        self.seq = prior.seq if prior else 0
        self.status: PlanStatus = "pending"
        self.reason: str | None = None
        self.steps: dict[str, dict[str, Any]] = {}
        for step in plan.steps:
            old = prior.steps.get(step.id) if prior else None
            self.steps[step.id] = (old.model_dump(mode="json") if old else
                                   StepState().model_dump(mode="json"))
        self.totals: dict[str, Any] = (prior.cost.totals.model_dump(mode="json") if prior
                                       else {"cpu_seconds": 0.0, "wall_seconds": 0.0,
                                             "usd": 0.0, "tokens": 0})
        self._audit_head = audit_head
        self._written = written
        self._first = True
        self.lock = threading.RLock()
        self.sessions: list[str] = list(prior.vault_sessions) if prior else []

    def document(self, now: dt.datetime) -> RunState:
        """The current state as a model (validated)."""
        return RunState.model_validate({
            "schema": STATE_SCHEMA, "plan_id": self.plan_id, "plan_sha256": self.plan_sha256,
            "status": self.status, "reason": self.reason, "steps": self.steps,
            "cost": {"totals": self.totals}, "updated": format_rfc3339(now), "seq": self.seq,
            "audit": self._audit_head(), "vault_sessions": self.sessions,
        })

    def commit(self) -> dict[str, Any]:
        """Publish the state atomically with a fresh engine signature; return it."""
        with self.lock:
            self.seq += 1
            document = write_signed(self.osr.root, STATE_FILE, self.document(self.clock()),
                                    self.signer)
            if self._first:  # the audit log is now covered by a signed state
                self._written()
                self._first = False
            return document

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
            self.steps[step_id]["token_accessors"].append(accessor)
        self.commit()


def run_plan(path: Path, policy: Policy, *, jobs: int, services: Services,
             bus: ev.EventBus) -> RunOutcome:
    """`haios run`: verify everything, then run the plan's steps.

    Raises:
        HaiosError: every refusal, with the contract's exit code.
    """
    # (1) os_root opened without following links; its private run area,
    #     outside os_root, locked: one run at a time (exit 7).
    osr = OsRoot(path)
    try:
        area = RunArea.acquire(Path(policy.file.engine.state_dir), osr.root.fd)
        try:
            return _locked_run(osr, area, policy, jobs, services, bus)
        finally:
            if services.finish is not None:
                services.finish(osr.root)
            area.close()
    finally:
        osr.close()


def _locked_run(osr: OsRoot, area: RunArea, policy: Policy, jobs: int, services: Services,
                bus: ev.EventBus) -> RunOutcome:
    from haios.watchdog.flags import global_flag_present

    osr.sweep_temp_files()  # leftovers of a crash mid-write; never trusted, never kept
    # The audit log subscribes first: a decision is durable before anything else sees it.
    history = History.open(osr, area, policy, bus)
    for subscriber in services.subscribers:
        bus.subscribe(subscriber)
    ingest_watchdog_journal(area, bus)  # kills done while a previous engine was dead
    # (2) A global kill flag refuses the start (exit 4), before any input is read.
    flag = global_flag_present(osr.path / "control",
                               policy.kill_paths)
    if flag is not None:
        bus.publish(ev.KILL_SWITCH, engaged=True, flag=Path(flag).name, scope="global")
        raise KilledError(f"kill switch {flag} is set; refusing to start")
    signer, key_error = _load_signer(policy)
    now = services.clock()
    # (3) Verify: plan signature over the bytes read, schema, expiry, policy,
    #     history (no replay), engine outputs, inputs three ways (exit 3).
    raw: bytes | None = None
    try:
        raw = read_plan_bytes(osr, policy)
        verified = verify_plan(osr, policy, raw, now, bus)
        plan = verified.plan
        decide_plan(plan, policy)
        prior = history.prior_for(verified.sha256)
        check_engine_paths(osr, plan, policy.engine_key.keyid)
        store = area.fresh_store()
        known: dict[str, StoredArtefact] = {}
        if prior is None:
            check_fresh_outputs(osr, plan, policy.engine_key.keyid,
                                state_allowed=history.state is not None)
        else:
            known.update(verify_outputs(osr, policy, plan, prior, store))
        known.update(verify_inputs(osr, policy, plan, store, policy.engine_key.keyid, bus))
    except HaiosError as exc:
        if exc.exit_code == 3:
            history.record_rejection(exc, raw, signer)
        raise
    # (4) Environment: engine key, sandbox and Vault prerequisites (exit 6).
    if key_error is not None or signer is None:
        raise key_error or EngineKeyError("engine key unavailable")
    services.preflight(policy, plan)
    # (5) Idempotence: a plan that already succeeded runs nothing.
    if prior is not None and prior.status == "succeeded":
        bus.publish(ev.RUN_FINISHED, status="succeeded", reason="already succeeded")
        return RunOutcome(EXIT_OK, prior.model_dump(mode="json", by_alias=True),
                          "plan already succeeded; nothing to run")
    try:
        return _execute(osr, area, policy, plan, verified.sha256, prior, signer, store, known,
                        jobs, services, bus, history)
    finally:
        store.close()
        area.drop_store()


def _load_signer(policy: Policy) -> tuple[EngineSigner | None, HaiosError | None]:
    try:
        return EngineSigner.load(policy.file.engine.signing_key, policy.engine_key), None
    except HaiosError as exc:
        return None, exc


def _execute(osr: OsRoot, area: RunArea, policy: Policy, plan: ExecPlan, plan_sha256: str,
             prior: RunState | None, signer: EngineSigner, store: SafeDir,
             known: dict[str, StoredArtefact], jobs: int, services: Services,
             bus: ev.EventBus, history: History) -> RunOutcome:
    order = topological_order({s.id: tuple(s.needs) for s in plan.steps})
    keeper = StateKeeper(osr, signer, plan, plan_sha256, prior, bus, history.head,
                         history.state_written, services.clock)
    ledger = BudgetLedger(plan.budget, prior.cost.totals if prior else CostTotals())
    bus.publish(ev.RUN_STARTED, plan_id=plan.plan_id, plan_sha256=plan_sha256, jobs=jobs,
                steps=len(plan.steps),
                steps_done=sum(1 for e in keeper.steps.values() if e["status"] == "succeeded"))
    for entry in keeper.steps.values():
        if entry["status"] != "succeeded":
            entry.update(status="pending", started=None, finished=None, exit_code=None,
                         reason=None, products={})
    keeper.status = "running"
    keeper.reason = None
    keeper.commit()
    leftovers = (*keeper.sessions,
                 *(a for entry in keeper.steps.values() for a in entry["token_accessors"]))
    with contextlib.ExitStack() as parts:
        guard = services.guard_factory(GuardRequest(osr, policy, plan, bus, plan_sha256[:12],
                                                    area.journal_path("watchdog.jsonl"),
                                                    leftovers, keeper.record_accessor,
                                                    keeper.record_session))
        parts.callback(_close, guard)  # stops the watchdog (closed last)
        runner = services.runner_factory(policy)
        parts.callback(_close, runner)  # stops the launcher
        trees = services.tree_tracker() if services.tree_tracker is not None else None
        parts.callback(_close, trees)
        uid_dir = parts.enter_context(area.uid_dir())
        ctx = RunContext(
            osr, policy, plan, signer, runner, guard, bus, store,
            uids=(services.uid_source(policy, uid_dir) if services.uid_source is not None
                  else _pool(policy, uid_dir)),
            now=services.clock, digests={name: item.sha256 for name, item in known.items()},
            bounds=(services.bounds_factory(policy, plan_sha256[:12])
                    if services.bounds_factory is not None else None),
            trees=trees)
        scheduler = Scheduler(ctx, keeper, ledger, order, jobs, known)
        scheduler.run()
    write_registry(osr, plan, known, signer)
    bus.publish(ev.RUN_FINISHED, status=keeper.status, reason=keeper.reason)
    document = keeper.commit()
    if scheduler.fatal is not None:
        raise scheduler.fatal
    return RunOutcome(STATUS_EXIT.get(keeper.status, EXIT_STEP_FAILED), document,
                      keeper.reason or f"plan {keeper.status}")


def _pool(policy: Policy, uid_dir: SafeDir) -> UidSource:
    from haios.sandbox.uidpool import UidPool

    sandbox = policy.file.sandbox
    return UidPool(uid_dir, sandbox.uid_base, sandbox.uid_count)


def _close(part: object) -> None:
    """Close a guard or runner that owns a process (watchdog, launcher)."""
    close = getattr(part, "close", None)
    if callable(close):
        close()


class Scheduler:
    """Starts ready steps in deterministic order, at most `jobs` at a time."""

    def __init__(self, ctx: RunContext, keeper: StateKeeper, ledger: BudgetLedger,
                 order: list[str], jobs: int, known: dict[str, StoredArtefact]) -> None:
        self.ctx, self.keeper, self.ledger = ctx, keeper, ledger
        self.order, self.jobs, self.known = order, jobs, known
        self.executor = StepExecutor(ctx)
        self.graph = {s.id: tuple(s.needs) for s in ctx.plan.steps}
        self.halt: tuple[PlanStatus, str] | None = None
        self.fatal: HaiosError | None = None
        self.dirty = False  # finished steps not yet in a signed state write

    def _ready(self) -> list[str]:
        steps = self.keeper.steps
        return [
            step_id for step_id in self.order
            if steps[step_id]["status"] == "pending"
            and all(steps[need]["status"] == "succeeded" for need in self.graph[step_id])
        ]

    def _check_start(self, step_id: str) -> None:
        """Refusals checked before each start: kill flags, expiry, budget."""
        from haios.watchdog.flags import global_flag_present, step_flag_present

        failure = self.ctx.guard.failure()
        if failure is not None:
            raise failure
        policy = self.ctx.policy
        control = self.ctx.osr.path / "control"
        flag = global_flag_present(control, policy.kill_paths)
        if flag is not None:
            raise KilledError(f"kill switch {flag} engaged")
        if step_flag_present(control, step_id):
            raise KilledError(f"kill switch KILL.{step_id} engaged")
        unit = self.ledger.exhausted()
        if unit is not None:
            raise BudgetExhaustedError(f"budget exhausted: {unit}")

    def run(self) -> None:
        """Run until every step is done or the plan halts.

        One signed state write per turn of the loop records both the steps
        that just finished and the steps about to start, before any of the
        latter can have an effect.
        """
        running: dict[cf.Future[StepResult], str] = {}
        with cf.ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="step") as pool:
            while True:
                starting = self._admit(len(running)) if self.halt is None else []
                if starting or self.dirty:
                    self.keeper.commit()  # durable before the new steps can act
                    self.dirty = False
                for step_id, reservation in starting:
                    entry = self.keeper.steps[step_id]
                    self.ctx.bus.publish(ev.STEP_STARTED, step_id=step_id,
                                         profile=self.ctx.plan.step(step_id).profile,
                                         attempt=entry["attempts"])
                    running[pool.submit(self._attempt, step_id, reservation)] = step_id
                if not running:
                    break
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: self.order.index(running[f])):
                    self._finish(running.pop(future), future)
        self._close_out()

    def _admit(self, busy: int) -> list[tuple[str, Reservation]]:
        """Mark the next ready steps `running` (not yet durable) with their reservations."""
        admitted: list[tuple[str, Reservation]] = []
        for step_id in self._ready():
            if busy + len(admitted) >= self.jobs or not self._may_start(step_id):
                break
            reservation = self.ledger.reserve(self.jobs - busy - len(admitted))
            entry = self.keeper.steps[step_id]
            entry.update(status="running", attempts=entry["attempts"] + 1,
                         started=format_rfc3339(self.ctx.now()), finished=None, reason=None)
            admitted.append((step_id, reservation))
        return admitted

    def _may_start(self, step_id: str) -> bool:
        """False (and the plan halts) when a kill flag, budget or failure forbids it."""
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

    def _attempt(self, step_id: str, reservation: Any) -> StepResult:
        result = self.executor.execute(self.ctx.plan.step(step_id), reservation)
        self.ledger.settle(reservation, cpu_seconds=result.cpu_seconds,
                           wall_seconds=result.wall_seconds, usd=result.usd,
                           tokens=result.tokens)
        return result

    def _finish(self, step_id: str, future: cf.Future[StepResult]) -> None:
        entry = self.keeper.steps[step_id]
        step = self.ctx.plan.step(step_id)
        try:
            result = future.result()
        except HaiosError as exc:
            self._finish_without_result(step_id, exc)
            return
        leftovers = set(getattr(self.ctx.guard, "leftovers", ()))
        entry.update(status=result.status, exit_code=result.exit_code, reason=result.reason,
                     started=result.started, finished=result.finished,
                     products={n: d for n, (d, _) in result.products.items()},
                     token_accessors=[a for a in entry["token_accessors"] if a in leftovers])
        for name, (digest, size) in result.products.items():
            self.known[name] = StoredArtefact(name, digest, size, f"step:{step_id}",
                                              (self.ctx.signer.keyid,))
            self.ctx.digests[name] = digest
        self.keeper.totals = self.ledger.totals().model_dump(mode="json")
        self.ctx.bus.publish(ev.COST_RECORDED, step_id=step_id, cpu_seconds=result.cpu_seconds,
                             wall_seconds=result.wall_seconds, usd=result.usd,
                             tokens=result.tokens)
        for unit, value in self.ledger.remaining().items():
            self.ctx.bus.publish(ev.BUDGET_REMAINING, unit=unit, value=value)
        self.ctx.bus.publish(ev.STEP_FINISHED, step_id=step_id, status=result.status,
                             uid=result.uid,
                             exit_code=result.exit_code, profile=step.profile,
                             wall_seconds=result.wall_seconds, reason=result.reason)
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

    def _finish_without_result(self, step_id: str, exc: HaiosError) -> None:
        """A step that raised instead of ending: killed at registration, or the
        environment broke (sandbox setup, Vault, watchdog)."""
        killed = isinstance(exc, KilledError)
        status: StepStatus = "killed" if killed else "failed"
        self.keeper.steps[step_id].update(status=status, finished=format_rfc3339(self.ctx.now()),
                                          reason=str(exc))
        self.ctx.bus.publish(ev.STEP_FINISHED, step_id=step_id, status=status, exit_code=None,
                             profile=self.ctx.plan.step(step_id).profile, wall_seconds=0.0,
                             reason=exc.reason)
        self._halt("killed" if killed else "failed", str(exc))
        if not killed and exc.exit_code != EXIT_STEP_FAILED and self.fatal is None:
            self.fatal = exc  # the environment broke mid-run: exit with its code
        self.dirty = True

    def _has_pending(self) -> bool:
        return any(e["status"] == "pending" for e in self.keeper.steps.values())

    def _halt(self, status: PlanStatus, reason: str) -> None:
        # The first halt decides; a kill outranks a failure that it caused.
        if self.halt is None or (status == "killed" and self.halt[0] != "killed"):
            self.halt = (status, reason)
        if status == "budget_exhausted":
            self.ctx.bus.publish(ev.BUDGET_HALT, reason=reason)

    def _close_out(self) -> None:
        steps = self.keeper.steps
        failed = {s for s, e in steps.items() if e["status"] != "succeeded"}
        for step_id in sorted(dependents_closure(self.graph, failed) | failed):
            if steps[step_id]["status"] == "pending":
                steps[step_id].update(status="skipped", started=None, finished=None)
        if self.halt is not None:
            self.keeper.status, self.keeper.reason = self.halt
        else:
            self.keeper.status, self.keeper.reason = "succeeded", None
