# SPDX-License-Identifier: Apache-2.0
"""Re-verify an os_root offline and collect the findings into a `Report`.

`build_report` reads os_root as hostile input (`checks.Reader`) and checks,
in this order, each result recorded as a `Check`:

1. the plan: planner signature and threshold (securesystemslib DSSE), schema;
2. state.json and registry_map.json: embedded engine signatures (rfc8785);
3. audit.jsonl: the whole hash chain (`chain.walk_chain`) and the head
   signed inside state.json;
4. every plan input: digest against the plan, functionary `.sig`, and a
   functionary-signed in-toto link listing it with that digest;
5. every step (`steps.StepCollector`): products and their engine `.sig`,
   the engine link (in-toto library), cost records;
6. the engine links as a whole under a generated layout (`layout`);
7. agreement between plan, state, registry and audit log.

Nothing here decides trust from os_root: keys come from the policy only
(`trust.Trust`). Does I/O: reads os_root.
"""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from haios._util.safedir import SafeDir
from haios._util.strict_json import printable
from haios.decide.dag import topological_order
from haios.errors import DigestError, HaiosError, InputError, PathError, SchemaError
from haios.load.parse import describe_validation_error, parse_model
from haios.models.common import format_rfc3339
from haios.models.plan import ExecPlan, PlanInput
from haios.models.state import RegistryMap, RunState
from haios.report.chain import ChainWalk, check_signed_head, walk_chain
from haios.report.checks import CheckList, Reader
from haios.report.evidence import attempts_by_step, kill_events, vault_tokens
from haios.report.layout import verify_with_layout
from haios.report.model import (
    REPORT_SCHEMA,
    AuditEntry,
    AuditInfo,
    BudgetLine,
    PlanInfo,
    PlanStepInfo,
    PolicyInfo,
    Report,
    RoleInfo,
    StateInfo,
    Summary,
)
from haios.report.steps import StepCollector
from haios.report.trust import Trust
from haios.report.verify import (
    SignedFile,
    link_digests,
    link_signers,
    load_link,
    parse_json_object,
    sha256_hex,
    verify_detached,
    verify_embedded,
)

PLAN_FILE: Final = "exec_plan.json"
STATE_FILE: Final = "state.json"
REGISTRY_FILE: Final = "registry_map.json"
AUDIT_FILE: Final = "audit.jsonl"
STATE_MAX_BYTES: Final = 16 << 20
AUDIT_MAX_BYTES: Final = 64 << 20
#: plan statuses after which the engine has written its registry map
_RUN_ENDED: Final = frozenset({"succeeded", "failed", "killed", "budget_exhausted"})
_UNITS: Final = ("cpu_seconds", "wall_seconds", "usd", "tokens")


def build_report(os_root: Path, trust: Trust, *, now: dt.datetime) -> Report:
    """Verify everything in `os_root` against `trust`; return the findings.

    Args:
        os_root: the directory to audit (never written).
        trust: the operator's public policy.
        now: when the report is made (read once by the caller).

    Returns:
        The report; its `verdict` is `verified` when no check failed.

    Side Effects:
        Reads os_root; writes and removes a temporary directory (layout check).
    """
    checks = CheckList()
    collector = _Collector(os_root, trust, checks)
    try:
        collector.collect()
    finally:
        collector.close()
    return collector.report(now)


class _Collector:
    """One report's reading and checking, in `collect`'s order."""

    def __init__(self, os_root: Path, trust: Trust, checks: CheckList) -> None:
        """Nothing read yet; `collect` fills the fields."""
        self.path, self.trust, self.checks = os_root, trust, checks
        self.depth = trust.limits.json_max_depth
        self.reader: Reader | None = None
        self.plan: ExecPlan | None = None
        self.plan_sha256: str | None = None
        self.state: RunState | None = None
        self.state_verified = False
        self.registry: RegistryMap | None = None
        self.walk: ChainWalk | None = None
        self.signed_records: int | None = None
        #: input name -> key ids whose functionary `.sig` verified
        self.input_signers: dict[str, list[str]] = {}
        #: input name -> functionary link files that vouch for it
        self.input_links: dict[str, list[str]] = {}
        self.steps: StepCollector | None = None

    def close(self) -> None:
        """Release os_root descriptors."""
        if self.reader is not None:
            self.reader.close()

    # -- the checklist -------------------------------------------------------

    def collect(self) -> None:
        """Run every check (see the module docstring for the order)."""
        # (0) os_root itself: a real directory, opened without following a link.
        self.reader = self._open_root()
        if self.reader is None:
            return
        # (1) the plan, then (2) the engine's signed state and registry map.
        self._plan()
        self._state()
        self._registry()
        # (3) the audit chain and the head state.json signs.
        self._audit()
        # (4) inputs three ways, (5) each step's evidence, (6) the layout.
        self._inputs()
        self.steps = StepCollector(self.reader, self.trust, self.checks, self.plan, self.state,
                                   self.walk.records if self.walk else [],
                                   self.input_signers, self.input_links)
        self.steps.collect()
        self._layout()
        # (7) plan, state, registry and audit log must tell the same story.
        self._consistency()

    def _open_root(self) -> Reader | None:
        """Open os_root without following a link; None (and a failed check) otherwise."""
        try:
            info = self.path.lstat()
        except OSError as exc:
            self.checks.add("os_root", "os_root", str(self.path), "fail",
                            f"cannot be read ({exc.strerror})")
            return None
        if not stat.S_ISDIR(info.st_mode):
            self.checks.add("os_root", "os_root", str(self.path), "fail",
                            "not a directory (a symlink or a file)")
            return None
        try:
            root = SafeDir.open(self.path, label="os_root")
        except PathError as exc:
            self.checks.add("os_root", "os_root", str(self.path), "fail", str(exc))
            return None
        self.checks.add("os_root", "os_root", str(self.path), "ok",
                        "a directory, opened without following links")
        return Reader(root)

    def _plan(self) -> None:
        """Read the plan, verify its planner signature, parse it."""
        reader = self._reader()
        limits = self.trust.limits
        raw = self.checks.run("plan", "plan.file", PLAN_FILE,
                              lambda: reader.read("", PLAN_FILE, max_bytes=limits.plan_max_bytes),
                              lambda data: f"{len(data)} bytes, SHA-256 {sha256_hex(data)}")
        if raw is None:
            return
        self.plan_sha256 = sha256_hex(raw)
        planner = self.trust.planner

        def signature() -> SignedFile:
            """Verify the detached signature of the file."""
            sig = reader.read("", f"{PLAN_FILE}.sig", max_bytes=limits.sig_max_bytes)
            return verify_detached(sig, planner.keys, planner.threshold, name=PLAN_FILE,
                                   data_sha256=sha256_hex(raw), label=f"{PLAN_FILE}.sig",
                                   max_depth=self.depth)

        self.checks.run("plan", "plan.signature", f"{PLAN_FILE}.sig", signature,
                        lambda signed: f"{len(signed.signers)} of threshold "
                                       f"{planner.threshold} planner keys signed: "
                                       f"{', '.join(k[:12] for k in signed.signers)}")
        self.plan = self.checks.run(
            "plan", "plan.schema", PLAN_FILE,
            lambda: parse_model(ExecPlan, raw, label=PLAN_FILE, max_depth=self.depth),
            lambda plan: f"plan {plan.plan_id}: {len(plan.steps)} steps, "
                         f"{len(plan.inputs)} inputs, expires {plan.expires}")
        if self.plan is not None:
            self._plan_policy(self.plan)

    def _plan_policy(self, plan: ExecPlan) -> None:
        """Warn when the plan names profiles or scopes the policy lacks now."""
        unknown = sorted({s.profile for s in plan.steps if s.profile not in self.trust.profiles}
                         | {f"vault scope {s.vault_scope}" for s in plan.steps
                            if s.vault_scope is not None
                            and s.vault_scope not in self.trust.vault_scopes})
        if unknown:
            self.checks.add("plan", "plan.policy", PLAN_FILE, "warn",
                            "names what the policy does not define (changed since the run?): "
                            + ", ".join(unknown))
        else:
            self.checks.add("plan", "plan.policy", PLAN_FILE, "ok",
                            "every profile and Vault scope the plan names is in the policy")

    def _signed_document(self, name: str, category: Any) -> dict[str, Any] | None:
        """Read a JSON document and verify its embedded engine signature."""
        reader = self._reader()

        def read() -> dict[str, Any]:
            """Read, strictly parse and verify the document."""
            data = reader.read("", name, max_bytes=STATE_MAX_BYTES)
            document = parse_json_object(data, label=name, max_depth=self.depth)
            verify_embedded(document, self.trust.engine_key, label=name)
            return document

        return self.checks.run(category, f"{category}.signature", name, read,
                               lambda _doc: "embedded engine signature verifies over its "
                                            "RFC 8785 canonical JSON")

    def _state(self) -> None:
        """Read and verify state.json; compare its plan digest."""
        if not self._reader().exists("", STATE_FILE):
            self.checks.add("state", "state.signature", STATE_FILE, "fail",
                            "missing: no signed record of a run")
            return
        document = self._signed_document(STATE_FILE, "state")
        self.state_verified = document is not None
        if document is None:
            document = self._unverified(STATE_FILE)
            if document is None:
                return
        self.state = _validate(self.checks, "state", RunState, document, STATE_FILE)
        if self.state is None:
            return
        state = self.state
        if self.plan_sha256 is not None:
            same = state.plan_sha256 == self.plan_sha256
            self.checks.add("consistency", "state.plan", STATE_FILE, "ok" if same else "fail",
                            "records the SHA-256 of exec_plan.json" if same else
                            "records another plan digest than exec_plan.json's "
                            f"({state.plan_sha256[:12]} vs {self.plan_sha256[:12]})")
        if state.status in ("running", "pending"):
            self.checks.add("state", "state.status", STATE_FILE, "warn",
                            f"plan status {state.status}: the engine stopped before the run "
                            "ended (a crash) or is still running")

    def _unverified(self, name: str) -> dict[str, Any] | None:
        """The document as read, for display only, when its signature failed."""
        try:
            data = self._reader().read("", name, max_bytes=STATE_MAX_BYTES)
            return parse_json_object(data, label=name, max_depth=self.depth)
        except HaiosError:
            return None

    def _registry(self) -> None:
        """Read and verify registry_map.json (absent only when the run did not end)."""
        if not self._reader().exists("", REGISTRY_FILE):
            ended = self.state is not None and self.state.status in _RUN_ENDED
            self.checks.add("registry", "registry.signature", REGISTRY_FILE,
                            "fail" if ended else "skipped",
                            "missing although the run ended" if ended else
                            "not written: the run did not reach its end")
            return
        document = self._signed_document(REGISTRY_FILE, "registry")
        if document is not None:
            self.registry = _validate(self.checks, "registry", RegistryMap, document,
                                      REGISTRY_FILE)

    def _audit(self) -> None:
        """Walk the audit chain and check the head state.json signs."""
        reader = self._reader()
        signed = (self.state.audit if self.state is not None and self.state_verified
                  else None)
        if not reader.exists("", AUDIT_FILE):
            expected = signed is not None and signed.records > 0
            self.checks.add("audit", "audit.chain", AUDIT_FILE, "fail" if expected else
                            "skipped", "missing although state.json signs records" if expected
                            else "no audit log")
            return
        data = self.checks.run("audit", "audit.file", AUDIT_FILE,
                               lambda: reader.read("", AUDIT_FILE, max_bytes=AUDIT_MAX_BYTES),
                               lambda raw: f"{len(raw)} bytes")
        if data is None:
            return
        walk = self.walk = walk_chain(data)
        count = len(walk.records)
        if walk.error is None:
            self.checks.add("audit", "audit.chain", AUDIT_FILE, "ok",
                            f"{count} records chain from genesis to {walk.head_sha256[:16]}")
        else:
            self.checks.add("audit", "audit.chain", AUDIT_FILE, "fail", walk.error)
        if walk.torn_tail_bytes and walk.error is None:
            self.checks.add("audit", "audit.torn_tail", AUDIT_FILE, "warn",
                            f"{walk.torn_tail_bytes} bytes after the last record: an append "
                            "interrupted by a crash (unsigned data)")
        if signed is None:
            self.checks.add("audit", "audit.head", STATE_FILE, "skipped",
                            "no verified state.json signs an audit head")
            return
        problem = check_signed_head(walk, signed.sha256, signed.records)
        if problem is not None:
            self.checks.add("audit", "audit.head", AUDIT_FILE, "fail", problem)
            return
        self.signed_records = signed.records
        self.checks.add("audit", "audit.head", AUDIT_FILE, "ok",
                        f"record {signed.records} matches the head signed in state.json")
        if count > signed.records:
            self.checks.add("audit", "audit.unsigned", AUDIT_FILE, "warn",
                            f"records {signed.records + 1}..{count} come after the signed head: "
                            "unauthenticated (anyone able to write os_root could add them)")

    def _inputs(self) -> None:
        """Check every plan input three ways."""
        if self.plan is None:
            return
        vouching = self._functionary_links()
        for item in self.plan.inputs:
            self._input(item, vouching)

    def _input(self, item: PlanInput, vouching: dict[str, dict[str, str]]) -> None:
        """Check one input: digest, functionary `.sig`, a functionary link."""
        reader = self._reader()
        limits = self.trust.limits
        functionary = self.trust.functionary
        name = item.name

        def digest() -> int:
            """Hash the input as read; raise DigestError when it differs from the pin."""
            found, size = reader.digest("inbox", name, max_bytes=limits.product_max_bytes)
            if found != item.sha256:
                raise DigestError(f"inbox/{name}: SHA-256 differs from the digest the plan pins")
            return size

        def signature() -> SignedFile:
            """Verify the detached signature of the file."""
            sig = reader.read("inbox", f"{name}.sig", max_bytes=limits.sig_max_bytes)
            return verify_detached(sig, functionary.keys, functionary.threshold, name=name,
                                   data_sha256=item.sha256, label=f"inbox/{name}.sig",
                                   max_depth=self.depth)

        self.checks.run("input", f"input.digest:{name}", f"inbox/{name}", digest,
                        lambda size: f"{size} bytes; SHA-256 equals the plan's pin")
        signed = self.checks.run(
            "input", f"input.signature:{name}", f"inbox/{name}.sig", signature,
            lambda s: f"{len(s.signers)} of threshold {functionary.threshold} functionary "
                      "keys signed the plan's digest")
        if signed is not None:
            self.input_signers[name] = list(signed.signers)
        links = sorted(printable(f) for f, products in vouching.items()
                       if products.get(name) == item.sha256)
        self.input_links[name] = links
        self.checks.add("input", f"input.link:{name}", "links/", "ok" if links else "fail",
                        f"vouched for by {', '.join(links)}" if links else
                        "no functionary-signed in-toto link lists it with the plan's digest")

    def _functionary_links(self) -> dict[str, dict[str, str]]:
        """Link file -> products, for each link a functionary key signed."""
        reader = self._reader()
        try:
            links = reader.sub("links")
        except PathError as exc:
            self.checks.add("link", "links", "links/", "fail", str(exc))
            return {}
        if links is None:
            return {}
        suffix = f".{self.trust.engine_key.keyid[:8]}.link"
        names = [n for n in links.names() if n.endswith(".link") and not n.endswith(suffix)]
        limits = self.trust.limits
        if len(names) > limits.links_max_files:
            self.checks.add("link", "links", "links/", "fail",
                            f"more than {limits.links_max_files} link files")
            return {}
        vouching: dict[str, dict[str, str]] = {}
        for name in names:
            label = f"links/{name}"
            try:
                data = reader.read("links", name, max_bytes=limits.link_max_bytes)
                metadata = load_link(data, label=label, max_depth=self.depth)
            except HaiosError as exc:
                self.checks.add("link", f"link.functionary:{name}", label, "fail", str(exc))
                continue
            signers = link_signers(metadata, self.trust.functionary.keys)
            if not signers:
                self.checks.add("link", f"link.functionary:{name}", label, "warn",
                                "not signed by a functionary key: vouches for nothing")
                continue
            products = link_digests(metadata.get_payload().products)
            vouching[label] = products
            self.checks.add("link", f"link.functionary:{name}", label, "ok",
                            f"signed by functionary {signers[0][:12]}; lists "
                            f"{', '.join(sorted(products)) or 'no products'}")
        return vouching

    def _layout(self) -> None:
        """Verify every succeeded step's engine link with in-toto under a generated layout."""
        if self.plan is None or self.state is None or self.steps is None:
            self.checks.add("layout", "layout.in_toto", "links/", "skipped",
                            "needs a plan and a state")
            return
        plan = self.plan
        done = [s for s in plan.steps if self.state.steps.get(s.id) is not None
                and self.state.steps[s.id].status == "succeeded"]
        if not done:
            self.checks.add("layout", "layout.in_toto", "links/", "skipped",
                            "no step succeeded, so the engine wrote no link")
            return
        self.checks.run(
            "layout", "layout.in_toto", "links/",
            lambda: verify_with_layout(done, {i.name for i in plan.inputs}, plan.producer_of(),
                                       self.trust.engine_key, self.steps.link_bytes),  # type: ignore[union-attr]
            lambda _none: f"in_toto_verify accepts the engine links of {len(done)} steps "
                          "under a layout generated from the plan")

    def _consistency(self) -> None:
        """Check that plan, state, registry and audit log agree."""
        plan, state = self.plan, self.state
        if plan is not None and state is not None and state.status != "rejected":
            planned = {s.id for s in plan.steps}
            same = set(state.steps) == planned
            self.checks.add("consistency", "state.steps", STATE_FILE, "ok" if same else "fail",
                            "records exactly the plan's steps" if same else
                            "records other steps than the plan's")
            if state.plan_id != plan.plan_id:
                self.checks.add("consistency", "state.plan_id", STATE_FILE, "fail",
                                "records another plan id")
        if self.registry is not None:
            self._registry_agrees(self.registry)
        if state is not None and self.walk is not None:
            self._audit_agrees(state)

    def _registry_agrees(self, registry: RegistryMap) -> None:
        """The registry lists every input and recorded product, and nothing else."""
        problems: list[str] = []
        if self.plan is not None:
            if registry.plan_id != self.plan.plan_id:
                problems.append("another plan id")
            expected: dict[str, tuple[str, str]] = {
                i.name: (i.sha256, "input") for i in self.plan.inputs}
            if self.state is not None:
                for step_id, entry in self.state.steps.items():
                    if entry.status == "succeeded":
                        for name, digest in entry.products.items():
                            expected[name] = (digest, f"step:{step_id}")
            engine = self.trust.engine_key.keyid
            for name, item in registry.artefacts.items():
                want = expected.get(name)
                if want is None:
                    problems.append(f"{name}: not an input or a recorded product")
                elif (item.sha256, item.origin) != want:
                    problems.append(f"{name}: digest or origin differs")
                elif item.origin.startswith("step:") and engine not in item.signers:
                    problems.append(f"{name}: not signed by the engine key")
            problems += [f"{name}: missing" for name in sorted(set(expected)
                                                               - set(registry.artefacts))]
        self.checks.add("consistency", "registry.agrees", REGISTRY_FILE,
                        "fail" if problems else "ok",
                        "; ".join(problems[:10]) if problems else
                        "lists every input and recorded product with the same digest and origin")

    def _audit_agrees(self, state: RunState) -> None:
        """Each step's last outcome in the audit log equals its state."""
        attempts = attempts_by_step(self.walk.records if self.walk else [])
        problems = []
        for step_id, entry in state.steps.items():
            if entry.status in ("pending", "running", "skipped") or entry.attempts == 0:
                continue
            runs = attempts.get(step_id)
            last = runs[-1].status if runs else None
            if last != entry.status:
                problems.append(f"{step_id}: state {entry.status}, audit {last or 'nothing'}")
        self.checks.add("consistency", "audit.agrees", AUDIT_FILE, "fail" if problems else "ok",
                        "; ".join(problems[:10]) if problems else
                        "each step's last recorded outcome equals its state")

    # -- assembling ----------------------------------------------------------

    def _reader(self) -> Reader:
        """The os_root reader (InputError when os_root could not be opened)."""
        if self.reader is None:
            raise InputError("os_root is not open")
        return self.reader

    def report(self, now: dt.datetime) -> Report:
        """The findings as a `Report`."""
        items = self.checks.items
        counts = {result: sum(1 for c in items if c.result == result)
                  for result in ("ok", "fail", "warn", "skipped")}
        state = self.state
        records = self.walk.records if self.walk else []
        run_ended = state is not None and state.status not in ("running", "pending")
        return Report.model_validate({
            "schema": REPORT_SCHEMA,
            "generated": format_rfc3339(now),
            "os_root": printable(str(self.path)),
            "verdict": "failed" if counts["fail"] else "verified",
            "summary": Summary(checks=len(items), **counts),
            "policy": self._policy_info(),
            "plan": self._plan_info(),
            "state": None if state is None else StateInfo(
                status=state.status, reason=state.reason, updated=state.updated,
                seq=state.seq, signed_audit_records=self.signed_records),
            "checks": items,
            "steps": self.steps.findings(self._levels()) if self.steps else [],
            "budget": self._budget(),
            "products": self.steps.products if self.steps else [],
            "vault_tokens": vault_tokens(records, run_ended=run_ended),
            "kills": kill_events(records),
            "audit": None if self.walk is None else AuditInfo(
                records=len(records), signed_records=self.signed_records,
                head_sha256=self.walk.head_sha256, torn_tail_bytes=self.walk.torn_tail_bytes,
                entries=[AuditEntry(seq=r.seq, time=r.time, kind=r.kind, fields=r.fields,
                                    signed=self.signed_records is not None
                                    and r.seq < self.signed_records) for r in records]),
        })

    def _policy_info(self) -> PolicyInfo:
        """What the report trusted, for the findings."""
        trust = self.trust
        return PolicyInfo(
            directory=printable(str(trust.directory)), engine_keyid=trust.engine_key.keyid,
            planner=RoleInfo(keyids=trust.planner.keyids, threshold=trust.planner.threshold),
            functionary=RoleInfo(keyids=trust.functionary.keyids,
                                 threshold=trust.functionary.threshold),
            profiles=dict(trust.profiles))

    def _plan_info(self) -> PlanInfo | None:
        """The plan as read, for the findings."""
        plan = self.plan
        if plan is None or self.plan_sha256 is None:
            return None
        return PlanInfo(
            plan_id=plan.plan_id, sha256=self.plan_sha256, expires=plan.expires,
            inputs={i.name: i.sha256 for i in plan.inputs},
            steps=[PlanStepInfo(id=s.id, run=list(s.run), needs=list(s.needs),
                                materials=list(s.materials), products=list(s.products),
                                profile=s.profile, vault_scope=s.vault_scope,
                                timeout_seconds=s.timeout_seconds) for s in plan.steps])

    def _levels(self) -> dict[str, int]:
        """Each step's depth in the DAG (longest path from a root)."""
        if self.plan is None:
            return {}
        graph = {s.id: tuple(s.needs) for s in self.plan.steps}
        levels: dict[str, int] = {}
        for step_id in topological_order(graph):
            levels[step_id] = 1 + max((levels[n] for n in graph[step_id]), default=-1)
        return levels

    def _budget(self) -> list[BudgetLine]:
        """Consumption against budget per dimension."""
        if self.state is None:
            return []
        totals = self.state.cost.totals.model_dump()
        budget = self.plan.budget.model_dump() if self.plan is not None else {}
        lines = []
        for unit in _UNITS:
            consumed = float(totals.get(unit) or 0)
            limit = budget.get(unit)
            lines.append(BudgetLine(
                unit=unit, consumed=consumed,
                budget=None if limit is None else float(limit),
                fraction=None if not limit else consumed / float(limit),
                exhausted=limit is not None and consumed >= float(limit)))
        return lines


def _validate(checks: CheckList, category: Any, model: Any, document: dict[str, Any],
              label: str) -> Any:
    """Validate a document into `model`, recording a schema check either way."""
    try:
        value = model.model_validate(document, by_alias=True, by_name=False)
    except ValidationError as exc:
        checks.add(category, f"{category}.schema", label, "fail",
                   str(SchemaError(f"{label}: {describe_validation_error(exc)}")))
        return None
    checks.add(category, f"{category}.schema", label, "ok", "matches its schema")
    return value

