# SPDX-License-Identifier: Apache-2.0
"""Fakes for driving `haios.engine.run_plan` in-process, without a sandbox.

The engine's seams (`haios.engine.Services`) take a scripted step runner,
a scripted guard, a no-op or refusing preflight, a fake uid source and a
fixed clock. Everything else is real: the policy folder, keys, the signed
plan and inputs (tests/support/world.py), verification, the signed state, the audit
chain, the step's detached workspace filesystems, published outputs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from haios import events as ev
from haios._util.safedir import SafeDir
from haios.engine import GuardRequest, RunOutcome, Services, run_plan
from haios.errors import HaiosError, SandboxSetupError
from haios.guard.api import StepGrant
from haios.load.policy import Policy, load_policy
from haios.models.plan import ExecPlan, PlanStep
from haios.sandbox.spec import StepOutcome, StepSpec
from tests.support.world import World

#: the engine's "now" in every in-process run (far from the real wall clock)
FIXED_NOW = dt.datetime(2031, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
#: FIXED_NOW as the engine writes timestamps
STAMP = "2031-03-01T12:00:00.000000Z"
#: a uid range for fake leases; never used by a real process here
FAKE_UID = 4_100_000


def stamp(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def expires_in(hours: float, now: dt.datetime = FIXED_NOW) -> str:
    """A plan's `expires`, relative to the fixed clock."""
    return stamp(now + dt.timedelta(hours=hours))


def fixed_clock(now: dt.datetime = FIXED_NOW) -> Callable[[], dt.datetime]:
    return lambda: now


# -- the step runner -------------------------------------------------------------


@dataclasses.dataclass
class Scripted:
    """How one step's run ends, as the runner reports it.

    `products` are written into the step's workspace through its descriptor
    (None: one file `<step id>.txt`); `report` is the step's cost report
    (a dict is encoded as JSON, bytes are written as they are). `during`
    runs while the step "runs", before it ends or raises.
    """

    exit_code: int | None = 0
    signal: int | None = None
    timed_out: bool = False
    violation: str | None = None
    cpu_seconds: float = 0.5
    wall_seconds: float = 1.0
    max_rss_bytes: int = 1 << 20
    products: Mapping[str, bytes] | None = None
    report: Mapping[str, Any] | bytes | None = None
    raises: HaiosError | None = None
    during: Callable[[StepSpec], object] | None = None


def product_of(step_id: str) -> bytes:
    """What the default script writes into `<step id>.txt`."""
    return f"made by {step_id}\n".encode()


class ScriptedRunner:
    """A `StepRunner` that ends each step as scripted; thread-safe."""

    def __init__(self, script: Mapping[str, Scripted] | None = None) -> None:
        self.script = dict(script or {})
        self.calls: list[str] = []
        self.specs: dict[str, StepSpec] = {}
        #: the workspace as each step found it: name -> bytes
        self.materials: dict[str, dict[str, bytes]] = {}
        self.running = 0
        self.max_running = 0
        self.closed = False
        self._lock = threading.Lock()

    def run(self, spec: StepSpec, *, on_start: Callable[[int], None] | None = None
            ) -> StepOutcome:
        with self._lock:
            self.calls.append(spec.step_id)
            self.specs[spec.step_id] = spec
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            work = spec.mounts.workspace.dir
            self.materials[spec.step_id] = {
                name: work.read_bytes(name, max_bytes=1 << 20) for name in sorted(work.names())}
            item = self.script.get(spec.step_id, Scripted())
            if item.during is not None:
                item.during(spec)
            if item.raises is not None:
                raise item.raises
            products = ({f"{spec.step_id}.txt": product_of(spec.step_id)}
                        if item.products is None else item.products)
            for name, data in products.items():
                work.write_atomic(name, data)
            if item.report is not None:
                data = (item.report if isinstance(item.report, bytes)
                        else json.dumps(item.report).encode())
                spec.mounts.cost.dir.write_atomic("report.json", data)
            return StepOutcome(exit_code=item.exit_code, signal=item.signal,
                               timed_out=item.timed_out, violation=item.violation,
                               cpu_seconds=item.cpu_seconds, wall_seconds=item.wall_seconds,
                               max_rss_bytes=item.max_rss_bytes)
        finally:
            with self._lock:
                self.running -= 1

    def close(self) -> None:
        self.closed = True


# -- the guard -------------------------------------------------------------------


class ScriptedGuard:
    """A `StepGuard` with scripted kills, refusals and a settable run failure."""

    def __init__(self, *, killed: Mapping[str, str] | None = None,
                 refuse: Mapping[str, HaiosError] | None = None,
                 broken: HaiosError | None = None,
                 issue: Mapping[str, str] | None = None,
                 unrevoked: frozenset[str] = frozenset()) -> None:
        self.killed = dict(killed or {})
        #: step id -> the token accessor `before` issues for it
        self.issue = dict(issue or {})
        #: step id -> its token_accessors in state.json right after the accessor was recorded
        self.durable: dict[str, list[str]] = {}
        #: accessors whose revocation "failed" (kept in state for a retry)
        self.outstanding = unrevoked
        self.refuse = dict(refuse or {})
        #: what `failure()` reports; tests may set it while a step runs
        self.broken = broken
        self.calls: list[tuple[str, str]] = []
        self.request: GuardRequest | None = None
        self.closed = False
        self._lock = threading.Lock()

    def _note(self, what: str, step_id: str) -> None:
        with self._lock:
            self.calls.append((what, step_id))

    def before(self, step: PlanStep, uid: int, gid: int, secret_fd: int | None) -> StepGrant:
        self._note("before", step.id)
        if step.id in self.refuse:
            raise self.refuse[step.id]
        accessor = self.issue.get(step.id)
        if accessor is None:
            return StepGrant()
        request = self.request
        assert request is not None and request.record_accessor is not None
        request.record_accessor(step.id, accessor)
        state = json.loads((request.osr.path / "state.json").read_text())
        self.durable[step.id] = state["steps"][step.id]["token_accessors"]
        return StepGrant(accessor=accessor)

    def after(self, step: PlanStep, grant: StepGrant) -> None:
        self._note("after", step.id)

    def was_killed(self, step_id: str) -> str | None:
        self._note("was_killed", step_id)
        return self.killed.get(step_id)

    def failure(self) -> HaiosError | None:
        return self.broken

    def unrevoked(self) -> frozenset[str]:
        return self.outstanding

    def close(self) -> None:
        self.closed = True

    def steps(self, what: str) -> list[str]:
        return [step_id for kind, step_id in self.calls if kind == what]


# -- uids, preflight ---------------------------------------------------------------


class FakeLease:
    def __init__(self, source: FakeUids, uid: int) -> None:
        self._source, self._uid = source, uid

    @property
    def uid(self) -> int:
        return self._uid

    def release(self) -> None:
        self._source.released(self._uid)


class FakeUids:
    """A `UidSource` handing out distinct uids, or refusing like a full pool."""

    def __init__(self, *, exhausted: bool = False) -> None:
        self.exhausted = exhausted
        self.held: set[int] = set()
        self.leased: list[int] = []
        self.returned: list[int] = []
        self._lock = threading.Lock()

    def lease(self, timeout_seconds: float) -> FakeLease:
        if self.exhausted:
            raise SandboxSetupError("no free step uid in the pool")
        with self._lock:
            uid = next(u for u in range(FAKE_UID, FAKE_UID + 1000) if u not in self.held)
            self.held.add(uid)
            self.leased.append(uid)
        return FakeLease(self, uid)

    def released(self, uid: int) -> None:
        with self._lock:
            self.held.discard(uid)
            self.returned.append(uid)


class Preflight:
    """The environment check: passes, or refuses with `refusal`; records its calls."""

    def __init__(self, refusal: HaiosError | None = None) -> None:
        self.refusal = refusal
        self.plans: list[str] = []

    def __call__(self, policy: Policy, plan: ExecPlan) -> None:
        self.plans.append(plan.plan_id)
        if self.refusal is not None:
            raise self.refusal


# -- one run and its traces --------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one in-process `run_plan` did."""

    root: Path
    outcome: RunOutcome | None
    error: HaiosError | None
    events: list[ev.Event]
    runner: ScriptedRunner
    guard: ScriptedGuard
    uids: FakeUids
    preflight: Preflight
    runner_made: bool
    finished: bool
    #: audit records that existed before this run (an earlier run's)
    audit_before: int = 0

    @property
    def code(self) -> int:
        if self.outcome is not None:
            return self.outcome.exit_code
        assert self.error is not None
        return self.error.exit_code

    @property
    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.root / "state.json").read_text())
        return state

    def statuses(self) -> dict[str, str]:
        return {k: v["status"] for k, v in self.state["steps"].items()}

    @property
    def chain(self) -> list[dict[str, Any]]:
        """Every record of the audit log, earlier runs' included."""
        return audit_records(self.root)

    @property
    def audit(self) -> list[dict[str, Any]]:
        """The audit records this run appended."""
        return self.chain[self.audit_before:]

    def audited(self, kind: str) -> list[dict[str, Any]]:
        return [record["fields"] for record in self.audit if record["kind"] == kind]

    def published(self, kind: str) -> list[dict[str, Any]]:
        return [e.fields() for e in self.events if kind == e.KIND]

    def kinds(self) -> list[str]:
        return [e.KIND for e in self.events]


def audit_records(root: Path) -> list[dict[str, Any]]:
    path = root / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


class EngineRig:
    """A world (keys, policy folder) whose runs go through `run_plan` in-process."""

    def __init__(self, base: Path, *, extra_kill_paths: list[str] | None = None) -> None:
        self.base = base
        self.world = World(base / "world", extra_kill_paths=extra_kill_paths)
        self.state_dir = base / "state"
        self.extra_kill_paths = extra_kill_paths or []
        self.policy = self.configure()

    def configure(self, extra: str = "") -> Policy:
        """Rewrite the policy folder (with `extra` TOML appended) and load it.

        The run area goes under the test's own state_dir, never the host's.
        """
        world = self.world
        world.write_policy(world.policy, extra_kill_paths=self.extra_kill_paths, extra=extra)
        path = world.policy / "policy.toml"
        lines = path.read_text().splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if line.startswith("public_key = "))
        lines.insert(at + 1, f'state_dir = "{self.state_dir}"\n')
        path.write_text("".join(lines))
        self.policy = load_policy(world.policy)
        return self.policy

    def root(self, document: dict[str, Any], inputs: dict[str, bytes] | None = None, *,
             name: str = "os_root") -> Path:
        return self.world.os_root(document, inputs, name=name)

    def run(self, root: Path, *, jobs: int = 1, runner: ScriptedRunner | None = None,
            guard: ScriptedGuard | None = None, preflight: Preflight | None = None,
            uids: FakeUids | None = None, real_uid_pool: bool = False,
            clock: Callable[[], dt.datetime] | None = None,
            subscribers: list[ev.Subscriber] | None = None) -> Run:
        runner = runner or ScriptedRunner()
        guard = guard or ScriptedGuard()
        preflight = preflight or Preflight()
        uids = uids or FakeUids()
        events: list[ev.Event] = []
        made = {"runner": False, "finished": False}

        def make_runner(policy: Policy) -> ScriptedRunner:
            made["runner"] = True
            return runner

        def make_guard(request: GuardRequest) -> ScriptedGuard:
            guard.request = request
            return guard

        def finish(root_dir: SafeDir) -> None:
            made["finished"] = True

        services = Services(
            runner_factory=make_runner, guard_factory=make_guard, preflight=preflight,
            subscribers=[events.append, *(subscribers or [])],
            uid_source=None if real_uid_pool else (lambda policy, lease_dir: uids),
            finish=finish, clock=clock or fixed_clock())
        audit_before = len(audit_records(root))
        outcome: RunOutcome | None = None
        error: HaiosError | None = None
        try:
            outcome = run_plan(root, self.policy, jobs=jobs, services=services,
                               bus=ev.EventBus())
        except HaiosError as exc:
            error = exc
        return Run(root, outcome, error, events, runner, guard, uids, preflight,
                   made["runner"], made["finished"], audit_before)
