# SPDX-License-Identifier: Apache-2.0
"""Per-step evidence: products, engine `.sig`s, engine links, cost records, logs.

For every plan step the state records, `StepCollector` checks what the
engine must have written for it (contract sections 3, 5 and 8):

- a succeeded step: each product's bytes against the digest in the signed
  state, its engine `.sig`, and the engine's in-toto link (engine key,
  name, command, materials and products as the plan and state say), whose
  `environment.haios_confinement` becomes the step's confinement finding;
- any step that ran: its engine-signed cost record;
- its captured output, shown as untrusted, unsigned text.

It builds each product's provenance chain from the materials' own evidence.
Does I/O: reads os_root.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from haios.errors import DigestError, HaiosError, InputError, SchemaError
from haios.load.parse import parse_model
from haios.models.cost import CostRecord
from haios.models.plan import ExecPlan, PlanStep
from haios.models.state import RunState, StepState
from haios.report.chain import Record
from haios.report.checks import CheckList, Reader
from haios.report.evidence import attempts_by_step
from haios.report.model import (
    Attempt,
    Confinement,
    MaterialProvenance,
    ProductProvenance,
    SeccompFilter,
    StepCost,
    StepFinding,
    StepOutput,
)
from haios.report.trust import Trust
from haios.report.verify import (
    link_digests,
    sha256_hex,
    verify_classic_link,
    verify_detached,
)

COST_RECORD_MAX_BYTES: Final = 64 << 10
#: how much of each captured stream the report shows
OUTPUT_SHOWN_BYTES: Final = 4096
_RAN: Final = frozenset({"succeeded", "failed", "timed_out", "killed"})


class StepCollector:
    """Checks and findings for the steps of one os_root.

    Attributes:
        link_bytes: step id -> the exact bytes of its engine link, as read.
        products: the provenance of every recorded product.
    """

    def __init__(self, reader: Reader, trust: Trust, checks: CheckList, plan: ExecPlan | None,
                 state: RunState | None, records: Sequence[Record],
                 input_signers: Mapping[str, list[str]],
                 input_links: Mapping[str, list[str]]) -> None:
        """Index what the checks need: producers, input pins, attempts."""
        self.reader, self.trust, self.checks = reader, trust, checks
        self.plan, self.state = plan, state
        self.depth = trust.limits.json_max_depth
        self.attempts = attempts_by_step(records)
        self.input_signers, self.input_links = input_signers, input_links
        self.link_bytes: dict[str, bytes] = {}
        self.products: list[ProductProvenance] = []
        self._links: dict[str, Any] = {}
        self._confinement: dict[str, Confinement] = {}
        self._product_ok: dict[str, bool] = {}
        self._costs: dict[str, StepCost] = {}
        self._outputs: dict[str, StepOutput] = {}
        self.engine_suffix = f".{trust.engine_key.keyid[:8]}.link"
        self._producer = plan.producer_of() if plan is not None else {}
        self._inputs = {item.name: item.sha256 for item in plan.inputs} if plan else {}

    def collect(self) -> None:
        """Check every step the plan and the state both know."""
        if self.plan is None or self.state is None:
            return
        for step in self.plan.steps:
            entry = self.state.steps.get(step.id)
            if entry is None:
                continue
            if entry.status == "succeeded":
                self._products(step, entry)
                self._link(step, entry)
            elif self.reader.exists("links", f"{step.id}{self.engine_suffix}"):
                self.checks.add("link", f"link.engine:{step.id}",
                                f"links/{step.id}{self.engine_suffix}", "warn",
                                f"a link for a step that is {entry.status}: the engine writes "
                                "links for succeeded steps only")
            if entry.attempts > 0 and entry.status in _RAN:
                self._cost(step, entry)
            self._output(step)
        for step in self.plan.steps:
            entry = self.state.steps.get(step.id)
            if entry is not None and entry.status == "succeeded":
                self._provenance(step, entry)

    # -- checks --------------------------------------------------------------

    def _products(self, step: PlanStep, entry: StepState) -> None:
        """Check each product's bytes and engine `.sig` against the signed state."""
        limits = self.trust.limits
        engine = self.trust.engine_key
        for name in step.products:
            recorded = entry.products.get(name)
            if recorded is None:
                self.checks.add("artefact", f"artefact.digest:{name}", f"artefacts/{name}",
                                "fail", "the signed state records no digest for this product")
                self._product_ok[name] = False
                continue

            def digest(name: str = name, recorded: str = recorded) -> int:
                """Hash the product as read; raise DigestError on a mismatch."""
                found, size = self.reader.digest("artefacts", name,
                                                 max_bytes=limits.product_max_bytes)
                if found != recorded:
                    raise DigestError(f"artefacts/{name}: SHA-256 differs from the digest in "
                                      "state.json")
                return size

            def signature(name: str = name, recorded: str = recorded) -> Any:
                """Verify the product's engine `.sig`."""
                sig = self.reader.read("artefacts", f"{name}.sig",
                                       max_bytes=limits.sig_max_bytes)
                return verify_detached(sig, [engine], 1, name=name, data_sha256=recorded,
                                       label=f"artefacts/{name}.sig", max_depth=self.depth)

            size = self.checks.run("artefact", f"artefact.digest:{name}", f"artefacts/{name}",
                                   digest, lambda size: f"{size} bytes; SHA-256 equals the "
                                                        "signed state's")
            signed = self.checks.run("artefact", f"artefact.signature:{name}",
                                     f"artefacts/{name}.sig", signature,
                                     lambda _s: "DSSE envelope signed by the engine key binds "
                                                "this digest")
            self._product_ok[name] = size is not None and signed is not None

    def _link(self, step: PlanStep, entry: StepState) -> None:
        """Check the step's engine link and extract its confinement."""
        name = f"{step.id}{self.engine_suffix}"
        label = f"links/{name}"
        limits = self.trust.limits

        def verify() -> dict[str, Any]:
            """Read and verify the file; raise on any problem."""
            data = self.reader.read("links", name, max_bytes=limits.link_max_bytes)
            self.link_bytes[step.id] = data
            link = verify_classic_link(data, self.trust.engine_key, label=label,
                                       max_depth=self.depth)
            self._agrees(step, entry, link, label)
            return link

        link = self.checks.run("link", f"link.engine:{step.id}", label, verify,
                               lambda _link: "signed by the engine key; name, command, "
                                             "materials and products agree with plan and state")
        if link is None:
            return
        self._links[step.id] = link
        try:
            self._confinement[step.id] = self._confinement_of(step, link)
        except HaiosError as exc:
            self.checks.add("confinement", f"confinement:{step.id}", label, "fail", str(exc))
            return
        confinement = self._confinement[step.id]
        if confinement.profile_matches_policy is False:
            self.checks.add("confinement", f"confinement.profile:{step.id}", label, "warn",
                            f"profile {confinement.profile} digest differs from the policy's "
                            "profile now (changed since the run)")

    def _agrees(self, step: PlanStep, entry: StepState, link: dict[str, Any],
                label: str) -> None:
        """Raise unless the link's name, command, materials and products match plan and state."""
        if link["name"] != step.id:
            raise SchemaError(f"{label}: names step {str(link['name'])[:64]!r}")
        if link["command"] != list(step.run):
            raise SchemaError(f"{label}: command differs from the plan's run")
        products, materials = link["products"], link["materials"]
        if (not isinstance(products, dict) or link_digests(products) != entry.products
                or len(products) != len(entry.products)):
            raise DigestError(f"{label}: products differ from the signed state")
        expected = {name: self._material_digest(name) for name in step.materials}
        if (not isinstance(materials, dict) or link_digests(materials) != expected
                or len(materials) != len(expected)):
            raise DigestError(f"{label}: materials differ from the plan's inputs and the "
                              "recorded products")

    def _material_digest(self, name: str) -> str | None:
        """The digest a material must have: the plan pin or the producer's recorded digest."""
        if name in self._inputs:
            return self._inputs[name]
        producer = self._producer.get(name)
        if self.state is None:
            return None
        entry = self.state.steps.get(producer) if producer else None
        return entry.products.get(name) if entry is not None else None

    def _cost(self, step: PlanStep, entry: StepState) -> None:
        """Check the step's engine-signed cost record (a killed step may have none)."""
        name = f"{step.id}.json"
        if not self.reader.exists("cost", name):
            killed = entry.status == "killed"
            self.checks.add("cost_record", f"cost.signature:{step.id}", f"cost/{name}",
                            "skipped" if killed else "fail",
                            "no record: the tree was killed before one was written" if killed
                            else "missing for a step that ran")
            return
        limits = self.trust.limits
        plan_id = self.plan.plan_id if self.plan is not None else ""

        def verify() -> CostRecord:
            """Read and verify the file; raise on any problem."""
            data = self.reader.read("cost", name, max_bytes=COST_RECORD_MAX_BYTES)
            sig = self.reader.read("cost", f"{name}.sig", max_bytes=limits.sig_max_bytes)
            verify_detached(sig, [self.trust.engine_key], 1, name=name,
                            data_sha256=sha256_hex(data), label=f"cost/{name}.sig",
                            max_depth=self.depth)
            record = parse_model(CostRecord, data, label=f"cost/{name}", max_depth=self.depth)
            if record.step_id != step.id or record.plan_id != plan_id:
                raise SchemaError(f"cost/{name}: belongs to another step or plan")
            return record

        record = self.checks.run("cost_record", f"cost.signature:{step.id}", f"cost/{name}",
                                 verify, lambda _r: "engine-signed; names this plan and step")
        if record is not None:
            self._costs[step.id] = StepCost(
                cpu_seconds=record.measured.cpu_seconds,
                wall_seconds=record.measured.wall_seconds,
                max_rss_bytes=record.measured.max_rss_bytes,
                usd=float(record.reported.usd), tokens=float(record.reported.tokens))

    def _output(self, step: PlanStep) -> None:
        """Read the head of the step's captured output (unsigned, shown as text)."""
        streams: dict[str, tuple[str, int]] = {}
        for stream in ("out", "err"):
            name = f"{step.id}.{stream}"
            if not self.reader.exists("logs", name):
                continue
            try:
                head, size = self.reader.head("logs", name, max_bytes=OUTPUT_SHOWN_BYTES)
            except HaiosError as exc:
                self.checks.add("os_root", f"logs:{name}", f"logs/{name}", "warn", str(exc))
                continue
            streams[stream] = (head.decode("utf-8", errors="replace"), size)
        if streams:
            out, err = streams.get("out", ("", 0)), streams.get("err", ("", 0))
            self._outputs[step.id] = StepOutput(stdout=out[0], stderr=err[0],
                                                stdout_bytes=out[1], stderr_bytes=err[1])

    # -- findings ------------------------------------------------------------

    def _confinement_of(self, step: PlanStep, link: dict[str, Any]) -> Confinement:
        """The confinement recorded in the engine link's environment."""
        environment = link["environment"] if isinstance(link["environment"], dict) else {}
        record = environment.get("haios_confinement")
        label = f"links/{step.id}{self.engine_suffix}"
        if not isinstance(record, dict):
            raise InputError(f"{label}: records no haios_confinement")
        try:
            profile = record["profile"]
            seccomp = record["seccomp"]
            identity = record["identity"]
            capabilities = record["capabilities"]
            workspace = record["filesystem"]["workspace"]
            filters = [SeccompFilter(name=str(f["name"]), rules=int(f["rules"]),
                                     sha256=str(f["sha256"])) for f in seccomp["filters"]]
            name, digest = str(profile["name"]), str(profile["digest"]["sha256"])
            policy_digest = self.trust.profiles.get(name)
            runs = self.attempts.get(step.id) or []
            pool = identity.get("pool") if isinstance(identity, dict) else None
            shown_identity = (f"uid {identity.get('uid')}" if not isinstance(pool, dict) else
                              f"a uid leased for this step alone from the pool "
                              f"{pool.get('base')}+{pool.get('count')}")
            return Confinement(
                profile=name, profile_sha256=digest,
                profile_matches_policy=None if policy_digest is None
                else policy_digest == digest,
                namespaces=[str(n) for n in record["namespaces"]],
                network=str(record["network"]),
                egress=_egress(record.get("egress")),
                uid=runs[-1].uid if runs else None,
                identity=shown_identity,
                capabilities_empty=all(capabilities[k] == [] for k in
                                       ("effective", "permitted", "inheritable", "bounding",
                                        "ambient")),
                no_new_privs=record["no_new_privs"] is True,
                rlimits=dict(record["rlimits"]),
                seccomp_default_action=str(seccomp["default_action"]),
                seccomp_filters=filters,
                timeout_seconds=record.get("timeout_seconds"),
                workspace_size_bytes=workspace.get("size_bytes"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{label}: malformed haios_confinement "
                             f"({type(exc).__name__})") from exc

    def _provenance(self, step: PlanStep, entry: StepState) -> None:
        """Record the provenance chain of each of the step's products."""
        link = self._links.get(step.id)
        engine = self.trust.engine_key.keyid
        producer = self._producer
        materials = []
        for name in step.materials:
            digest = self._material_digest(name) or ""
            if name in self.input_signers or name in self.input_links:
                materials.append(MaterialProvenance(
                    name=name, sha256=digest, origin="input",
                    signers=self.input_signers.get(name, []),
                    evidence=[f"inbox/{name}.sig", *self.input_links.get(name, [])]))
            else:
                origin = producer.get(name, "")
                verified = self._product_ok.get(name, False) and origin in self._links
                materials.append(MaterialProvenance(
                    name=name, sha256=digest, origin=f"step:{origin}",
                    signers=[engine] if verified else [],
                    evidence=[f"artefacts/{name}.sig", f"links/{origin}{self.engine_suffix}"]))
        for name in step.products:
            recorded = entry.products.get(name)
            if recorded is None:
                continue
            ok = self._product_ok.get(name, False) and link is not None
            self.products.append(ProductProvenance(
                name=name, sha256=recorded, size=self._size(name), step=step.id,
                signers=[engine] if ok else [], verified=ok,
                link=f"links/{step.id}{self.engine_suffix}" if link is not None else None,
                command=list(step.run), materials=materials,
                confinement=self._confinement.get(step.id)))

    def _size(self, name: str) -> int | None:
        """The size of `artefacts/<name>` (never followed), or None."""
        try:
            info = self.reader.where("artefacts").lstat(name)
        except HaiosError:
            return None
        return None if info is None else info.st_size

    def findings(self, levels: Mapping[str, int]) -> list[StepFinding]:
        """One finding per step, in plan order (state order without a plan)."""
        plan_steps = {s.id: s for s in self.plan.steps} if self.plan is not None else {}
        state_steps = self.state.steps if self.state is not None else {}
        order = list(plan_steps) or list(state_steps)
        found = []
        for step_id in order:
            entry = state_steps.get(step_id)
            step = plan_steps.get(step_id)
            runs: list[Attempt] = self.attempts.get(step_id) or []
            found.append(StepFinding(
                id=step_id, status=entry.status if entry else "unknown",
                attempts=entry.attempts if entry else 0,
                started=entry.started if entry else None,
                finished=entry.finished if entry else None,
                exit_code=entry.exit_code if entry else None,
                reason=entry.reason if entry else None,
                needs=list(step.needs) if step else [],
                profile=step.profile if step else "",
                uid=runs[-1].uid if runs else None,
                level=levels.get(step_id, 0), history=runs,
                cost=self._costs.get(step_id), output=self._outputs.get(step_id)))
        return found


def _egress(record: Any) -> list[str]:
    """Each allowed endpoint as `name -> destinations` (an empty list: none)."""
    if record is None:
        return []
    return [f"{entry['endpoint']} -> {', '.join(str(d) for d in entry['destinations'])}"
            for entry in record["endpoints"]]
