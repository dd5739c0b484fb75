# SPDX-License-Identifier: Apache-2.0
"""What os_root already holds: prior state, engine outputs, the audit chain.

Decides whether a run is fresh, a resume, or a replay (contract sections
6 and 12): a different plan over existing history is refused, engine
outputs must verify against the engine key and agree with the state, and a
fresh os_root must hold no engine output at all. Also records rejections:
in a signed `rejected` state when there is no history to protect, in the
audit log always. Does I/O on os_root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from haios import events as ev
from haios._util.clock import wall_clock
from haios._util.durability import Barrier
from haios._util.safedir import SafeDir
from haios._util.strict_json import StrictJSONError, parse_strict_json, printable
from haios.errors import HaiosError, PathError, ReplayError, TamperedError
from haios.intake import StoredArtefact, copy_into
from haios.load.keys import TrustedRole
from haios.load.policy import Policy
from haios.models.common import ID_PATTERN, format_rfc3339
from haios.models.plan import ExecPlan
from haios.models.state import STATE_SCHEMA, RegistryMap, RunState
from haios.osroot import (
    AUDIT_FILE,
    ENGINE_DIRS,
    METRICS_FILE,
    REGISTRY_FILE,
    STATE_FILE,
    OsRoot,
)
from haios.signing import EngineSigner
from haios.state.store import read_signed, write_signed
from haios.state.verify import verify_cost_record
from haios.verify.dsse import verify_detached
from haios.verify.links import verify_link

if TYPE_CHECKING:
    from haios.area import RunArea


class History:
    """The prior state of one os_root and its audit log."""

    def __init__(self, osr: OsRoot, area: RunArea, policy: Policy, bus: ev.EventBus,
                 prior: RunState | None, error: HaiosError | None, audit: Any,
                 clock: Callable[[], dt.datetime] = wall_clock) -> None:
        self.osr, self.area, self.policy, self.bus = osr, area, policy, bus
        self.state, self.error, self.audit = prior, error, audit
        self.clock = clock

    @classmethod
    def open(cls, osr: OsRoot, area: RunArea, policy: Policy, bus: ev.EventBus,
             clock: Callable[[], dt.datetime] = wall_clock) -> History:
        """Read state.json and open the audit log; errors surface in `prior_for`.

        An audit log without a signed state is tampering (exit 3), unless the
        run area records that the engine itself created it and crashed before
        its first state: then the log, which nothing signed, is set aside into
        the run area and a new chain starts with a record saying so.
        """
        from haios.audit import AuditHead, AuditLog

        prior: RunState | None = None
        error: HaiosError | None = None
        audit = None
        leftover: tuple[int, str] | None = None
        preexisting = osr.root.lstat(AUDIT_FILE)
        try:
            prior = read_signed(osr.root, STATE_FILE, RunState, policy.engine_key)
            if prior is not None:
                area.clear_unsigned_audit()
            elif preexisting is not None and area.has_unsigned_audit():
                leftover = _set_aside(osr, area)
                preexisting = None
            if prior is None and preexisting is None:
                area.mark_unsigned_audit()  # before the log exists: a crash leaves it ours
            signed = None if prior is None or prior.audit is None else AuditHead(
                prior.audit.sha256, prior.audit.records)
            audit = AuditLog.open(osr.root.fd, AUDIT_FILE, signed_head=signed, clock=clock)
        except HaiosError as exc:
            error = exc if exc.exit_code == 3 else TamperedError(str(exc))
        if prior is None and preexisting is not None and error is None:
            error = PathError(f"{AUDIT_FILE} exists on an os_root without state")
        if audit is not None:
            bus.subscribe(audit.subscriber)
            if leftover is not None:
                bus.publish(ev.AuditLeftover(records=leftover[0], sha256=leftover[1]))
        return cls(osr, area, policy, bus, prior, error, audit, clock)

    def defer_audit(self, barrier: Barrier) -> None:
        """Batch the audit log's fsyncs into `barrier` (flushed by the engine)."""
        if self.audit is not None:
            self.audit.defer_to(barrier)

    def sync(self) -> None:
        """Make every audit record so far durable."""
        if self.audit is not None:
            self.audit.sync()

    def state_written(self) -> None:
        """A signed state now pins the audit head: the log is no longer a leftover."""
        self.area.clear_unsigned_audit()

    def head(self) -> dict[str, Any] | None:
        """The audit chain head to pin inside the next signed state."""
        if self.audit is None:
            return None
        head = self.audit.head
        return {"sha256": head.sha256, "records": head.count}

    def has_history(self) -> bool:
        """True when the state records any step that ever started."""
        return self.state is not None and (
            self.state.status != "rejected"
            or any(step.attempts > 0 for step in self.state.steps.values()))

    def prior_for(self, plan_sha256: str) -> RunState | None:
        """The state to resume from, or None for a fresh run.

        Raises:
            TamperedError: state.json or the audit chain does not verify.
            ReplayError: os_root holds another plan's history.
        """
        if self.error is not None:
            raise self.error
        if not self.has_history():
            return None
        if self.state is None:
            return None
        if self.state.plan_sha256 != plan_sha256:
            raise ReplayError("os_root holds state of another plan (digest "
                              f"{self.state.plan_sha256[:12]}); refusing replay or rollback")
        return self.state

    def record_rejection(self, exc: HaiosError, raw: bytes | None,
                         signer: EngineSigner | None) -> None:
        """Audit the rejection; write a signed `rejected` state if no history exists.

        The message is escaped first: it may quote hostile input, and the
        state's `reason` refuses a NUL (a crash here would lose the record).
        """
        message = printable(str(exc))
        self.bus.publish(ev.Rejection(reason=exc.reason, message=message))
        self.sync()  # the refusal is on record before anything else happens
        if signer is None or self.error is not None or self.has_history():
            return
        plan_id, steps = _plan_outline(raw)
        state = RunState.model_validate({
            "schema": STATE_SCHEMA,
            "plan_id": plan_id,
            "plan_sha256": hashlib.sha256(raw or b"").hexdigest(),
            "status": "rejected",
            "reason": message[:4000],
            "steps": {step_id: {} for step_id in steps},
            "updated": format_rfc3339(self.clock()),
            "seq": (self.state.seq if self.state else 0) + 1,
            "audit": self.head(),
        })
        with contextlib.suppress(HaiosError, OSError):
            write_signed(self.osr.root, STATE_FILE, state, signer)
            self.state_written()


#: an engine-created log before its first state holds only verification records
LEFTOVER_MAX_BYTES = 16 << 20


def _set_aside(osr: OsRoot, area: RunArea) -> tuple[int, str]:
    """Move the engine's own unsignable leftover log into the run area.

    Returns:
        (records, sha256) of what was set aside, for the new chain's first record.

    Raises:
        TamperedError: the leftover is larger than any engine-made log could be.
    """
    try:
        data = osr.root.read_bytes(AUDIT_FILE, max_bytes=LEFTOVER_MAX_BYTES)
    except HaiosError as exc:
        raise TamperedError(f"{AUDIT_FILE} left without state cannot be set aside: "
                            f"{exc}") from exc
    area.set_aside(data)
    osr.root.unlink(AUDIT_FILE)
    os.fsync(osr.root.fd)
    return data.count(b"\n"), hashlib.sha256(data).hexdigest()


def _plan_outline(raw: bytes | None) -> tuple[str, list[str]]:
    """plan_id and step ids of a rejected plan, when they are well formed."""
    import re

    pattern = re.compile(ID_PATTERN.replace("$", r"\Z"))
    try:
        document = parse_strict_json(raw or b"")
    except StrictJSONError:
        return "unknown", []
    if not isinstance(document, dict):
        return "unknown", []
    plan_id = document.get("plan_id")
    steps = document.get("steps")
    ids: list[str] = []
    if isinstance(steps, list):
        for step in steps:
            step_id = step.get("id") if isinstance(step, dict) else None
            if isinstance(step_id, str) and pattern.match(step_id) and step_id not in ids:
                ids.append(step_id)
    valid_id = isinstance(plan_id, str) and pattern.match(plan_id)
    return (plan_id if valid_id else "unknown"), ids  # type: ignore[return-value]


def _engine_links(osr: OsRoot, plan: ExecPlan, keyid: str) -> list[str]:
    links = osr.optional_sub("links")
    if links is None:
        return []
    wanted = {f"{step.id}.{keyid[:8]}.link" for step in plan.steps}
    return [name for name in links.names() if name in wanted]


def check_engine_paths(osr: OsRoot, plan: ExecPlan, engine_keyid: str) -> None:
    """Every entry at an engine-owned path must be a plain, singly-linked file.

    Checked before anything runs, on fresh and resumed runs alike, so a
    planted symlink, FIFO, device, directory or hardlink is refused up front
    (contract section 12) instead of being met while a step's outputs are
    published.

    Raises:
        PathError: the first unexpected entry.
    """
    for name in (STATE_FILE, REGISTRY_FILE, AUDIT_FILE, METRICS_FILE):
        osr.root.check_replaceable(name)
    for name in ENGINE_DIRS:
        sub = osr.optional_sub(name)
        if sub is None:
            continue
        for entry in sub.names():
            sub.check_replaceable(entry)
    links = osr.optional_sub("links")
    if links is not None:
        for entry in _engine_links(osr, plan, engine_keyid):
            links.check_replaceable(entry)


def check_fresh_outputs(osr: OsRoot, plan: ExecPlan, engine_keyid: str,
                        *, state_allowed: bool) -> None:
    """On a fresh os_root, engine-owned paths must be empty (contract section 12).

    Raises:
        PathError: an engine-owned file or directory entry is already there.
    """
    for name in ENGINE_DIRS:
        sub = osr.optional_sub(name)
        if sub is not None and sub.names():
            raise PathError(f"{name}/ is not empty on a fresh os_root")
    # audit.jsonl is checked when the log is opened; a prior rejected state
    # (no step ever started) is the one engine file a fresh run may find.
    singles = [REGISTRY_FILE] + ([] if state_allowed else [STATE_FILE, METRICS_FILE])
    for name in singles:
        if osr.root.lstat(name) is not None:
            raise PathError(f"{name} exists on a fresh os_root")
    planted = _engine_links(osr, plan, engine_keyid)
    if planted:
        raise PathError(f"links/{planted[0]} exists on a fresh os_root")


def verify_outputs(osr: OsRoot, policy: Policy, plan: ExecPlan, prior: RunState,
                   store: SafeDir) -> dict[str, StoredArtefact]:
    """On resume, every engine output must verify and agree with the state.

    Products of succeeded steps are copied into the private store (and the
    copies hashed), so later steps use exactly the bytes that verified.

    Raises:
        TamperedError: anything missing, altered, or not signed by the engine.
    """
    engine = policy.engine_role
    depth = policy.file.limits.json_max_depth
    known: dict[str, StoredArtefact] = {}
    osr.root.check_replaceable(METRICS_FILE)  # never write metrics through a planted link
    try:
        registry = read_signed(osr.root, REGISTRY_FILE, RegistryMap, policy.engine_key)
        artefacts = osr.optional_sub("artefacts")
        for step in plan.steps:
            entry = prior.steps.get(step.id)
            if entry is None or entry.status != "succeeded":
                continue
            if artefacts is None or set(entry.products) != set(step.products):
                raise TamperedError(f"step {step.id}: recorded products disagree with the plan")
            for name, recorded in entry.products.items():
                digest, size = copy_into(artefacts, name, store,
                                         max_bytes=policy.file.limits.product_max_bytes)
                if digest != recorded:
                    raise TamperedError(f"artefacts/{name}: differs from the recorded digest")
                sig = artefacts.read_bytes(f"{name}.sig",
                                           max_bytes=policy.file.limits.sig_max_bytes)
                verify_detached(sig, engine, name=name, sha256=digest, max_depth=depth)
                known[name] = StoredArtefact(name, digest, size, f"step:{step.id}",
                                             (policy.engine_key.keyid,))
            _verify_engine_link(osr, step.id, policy, engine, entry.products)
            verify_cost_record(osr.sub("cost"), step.id, policy)
        if registry is not None and registry.plan_id != plan.plan_id:
            raise TamperedError("registry_map.json belongs to another plan")
    except TamperedError:
        raise
    except HaiosError as exc:
        raise TamperedError(f"engine output does not verify: {exc}") from exc
    return known


def _verify_engine_link(osr: OsRoot, step_id: str, policy: Policy, engine: TrustedRole,
                        products: dict[str, str]) -> None:
    links = osr.sub("links")
    name = f"{step_id}.{policy.engine_key.keyid[:8]}.link"
    data = links.read_bytes(name, max_bytes=policy.file.limits.link_max_bytes)
    recorded = verify_link(data, engine, label=f"links/{name}",
                           max_depth=policy.file.limits.json_max_depth)
    if recorded != products:
        raise TamperedError(f"links/{name}: not the engine's link for the recorded products")
