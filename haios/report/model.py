# SPDX-License-Identifier: Apache-2.0
"""The findings of `haios-client report`: one strict, frozen pydantic model tree.

`Report` is what `--json` prints and what the HTML template renders; its JSON
Schema is `schemas/report.schema.json` (`python -m haios.schemas`). Every
string that comes from os_root is untrusted text: the model carries it as
data, and each renderer escapes it. No I/O.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, JsonValue

from haios.models.common import StrictModel

REPORT_SCHEMA = "haios/report/v1"

#: a check's outcome: `skipped` and `warn` never fail the report, `fail` does
CheckResult = Literal["ok", "fail", "warn", "skipped"]
CheckCategory = Literal[
    "os_root", "plan", "input", "artefact", "cost_record", "link", "layout", "state",
    "registry", "audit", "consistency", "confinement", "vault",
]
Verdict = Literal["verified", "failed"]
Text = Annotated[str, Field(max_length=1 << 16)]


class Check(StrictModel):
    """One verification and its result.

    Attributes:
        id: stable identifier, e.g. ``artefact.signature:report.txt``.
        category: what kind of evidence was checked.
        subject: the file or item checked (os_root relative, untrusted text).
        result: ``ok``, ``fail``, ``warn`` (does not fail the report) or
            ``skipped`` (could not apply; `detail` says why).
        detail: one line saying what was found.
    """

    id: Text
    category: CheckCategory
    subject: Text
    result: CheckResult
    detail: Text


class Summary(StrictModel):
    """Counts of check results."""

    checks: int = Field(ge=0)
    ok: int = Field(ge=0)
    fail: int = Field(ge=0)
    warn: int = Field(ge=0)
    skipped: int = Field(ge=0)


class RoleInfo(StrictModel):
    """A trusted role of the operator's policy."""

    keyids: list[str]
    threshold: int = Field(ge=1)


class PolicyInfo(StrictModel):
    """What the report trusted: the operator's public policy."""

    directory: Text
    engine_keyid: str
    planner: RoleInfo
    functionary: RoleInfo
    profiles: dict[str, str] = Field(description="profile name -> SHA-256 of its file")


class PlanStepInfo(StrictModel):
    """One step as the plan asked for it."""

    id: str
    run: list[Text]
    needs: list[str]
    materials: list[str]
    products: list[str]
    profile: str
    vault_scope: str | None
    timeout_seconds: int


class BudgetLine(StrictModel):
    """Consumption against budget for one dimension."""

    unit: Literal["cpu_seconds", "wall_seconds", "usd", "tokens"]
    consumed: float
    budget: float | None = Field(description="null: unlimited")
    fraction: float | None = Field(description="consumed / budget; null when unlimited")
    exhausted: bool


class PlanInfo(StrictModel):
    """The plan as read from exec_plan.json (whether or not its signature verified)."""

    plan_id: str
    sha256: str
    expires: str
    inputs: dict[str, str] = Field(description="input name -> pinned SHA-256")
    steps: list[PlanStepInfo]


class Attempt(StrictModel):
    """One attempt of a step, from the audit log's step.started / step.finished."""

    attempt: int
    started: str | None
    finished: str | None
    status: str | None
    exit_code: int | None
    uid: int | None
    reason: Text | None


class StepCost(StrictModel):
    """A step's cost record (its last attempt), when it verified."""

    cpu_seconds: float
    wall_seconds: float
    max_rss_bytes: int
    usd: float
    tokens: float


class StepOutput(StrictModel):
    """The head of a step's captured output (unsigned, untrusted text)."""

    stdout: Text
    stderr: Text
    stdout_bytes: int
    stderr_bytes: int


class StepFinding(StrictModel):
    """Everything known about one step."""

    id: str
    status: str
    attempts: int
    started: str | None
    finished: str | None
    exit_code: int | None
    reason: Text | None
    needs: list[str]
    profile: str
    uid: int | None = Field(description="uid of the last attempt (audit log)")
    level: int = Field(ge=0, description="depth in the DAG (longest path from a root)")
    history: list[Attempt]
    cost: StepCost | None
    output: StepOutput | None


class SeccompFilter(StrictModel):
    """One BPF program the step ran under."""

    name: Text
    rules: int
    sha256: Text


class Confinement(StrictModel):
    """The confinement recorded in the engine's signed link for a step."""

    profile: Text
    profile_sha256: Text
    profile_matches_policy: bool | None = Field(
        description="null: the policy has no profile of that name")
    namespaces: list[Text]
    network: Text = Field(description="`none`, `egress` (an allowlist) or `host`")
    egress: list[Text] = Field(description="allowed endpoints and where they lead")
    uid: int | None = Field(description="the uid the step ran as (audit log)")
    identity: Text
    capabilities_empty: bool
    no_new_privs: bool
    rlimits: dict[str, JsonValue]
    seccomp_default_action: Text
    seccomp_filters: list[SeccompFilter]
    timeout_seconds: JsonValue
    workspace_size_bytes: JsonValue


class MaterialProvenance(StrictModel):
    """Where one material of a step came from."""

    name: str
    sha256: str
    origin: Text = Field(description="`input` or `step:<id>`")
    signers: list[str]
    evidence: list[Text] = Field(description="files that vouch for it")


class ProductProvenance(StrictModel):
    """The provenance chain of one engine product."""

    name: str
    sha256: str
    size: int | None
    step: str
    signers: list[str]
    verified: bool
    link: Text | None
    command: list[Text]
    materials: list[MaterialProvenance]
    confinement: Confinement | None


class VaultToken(StrictModel):
    """Issue and revoke evidence for one Vault token, by accessor (never the token)."""

    accessor: Text
    step_id: Text
    issued: str | None
    ttl_seconds: JsonValue
    revoked: str | None
    revoke_failed: Text | None
    outstanding: bool


class KillEvent(StrictModel):
    """A kill-switch event from the audit log."""

    seq: int
    time: str
    kind: Literal["kill", "kill_switch"]
    scope: Text | None
    flag: Text | None
    step_id: Text | None
    latency_seconds: float | None
    complete: bool | None


class AuditEntry(StrictModel):
    """One audit record."""

    seq: int
    time: Text
    kind: Text
    fields: dict[str, JsonValue]
    signed: bool = Field(description="covered by the head signed in state.json")


class AuditInfo(StrictModel):
    """The audit log as verified."""

    records: int
    signed_records: int | None
    head_sha256: str | None
    torn_tail_bytes: int
    entries: list[AuditEntry]


class StateInfo(StrictModel):
    """state.json as read (whether or not its signature verified)."""

    status: str
    reason: Text | None
    updated: str
    seq: int
    signed_audit_records: int | None


class Report(StrictModel):
    """The whole report (`haios-client report --json`)."""

    schema_: Literal["haios/report/v1"] = Field(alias="schema")
    generated: str
    os_root: Text
    verdict: Verdict
    summary: Summary
    policy: PolicyInfo
    plan: PlanInfo | None
    state: StateInfo | None
    checks: list[Check]
    steps: list[StepFinding]
    budget: list[BudgetLine]
    products: list[ProductProvenance]
    vault_tokens: list[VaultToken]
    kills: list[KillEvent]
    audit: AuditInfo | None
