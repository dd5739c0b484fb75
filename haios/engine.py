# SPDX-License-Identifier: Apache-2.0
"""`haios run`, top down: the trust flow in the order the contract demands.

`run_plan` walks the numbered steps below; each says why it sits where it
does. The first refusal decides the exit code in the contract's order
(section 12): busy (7), a global kill flag (4), a contract violation (3),
then the environment (6). A refusal runs nothing. ARCHITECTURE.md has the
same flow as a table with the module and exit code of every refusal.

 1. Lock: os_root opened without following links, its run area (outside
    os_root) locked. First, so two runs never interleave writes (7).
 2. History and audit: crash leftovers swept, the signed state and the
    audit chain opened. Before any decision, so every decision is audited.
 3. Global kill flag: refuses the start (4) before any input is read.
 4. Signer: loaded now, its error held back until (6), so a contract
    violation in the input is reported as one (3), not as a key problem.
 5. Admission: one call returns a frozen `VerifiedRun` (haios/admission.py)
    or refuses (3); a refusal is recorded in state and audit.
 6. Environment: the engine key, the sandbox, uid range, cgroups, Vault,
    egress (6). After admission: probing the host for a plan that does not
    verify would let an unverified client make the engine act.
 7. Idempotence: a plan that already succeeded runs nothing (0).
 8. Run: the scheduler (haios/run/) under the budget and kill flags.
 9. Publish: registry map, final signed state, then metrics, the lock
    still held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from haios import events as ev
from haios._util.clock import wall_clock
from haios._util.durability import Barrier
from haios._util.safedir import SafeDir
from haios.admission import VerifiedRun, admit
from haios.area import RunArea
from haios.cost import BudgetLedger
from haios.decide.dag import topological_order
from haios.errors import (
    EXIT_BUDGET,
    EXIT_KILLED,
    EXIT_OK,
    EXIT_STEP_FAILED,
    EngineKeyError,
    HaiosError,
    KilledError,
)
from haios.execute import RunContext, StepBounds, TreeTracker, UidSource
from haios.guard.api import GuardRequest, StepGuard
from haios.history import History
from haios.intake import read_plan_bytes
from haios.journal_ingest import ingest_watchdog_journal
from haios.load.policy import Policy
from haios.models.plan import ExecPlan, PlanStep
from haios.models.state import CostTotals
from haios.osroot import OsRoot
from haios.registry import write_registry
from haios.run.keeper import StateKeeper
from haios.run.scheduler import Scheduler
from haios.sandbox.spec import StepRunner
from haios.signing import EngineSigner
from haios.watchdog.flags import engaged_flag

__all__ = ["BoundsFactory", "GuardRequest", "RunOutcome", "Services", "run_plan"]

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
class RunOutcome:
    """The end of `haios run`: exit code, final state document, one-line message."""

    exit_code: int
    state: dict[str, Any] | None
    message: str


STATUS_EXIT: dict[str, int] = {
    "succeeded": EXIT_OK, "failed": EXIT_STEP_FAILED, "killed": EXIT_KILLED,
    "budget_exhausted": EXIT_BUDGET,
}


def run_plan(path: Path, policy: Policy, *, jobs: int, services: Services,
             bus: ev.EventBus) -> RunOutcome:
    """`haios run`: verify everything, then run the plan's steps.

    Raises:
        HaiosError: every refusal, with the contract's exit code.
    """
    # (1) Lock.
    osr = OsRoot(path)
    try:
        area = RunArea.acquire(Path(policy.file.engine.state_dir), osr.root.fd)
        try:
            return _locked_run(osr, area, policy, jobs, services, bus)
        finally:
            if services.finish is not None:
                services.finish(osr.root)  # (9) metrics, under the lock
            area.close()
    finally:
        osr.close()


def _locked_run(osr: OsRoot, area: RunArea, policy: Policy, jobs: int, services: Services,
                bus: ev.EventBus) -> RunOutcome:
    # (2) History and audit. Temp files of a crash mid-write are never
    #     trusted; the audit log subscribes first, so a decision is durable
    #     before anything else sees it; kills the watchdog did while no
    #     engine was alive are ingested.
    osr.sweep_temp_files()
    history = History.open(osr, area, policy, bus, services.clock)
    barrier = Barrier()
    history.defer_audit(barrier)
    try:
        return _audited_run(osr, area, policy, jobs, services, bus, history, barrier)
    finally:
        _flush_last(barrier)


def _flush_last(barrier: Barrier) -> None:
    """Everything recorded is durable before the process reports its exit code.

    When a refusal or failure is already on its way out, it decides the
    exit code; a flush that fails as well must not replace it.
    """
    if sys.exc_info()[1] is None:
        barrier.flush()
        return
    with contextlib.suppress(HaiosError, OSError):
        barrier.flush()
    barrier.close()


def _audited_run(osr: OsRoot, area: RunArea, policy: Policy, jobs: int, services: Services,
                 bus: ev.EventBus, history: History, barrier: Barrier) -> RunOutcome:
    for subscriber in services.subscribers:
        bus.subscribe(subscriber)
    ingest_watchdog_journal(area, bus)
    # (3) Global kill flag.
    flag = engaged_flag(osr.path / "control", policy.kill_paths)
    if flag is not None:
        bus.publish(ev.KillSwitch(engaged=True, flag=Path(flag).name, scope="global"))
        raise KilledError(f"kill switch {flag} is set; refusing to start")
    # (4) Signer, its error held back.
    signer, key_error = _load_signer(policy)
    # (5) Admission.
    raw: bytes | None = None
    try:
        raw = read_plan_bytes(osr, policy)
        verified = admit(osr, area, policy, history, raw, services.clock(), bus)
    except HaiosError as exc:
        if exc.exit_code == 3:
            history.record_rejection(exc, raw, signer)
        raise
    with _holding(verified, area):
        # (6) Environment.
        if key_error is not None or signer is None:
            raise key_error or EngineKeyError("engine key unavailable")
        services.preflight(policy, verified.plan)
        # (7) Idempotence.
        prior = verified.prior
        if prior is not None and prior.status == "succeeded":
            bus.publish(ev.RunFinished(status="succeeded", reason="already succeeded"))
            return RunOutcome(EXIT_OK, prior.model_dump(mode="json", by_alias=True),
                              "plan already succeeded; nothing to run")
        # (8) Run, then (9) publish.
        return _run(osr, area, policy, verified, signer, jobs, services, bus, history, barrier)


@contextlib.contextmanager
def _holding(verified: VerifiedRun, area: RunArea) -> Iterator[None]:
    """The verified copies live exactly as long as the run that uses them."""
    try:
        yield
    finally:
        verified.store.close()
        area.drop_store()


def _load_signer(policy: Policy) -> tuple[EngineSigner | None, HaiosError | None]:
    try:
        return EngineSigner.load(policy.file.engine.signing_key, policy.engine_key), None
    except HaiosError as exc:
        return None, exc


def _run(osr: OsRoot, area: RunArea, policy: Policy, verified: VerifiedRun,
         signer: EngineSigner, jobs: int, services: Services, bus: ev.EventBus,
         history: History, barrier: Barrier) -> RunOutcome:
    """(8) Run the steps not yet succeeded; (9) publish registry and final state."""
    plan, prior = verified.plan, verified.prior
    keeper = StateKeeper(osr, signer, plan, verified.plan_sha256, prior,
                         audit_head=history.head, written=history.state_written,
                         clock=services.clock, barrier=barrier)
    ledger = BudgetLedger(plan.budget, prior.cost.totals if prior else CostTotals())
    bus.publish(ev.RunStarted(plan_id=plan.plan_id, plan_sha256=verified.plan_sha256,
                jobs=jobs, steps=len(plan.steps), steps_done=keeper.succeeded()))
    for record in keeper.steps.values():
        record.reopen()
    keeper.status, keeper.reason = "running", None
    keeper.commit()
    known = dict(verified.artefacts)
    run_id = verified.plan_sha256[:12]
    with contextlib.ExitStack() as parts:
        guard = services.guard_factory(GuardRequest(
            osr, policy, plan, bus, run_id, area.journal_path("watchdog.jsonl"),
            keeper.outstanding_accessors(), keeper.record_accessor, keeper.record_session))
        parts.callback(_close, guard)  # stops the watchdog (closed last)
        runner = services.runner_factory(policy)
        parts.callback(_close, runner)  # stops the launcher
        trees = services.tree_tracker() if services.tree_tracker is not None else None
        parts.callback(_close, trees)
        uid_dir = parts.enter_context(area.uid_dir())
        ctx = RunContext(
            osr, policy, plan, signer, runner, guard, bus, verified.store,
            uids=(services.uid_source(policy, uid_dir) if services.uid_source is not None
                  else _pool(policy, uid_dir)),
            now=services.clock, digests={name: item.sha256 for name, item in known.items()},
            bounds=(services.bounds_factory(policy, run_id)
                    if services.bounds_factory is not None else None),
            trees=trees, barrier=barrier)
        scheduler = Scheduler(ctx, keeper, ledger, topological_order(
            {s.id: tuple(s.needs) for s in plan.steps}), jobs, known)
        scheduler.run()
    # (9) Publish.
    write_registry(osr, plan, known, signer)
    bus.publish(ev.RunFinished(status=keeper.status, reason=keeper.reason))
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
