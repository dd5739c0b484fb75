# SPDX-License-Identifier: Apache-2.0
"""Run one step: prepare its private world, run it confined, record what it made.

Order for one step (each line says why it comes where it does):

1. Reserve budget and record the step `running` durably (a crash after this
   point is visible on resume).
2. Lease a uid no other live step on the host holds (sandbox/uidpool.py).
3. Create the step's filesystems (workspace, cost dir, secret) as detached
   tmpfs mounts that no host path names (sandbox/stepfs.py), and its memory
   and process limits (sandbox/cglimits.py); copy the verified materials in
   from the engine's store (never from client-writable paths).
4. Issue the scoped Vault token, if any, into the secret filesystem
   (while nothing of the step runs yet).
5. Start the step's egress forwarder when its profile names endpoints
   (egress/forward.py: it serves only the listeners the sandbox creates in
   the step's own network namespace), run the step confined, wait until its
   whole tree is gone (every process of the tree that died of SIGSYS is a
   violation, sandbox/treewatch.py), then stop the forwarder, whose
   connection records are durable before the step is judged.
6. Revoke the token whatever happened.
7. Collect products from the dead workspace (regular files only, capped),
   hash the copy in the store, then publish artefacts, signatures, cost
   record, link and logs.
8. Drop the filesystems (whatever the step left dies with them), remove
   the limit cgroups, release the uid.

Does I/O (os_root, the engine's store) through SafeDir; the runner forks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from haios import events as ev
from haios._util.durability import Barrier
from haios._util.safedir import SafeDir
from haios._util.strict_json import dump_json
from haios._util.warm_import import warm
from haios.cost import Reservation
from haios.errors import (
    CopyError,
    HaiosError,
    InputError,
    PathError,
    SandboxSetupError,
    StepFailedError,
)
from haios.guard.api import StepGrant, StepGuard
from haios.intake import copy_into
from haios.load.parse import parse_model
from haios.load.policy import Policy
from haios.models.common import format_rfc3339
from haios.models.cost import COST_SCHEMA, CostRecord, CostReport, Measured, Reported
from haios.models.plan import ExecPlan, PlanStep
from haios.models.state import EndStatus
from haios.osroot import OsRoot
from haios.sandbox.evidence import confinement_record
from haios.sandbox.profile import Profile
from haios.sandbox.spec import (
    VIEW_COST_REPORT,
    VIEW_WORKSPACE,
    StepOutcome,
    StepRunner,
    StepSpec,
)
from haios.sandbox.stepfs import StepMounts, open_capture, read_capture
from haios.signing import LINK_MODULES, EngineSigner

if TYPE_CHECKING:
    from haios.egress.forward import Forwarder

STEP_PATH = "/usr/bin:/bin"
#: how long a step may wait for a free uid when the host's pool is in use
UID_LEASE_TIMEOUT_SECONDS = 30.0
#: the tree's exit events are queued before the init's exit is visible
TREE_SETTLE_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class StepResult:
    """How one attempt ended, with what it produced and cost."""

    step_id: str
    status: EndStatus
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
    #: the uid the attempt ran as (leased for it alone; in the audit log)
    uid: int | None = None


class UidLease(Protocol):
    """One leased step identity (uid == gid), held until `release`."""

    @property
    def uid(self) -> int:
        """The leased uid (also the gid)."""
        ...

    def release(self) -> None:
        """Give the uid back (only once the step's tree is gone)."""
        ...


class UidSource(Protocol):
    """Where step identities come from (the host-wide pool)."""

    def lease(self, timeout_seconds: float) -> UidLease:
        """A uid no other live step on the host holds; raise a HaiosError if none."""
        ...


class StepBounds(Protocol):
    """Tree-wide limits of one step (cgroups), removed after it."""

    @property
    def directories(self) -> tuple[Path, ...]:
        """cgroup directories the step's init joins."""
        ...

    def violations(self) -> tuple[str, ...]:
        """Limits the tree hit ("memory", "processes")."""
        ...

    def remove(self) -> None:
        """Remove the limit cgroups (the tree is dead)."""
        ...


class TreeTracker(Protocol):
    """Follows one step's process tree for deaths the init cannot see."""

    def track(self, root_pid: int) -> TrackedTree:
        """Start following the tree of `root_pid`."""
        ...


class TrackedTree(Protocol):
    """One followed tree."""

    def wait_settled(self, timeout: float) -> None:
        """Wait until every exit of the tree has been seen."""
        ...

    def sigsys_deaths(self) -> int:
        """How many processes of the tree died of SIGSYS."""
        ...

    def close(self) -> None:
        """Stop following."""
        ...


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
    uids: UidSource
    now: Callable[[], dt.datetime]
    #: artefact name -> sha256 of the verified copy in `store` (inputs, products)
    digests: dict[str, str]
    #: creates a step's memory/process limits, given its kill cgroup; None: none
    bounds: Callable[[PlanStep, Path | None], StepBounds] | None = None
    #: sees SIGSYS deaths anywhere in a step's tree; None: the init's view only
    trees: TreeTracker | None = None
    #: batches the fsyncs of what a step publishes; flushed before the signed
    #: state refers to it (None: every write is durable on its own)
    barrier: Barrier | None = None


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

    def execute(self, step: PlanStep, reservation: Reservation) -> StepResult:
        """Run one attempt of `step` and publish its outputs.

        Cleanup runs in reverse order of setup: the filesystems and limit
        cgroups go once the tree is dead, the uid last of all.

        Raises:
            HaiosError: the sandbox or an external resource could not be set
                up (the step did not run), or an output could not be written.
        """
        ctx = self.ctx
        profile = ctx.policy.profiles[step.profile]
        with contextlib.ExitStack() as stack:
            lease = ctx.uids.lease(UID_LEASE_TIMEOUT_SECONDS)
            stack.callback(lease.release)
            uid = gid = lease.uid
            step_fs = StepMounts.create(
                uid, gid, workspace_bytes=profile.filesystem.workspace_size_bytes,
                workspace_inodes=profile.filesystem.workspace_inodes,
                with_secret=step.vault_scope is not None)
            stack.callback(step_fs.close)
            captures = (open_capture(f"{step.id}.out"), open_capture(f"{step.id}.err"))
            for fd in captures:
                stack.callback(os.close, fd)
            self._copy_materials(step, step_fs.workspace.dir)
            secret_fd = None if step_fs.secret is None else step_fs.secret.dir.fd
            grant = ctx.guard.before(step, uid, gid, secret_fd)
            try:
                bounds = self._bounds(step, grant)
                if bounds is not None:
                    stack.callback(bounds.remove)
                outcome, started, finished, confinement = self._run(
                    step, reservation, grant, uid, step_fs, captures, bounds)
            finally:
                ctx.guard.after(step, grant)
            killed_by = ctx.guard.was_killed(step.id)
            result = dataclasses.replace(
                self._judge(step, reservation, outcome, started, finished, killed_by,
                            step_fs.workspace.dir, step_fs.cost.dir),
                uid=uid)
            self._publish_logs(step.id, captures)
            self._publish_cost(step, result)
            if result.status == "succeeded":
                self._publish_products(step, result, confinement)
        return result

    # -- before the step -----------------------------------------------------

    def _bounds(self, step: PlanStep, grant: StepGrant) -> StepBounds | None:
        if self.ctx.bounds is None:
            return None
        return self.ctx.bounds(step, None if grant.cgroup is None else Path(grant.cgroup))

    def _copy_materials(self, step: PlanStep, work: SafeDir) -> None:
        for name in step.materials:
            try:
                copy_into(self.ctx.store, name, work, max_bytes=self._product_max)
            except CopyError as exc:
                raise StepFailedError(f"step {step.id}: material {name} does not fit in the "
                                      "workspace (profile workspace_size_bytes/inodes)") from exc

    def _run(self, step: PlanStep, reservation: Reservation, grant: StepGrant, uid: int,
             step_fs: StepMounts, captures: tuple[int, int], bounds: StepBounds | None,
             ) -> tuple[StepOutcome, str, str, dict[str, Any]]:
        ctx = self.ctx
        profile = ctx.policy.profiles[step.profile]
        with contextlib.ExitStack() as network:
            forwarder = self._open_egress(step, profile, grant)
            if forwarder is not None:
                network.enter_context(forwarder)
            ran = self._run_confined(step, reservation, grant, uid, step_fs, captures, bounds,
                                     forwarder)
        return ran

    def _open_egress(self, step: PlanStep, profile: Profile,
                     grant: StepGrant) -> Forwarder | None:
        """The step's forwarder (not started), or None without endpoints.

        Raises:
            SandboxSetupError: the profile names endpoints the guard did not
                resolve (never run a step without the reach it was given).
        """
        if profile.unsafe_host_network:
            self.ctx.bus.publish(ev.EgressOpened(step_id=step.id, mode="host", endpoints=[],
                                 limits=None))
            return None
        if not profile.egress:
            return None
        if not grant.egress:
            raise SandboxSetupError(f"step {step.id}: profile {profile.name} names egress "
                                    "endpoints that were not resolved for this run")
        # Imported here: most steps have no egress (sockets, selectors, threads).
        from haios.egress.forward import Forwarder
        from haios.egress.limits import ForwardLimits

        limits = profile.egress_limits
        return Forwarder.open(step.id, grant.egress, ForwardLimits(
            connections_max=limits.connections_max,
            connections_total_max=limits.connections_total_max,
            bytes_max=limits.bytes_max,
            connect_timeout_seconds=limits.connect_timeout_seconds,
        ), self.ctx.bus.publish)

    def _run_confined(self, step: PlanStep, reservation: Reservation, grant: StepGrant,
                      uid: int, step_fs: StepMounts, captures: tuple[int, int],
                      bounds: StepBounds | None, forwarder: Forwarder | None,
                      ) -> tuple[StepOutcome, str, str, dict[str, Any]]:
        ctx = self.ctx
        profile = ctx.policy.profiles[step.profile]
        spec = StepSpec(
            plan_id=ctx.plan.plan_id,
            step_id=step.id,
            argv=tuple(step.run),
            env=step_environment(ctx.plan.plan_id, step, grant.env),
            mounts=step_fs,
            profile=profile,
            uid=uid,
            gid=uid,
            timeout_seconds=reservation.timeout_seconds(step.timeout_seconds),
            cpu_seconds_limit=reservation.cpu_limit_seconds(profile.rlimits.cpu_seconds),
            stdout_fd=captures[0],
            stderr_fd=captures[1],
            output_limit_bytes=self._log_max,
            cgroup=None if grant.cgroup is None else Path(grant.cgroup),
            limit_cgroups=() if bounds is None else bounds.directories,
            egress=None if forwarder is None else forwarder.step_egress,
        )
        evidence = self._evidence(spec)
        if forwarder is not None:
            # Durable before the step can connect: what it may reach.
            ctx.bus.publish(ev.EgressOpened(step_id=step.id, mode="egress",
                            endpoints=evidence["egress"]["endpoints"],
                            limits=evidence["egress"]["limits"]))
            forwarder.start()
        started = format_rfc3339(ctx.now())
        trees: list[TrackedTree] = []

        def follow(pid: int) -> None:
            if ctx.trees is not None:
                trees.append(ctx.trees.track(pid))

        try:
            # Every record of what leads up to the start (a token issued, the
            # egress opened) is durable before the step can act on it.
            if ctx.barrier is not None:
                ctx.barrier.flush()
            # The first step's link needs in-toto: it imports while this step runs.
            warm(LINK_MODULES)
            outcome = ctx.runner.run(spec, on_start=follow)
            outcome = _tree_violations(outcome, trees, bounds)
        finally:
            for tree in trees:
                tree.close()
        if forwarder is not None:
            # The tree is gone: cut what is left and record every connection.
            forwarder.stop()
        return outcome, started, format_rfc3339(ctx.now()), evidence

    def _evidence(self, spec: StepSpec) -> dict[str, Any]:
        """The confinement for the engine's link, with the identity as a lease.

        The uid comes from the host-wide pool and differs from run to run;
        the link names the pool, so links stay byte-identical whatever the
        scheduling (contract section 4, `--jobs`), and the audit log's
        `step.finished` record names the uid itself.
        """
        record = confinement_record(spec)
        sandbox = self.ctx.policy.file.sandbox
        record["identity"] = {
            "uid": "leased for this step alone", "gid": "equal to the uid",
            "pool": {"base": sandbox.uid_base, "count": sandbox.uid_count},
            "supplementary_groups": [],
        }
        return record

    # -- after the step ------------------------------------------------------

    def _judge(self, step: PlanStep, reservation: Reservation, outcome: StepOutcome,
               started: str, finished: str, killed_by: str | None, work: SafeDir,
               cost_dir: SafeDir) -> StepResult:
        status: EndStatus = "succeeded"
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
            self.ctx.bus.publish(ev.SandboxViolation(step_id=step.id, kind=outcome.violation))
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
            budget_cut=budget_cut,
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

    def _publish_logs(self, step_id: str, captures: tuple[int, int]) -> None:
        logs = self.ctx.osr.sub("logs", create=True)
        for stream, fd in zip(("out", "err"), captures, strict=True):
            logs.write_atomic(f"{step_id}.{stream}", read_capture(fd, self._log_max),
                              barrier=self.ctx.barrier)

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
        barrier = self.ctx.barrier
        cost.write_atomic(name, data, barrier=barrier)
        cost.write_atomic(f"{name}.sig", self.ctx.signer.detached(name, _sha256(data)),
                          barrier=barrier)

    def _publish_products(self, step: PlanStep, result: StepResult,
                          confinement: dict[str, Any]) -> None:
        ctx = self.ctx
        artefacts = ctx.osr.sub("artefacts", create=True)
        for name, (digest, size) in result.products.items():
            fd, _ = ctx.store.open_regular(name)
            try:
                artefacts.write_atomic_from(name, fd, size, barrier=ctx.barrier)
            finally:
                os.close(fd)
            artefacts.write_atomic(f"{name}.sig", ctx.signer.detached(name, digest),
                                   barrier=ctx.barrier)
            ctx.bus.publish(ev.ProductRecorded(step_id=step.id, name=name, sha256=digest,
                            size=size))
        materials = {name: ctx.digests[name] for name in step.materials}
        link = ctx.signer.link(
            step.id, step.run, materials,
            {name: digest for name, (digest, _) in result.products.items()},
            environment={"haios_confinement": confinement},
            byproducts={"return-value": result.exit_code or 0},
        )
        links = ctx.osr.sub("links", create=True)
        links.write_atomic(f"{step.id}.{ctx.signer.keyid[:8]}.link", link, barrier=ctx.barrier)


def _tree_violations(outcome: StepOutcome, trees: list[TrackedTree],
                     bounds: StepBounds | None) -> StepOutcome:
    """Fold in what only the whole tree shows: SIGSYS deaths below the step's
    main process, and memory or process limits hit anywhere in it."""
    if outcome.violation is not None:
        return outcome
    for tree in trees:
        tree.wait_settled(TREE_SETTLE_SECONDS)
        if tree.sigsys_deaths() > 0:
            return dataclasses.replace(outcome, violation="seccomp")
    hit = bounds.violations() if bounds is not None else ()
    if hit:
        return dataclasses.replace(outcome, violation=hit[0])
    return outcome


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
