# SPDX-License-Identifier: Apache-2.0
"""Run one step: prepare its private world, run it confined, record what it made.

Order for one step (each line says why it comes where it does):

1. Reserve budget and record the step `running` durably (a crash after this
   point is visible on resume).
2. Build a fresh private workspace and copy the verified materials in from
   the engine's store (never from client-writable paths).
3. Issue the scoped Vault token, if any (while nothing of the step runs yet).
4. Run the step confined, wait until its whole tree is gone.
5. Revoke the token whatever happened.
6. Collect products from the dead workspace (regular files only, capped),
   hash the copy in the store, then publish artefacts, signatures, cost
   record, link and logs.

Does I/O (os_root, the private area) through SafeDir; the runner forks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from haios import events as ev
from haios._util.safedir import SafeDir
from haios._util.strict_json import dump_json
from haios.cost import Reservation
from haios.errors import HaiosError, InputError, PathError
from haios.intake import copy_into
from haios.load.parse import parse_model
from haios.load.policy import Policy
from haios.models.common import format_rfc3339
from haios.models.cost import COST_SCHEMA, CostRecord, CostReport, Measured, Reported
from haios.models.plan import ExecPlan, PlanStep
from haios.models.state import StepStatus
from haios.osroot import OsRoot
from haios.sandbox.evidence import confinement_record
from haios.sandbox.spec import (
    VIEW_COST_REPORT,
    VIEW_WORKSPACE,
    StepOutcome,
    StepRunner,
    StepSpec,
)
from haios.signing import EngineSigner

STEP_PATH = "/usr/bin:/bin"


class StepGuard(Protocol):
    """Kill-switch and secret hooks around one step (watchdog, Vault)."""

    def before(self, step: PlanStep, uid: int, gid: int, secret_dir: str) -> StepGrant:
        """Prepare external resources for the step; raise a HaiosError to refuse."""
        ...

    def after(self, step: PlanStep, grant: StepGrant) -> None:
        """Release what `before` set up, whatever the outcome."""
        ...

    def was_killed(self, step_id: str) -> str | None:
        """The kill flag that stopped the step, or None."""
        ...

    def failure(self) -> HaiosError | None:
        """An error that must stop the whole run (e.g. the watchdog died), or None."""
        ...


@dataclasses.dataclass(frozen=True)
class StepGrant:
    """What `StepGuard.before` set up for one step."""

    cgroup: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    accessor: str | None = None


class NoGuard:
    """A guard for runs with no watchdog and no Vault (unit tests of the executor)."""

    def before(self, step: PlanStep, uid: int, gid: int, secret_dir: str) -> StepGrant:
        """Nothing to prepare."""
        return StepGrant()

    def after(self, step: PlanStep, grant: StepGrant) -> None:
        """Nothing to release."""

    def was_killed(self, step_id: str) -> str | None:
        """Never killed."""
        return None

    def failure(self) -> HaiosError | None:
        """Never fails."""
        return None


@dataclasses.dataclass(frozen=True)
class StepResult:
    """How one attempt ended, with what it produced and cost."""

    step_id: str
    status: StepStatus
    exit_code: int | None
    reason: str | None
    started: str
    finished: str
    products: dict[str, tuple[str, int]]
    cpu_seconds: float
    wall_seconds: float
    max_rss_bytes: int
    usd: float | int
    tokens: float | int
    budget_cut: bool = False
    killed_by: str | None = None
    violation: str | None = None
    accessor: str | None = None


@dataclasses.dataclass
class RunContext:
    """Everything the executor needs, fixed for one run."""

    osr: OsRoot
    policy: Policy
    plan: ExecPlan
    signer: EngineSigner
    runner: StepRunner
    guard: StepGuard
    bus: ev.EventBus
    store: SafeDir
    private: SafeDir
    uids: Mapping[str, int]
    now: Callable[[], dt.datetime]
    #: artefact name -> sha256 of the verified copy in `store` (inputs, products)
    digests: dict[str, str]


def _fresh_dir(parent: SafeDir, name: str, uid: int, gid: int, mode: int) -> SafeDir:
    if parent.lstat(name) is not None:
        shutil.rmtree(name, dir_fd=parent.fd)
    child = parent.sub(name, create=True, mode=mode)
    os.fchown(child.fd, uid, gid)
    os.fchmod(child.fd, mode)
    return child


def step_environment(plan_id: str, step: PlanStep, extra: Mapping[str, str]) -> dict[str, str]:
    """The step's whole environment (contract section 9), nothing inherited."""
    env = dict(step.env)
    env.update({
        "PATH": STEP_PATH,
        "HOME": VIEW_WORKSPACE,
        "HAIOS_PLAN_ID": plan_id,
        "HAIOS_STEP_ID": step.id,
        "HAIOS_COST_REPORT": VIEW_COST_REPORT,
    })
    env.update(extra)
    return env


class StepExecutor:
    """Runs steps of one plan; `execute` is safe to call from several threads."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        limits = ctx.policy.file.limits
        self._product_max = limits.product_max_bytes
        self._log_max = limits.log_max_bytes
        self._report_max = limits.cost_report_max_bytes
        self._depth = limits.json_max_depth
        # Opened once per run (not per step): descriptors are a bounded resource.
        self._private = {name: ctx.private.sub(name, create=True, mode=0o700)
                         for name in ("work", "cost", "secret", "logs")}

    def _dirs(self, name: str) -> SafeDir:
        return self._private[name]

    def close(self) -> None:
        """Close the private directories this executor opened."""
        for directory in self._private.values():
            directory.close()

    def execute(self, step: PlanStep, reservation: Reservation) -> StepResult:
        """Run one attempt of `step` and publish its outputs.

        Raises:
            HaiosError: the sandbox or an external resource could not be set
                up (the step did not run), or an output could not be written.
        """
        ctx = self.ctx
        uid = gid = ctx.uids[step.id]
        work = _fresh_dir(self._dirs("work"), step.id, uid, gid, 0o700)
        cost_dir = _fresh_dir(self._dirs("cost"), step.id, uid, gid, 0o700)
        secret_root = self._dirs("secret")
        if secret_root.lstat(step.id) is not None:
            shutil.rmtree(step.id, dir_fd=secret_root.fd)
        logs_dir = self._dirs("logs")
        for stream in ("out", "err"):
            logs_dir.unlink(f"{step.id}.{stream}")  # a previous attempt's capture
        try:
            self._copy_materials(step, work)
            grant = ctx.guard.before(step, uid, gid, str(ctx.osr.path / ".haios/secret" / step.id))
            try:
                outcome, started, finished, confinement = self._run(
                    step, reservation, grant, uid, gid)
            finally:
                ctx.guard.after(step, grant)
                if secret_root.lstat(step.id) is not None:
                    shutil.rmtree(step.id, dir_fd=secret_root.fd)
            killed_by = ctx.guard.was_killed(step.id)
            result = self._judge(step, reservation, outcome, started, finished, killed_by,
                                 work, cost_dir, grant.accessor)
            self._publish_logs(step.id, logs_dir)
            self._publish_cost(step, result)
            if result.status == "succeeded":
                self._publish_products(step, result, confinement)
            return result
        finally:
            work.close()
            cost_dir.close()

    # -- before the step -----------------------------------------------------

    def _copy_materials(self, step: PlanStep, work: SafeDir) -> None:
        for name in step.materials:
            copy_into(self.ctx.store, name, work, max_bytes=self._product_max)

    def _run(self, step: PlanStep, reservation: Reservation, grant: StepGrant, uid: int,
             gid: int) -> tuple[StepOutcome, str, str, dict[str, Any]]:
        ctx = self.ctx
        root = ctx.osr.path / ".haios"
        profile = ctx.policy.profiles[step.profile]
        spec = StepSpec(
            plan_id=ctx.plan.plan_id,
            step_id=step.id,
            argv=tuple(step.run),
            env=step_environment(ctx.plan.plan_id, step, grant.env),
            workspace=root / "work" / step.id,
            cost_dir=root / "cost" / step.id,
            secret_dir=(root / "secret" / step.id) if "HAIOS_VAULT_TOKEN_FILE" in grant.env
            else None,
            profile=profile,
            uid=uid,
            gid=gid,
            timeout_seconds=reservation.timeout_seconds(step.timeout_seconds),
            cpu_seconds_limit=reservation.cpu_limit_seconds(profile.rlimits.cpu_seconds),
            stdout_path=root / "logs" / f"{step.id}.out",
            stderr_path=root / "logs" / f"{step.id}.err",
            output_limit_bytes=self._log_max,
            cgroup=None if grant.cgroup is None else Path(grant.cgroup),
        )
        started = format_rfc3339(ctx.now())
        outcome = ctx.runner.run(spec)
        return outcome, started, format_rfc3339(ctx.now()), confinement_record(spec)

    # -- after the step ------------------------------------------------------

    def _judge(self, step: PlanStep, reservation: Reservation, outcome: StepOutcome,
               started: str, finished: str, killed_by: str | None, work: SafeDir,
               cost_dir: SafeDir, accessor: str | None) -> StepResult:
        status: StepStatus = "succeeded"
        reason: str | None = None
        budget_cut = False
        products: dict[str, tuple[str, int]] = {}
        report = CostReport()
        if killed_by is not None:
            status, reason = "killed", f"kill switch {killed_by}"
        elif outcome.timed_out:
            if reservation.bounded_by_budget(step.timeout_seconds):
                status, reason, budget_cut = "failed", "budget: wall_seconds reservation", True
            else:
                status, reason = "timed_out", f"timed out after {step.timeout_seconds}s"
        elif outcome.violation == "cpu_limit" and reservation.cpu_seconds is not None:
            status, reason, budget_cut = "failed", "budget: cpu_seconds reservation", True
        elif outcome.violation is not None:
            status, reason = "failed", f"sandbox violation: {outcome.violation}"
            self.ctx.bus.publish(ev.SANDBOX_VIOLATION, step_id=step.id, kind=outcome.violation)
        elif outcome.exit_code != 0:
            status = "failed"
            reason = (f"exited with status {outcome.exit_code}" if outcome.signal is None
                      else f"killed by signal {outcome.signal}")
        if status == "succeeded":
            try:
                report = self._read_cost_report(cost_dir)
                products = self._collect(step, work)
            except HaiosError as exc:
                status, reason = "failed", str(exc)
        elif status != "killed":
            # A failed step's report still counts against the budget when it parses.
            try:
                report = self._read_cost_report(cost_dir)
            except HaiosError:
                report = CostReport()
        return StepResult(
            step_id=step.id, status=status, exit_code=outcome.exit_code, reason=reason,
            started=started, finished=finished, products=products,
            cpu_seconds=outcome.cpu_seconds, wall_seconds=outcome.wall_seconds,
            max_rss_bytes=outcome.max_rss_bytes, usd=report.usd, tokens=report.tokens,
            budget_cut=budget_cut, killed_by=killed_by, violation=outcome.violation,
            accessor=accessor,
        )

    def _read_cost_report(self, cost_dir: SafeDir) -> CostReport:
        """The step's own cost report: optional, strict, capped (contract section 8)."""
        if cost_dir.lstat("report.json") is None:
            return CostReport()
        try:
            data = cost_dir.read_bytes("report.json", max_bytes=self._report_max)
            return parse_model(CostReport, data, label="cost report", max_depth=self._depth)
        except (InputError, PathError) as exc:
            raise InputError(f"malformed cost report: {exc}") from exc

    def _collect(self, step: PlanStep, work: SafeDir) -> dict[str, tuple[str, int]]:
        """Copy each product from the dead workspace into the store; hash the copy."""
        products: dict[str, tuple[str, int]] = {}
        for name in step.products:
            if work.lstat(name) is None:
                raise InputError(f"product {name} was not produced")
            try:
                products[name] = copy_into(work, name, self.ctx.store,
                                           max_bytes=self._product_max)
            except PathError as exc:
                raise InputError(f"product {name} is not a regular file: {exc}") from exc
        return products

    # -- publishing ----------------------------------------------------------

    def _publish_logs(self, step_id: str, logs_scratch: SafeDir) -> None:
        logs = self.ctx.osr.sub("logs", create=True)
        for stream in ("out", "err"):
            name = f"{step_id}.{stream}"
            if logs_scratch.lstat(name) is None:
                logs.write_atomic(name, b"")
                continue
            fd, size = logs_scratch.open_regular(name)
            try:
                logs.write_atomic_from(name, fd, min(size, self._log_max))
            finally:
                os.close(fd)

    def _publish_cost(self, step: PlanStep, result: StepResult) -> None:
        record = CostRecord.model_validate({
            "schema": COST_SCHEMA,
            "plan_id": self.ctx.plan.plan_id,
            "step_id": step.id,
            "measured": Measured(cpu_seconds=result.cpu_seconds,
                                 wall_seconds=result.wall_seconds,
                                 max_rss_bytes=result.max_rss_bytes),
            "reported": Reported(usd=result.usd, tokens=result.tokens),
        })
        data = dump_json(record.model_dump(mode="json", by_alias=True))
        name = f"{step.id}.json"
        cost = self.ctx.osr.sub("cost", create=True)
        cost.write_atomic(name, data)
        cost.write_atomic(f"{name}.sig", self.ctx.signer.detached(name, _sha256(data)))

    def _publish_products(self, step: PlanStep, result: StepResult,
                          confinement: dict[str, Any]) -> None:
        ctx = self.ctx
        artefacts = ctx.osr.sub("artefacts", create=True)
        for name, (digest, size) in result.products.items():
            fd, _ = ctx.store.open_regular(name)
            try:
                artefacts.write_atomic_from(name, fd, size)
            finally:
                os.close(fd)
            artefacts.write_atomic(f"{name}.sig", ctx.signer.detached(name, digest))
            ctx.bus.publish(ev.PRODUCT_RECORDED, step_id=step.id, name=name, sha256=digest,
                            size=size)
        materials = {name: ctx.digests[name] for name in step.materials}
        link = ctx.signer.link(
            step.id, step.run, materials,
            {name: digest for name, (digest, _) in result.products.items()},
            environment={"haios_confinement": confinement},
            byproducts={"return-value": result.exit_code or 0},
        )
        links = ctx.osr.sub("links", create=True)
        links.write_atomic(f"{step.id}.{ctx.signer.keyid[:8]}.link", link)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
