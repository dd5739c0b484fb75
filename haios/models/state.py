# SPDX-License-Identifier: Apache-2.0
"""state.json and registry_map.json (contract section 6). No I/O.

Beyond the contract's fields the state carries, all covered by the
embedded engine signature:

- `seq`: a counter raised on every write, so an older signed state can be
  told apart from the newest one (the ledger, when configured, pins it);
- `audit`: the head of the audit chain at the time of the write;
- `vault_sessions`: accessors of the run's Vault parent tokens not yet
  known to be revoked (revoking one revokes every step token of its run);
- `steps.<id>.reason`, `.products`, `.token_accessors`: why a step ended,
  the digests of what it produced, and the Vault accessors issued to it
  that are not yet known to be revoked.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from haios.models.common import (
    ArtefactName,
    EmbeddedSignature,
    Identifier,
    NonNegativeFloat,
    NonNegativeInt,
    SafeText,
    Sha256Hex,
    StrictModel,
    Timestamp,
)

STATE_SCHEMA = "haios/state/v1"
REGISTRY_SCHEMA = "haios/registry_map/v1"

PlanStatus = Literal[
    "pending", "running", "succeeded", "failed", "killed", "budget_exhausted", "rejected"
]
StepStatus = Literal["pending", "running", "succeeded", "failed", "timed_out", "killed", "skipped"]
#: the statuses one attempt of a step can end in
EndStatus = Literal["succeeded", "failed", "timed_out", "killed"]
Accessor = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")]


class StepState(StrictModel):
    """What happened to one step."""

    status: StepStatus = "pending"
    exit_code: int | None = None
    attempts: NonNegativeInt = 0
    started: Timestamp | None = None
    finished: Timestamp | None = None
    reason: SafeText | None = None
    products: dict[ArtefactName, Sha256Hex] = Field(default_factory=dict)
    token_accessors: list[Accessor] = Field(default_factory=list)


class CostTotals(StrictModel):
    """Consumption so far, across every attempt (a budget never resets)."""

    cpu_seconds: NonNegativeFloat = 0.0
    wall_seconds: NonNegativeFloat = 0.0
    usd: NonNegativeFloat = 0.0
    tokens: NonNegativeFloat | NonNegativeInt = 0


class Cost(StrictModel):
    """The `cost` object of the state."""

    totals: CostTotals = Field(default_factory=CostTotals)


class AuditHead(StrictModel):
    """The audit chain's head: hash of the last record and record count."""

    sha256: Sha256Hex
    records: NonNegativeInt


class RunState(StrictModel):
    """state.json."""

    schema_: Literal["haios/state/v1"] = Field(alias="schema")
    plan_id: Identifier
    plan_sha256: Sha256Hex
    status: PlanStatus
    reason: SafeText | None = None
    steps: dict[Identifier, StepState]
    cost: Cost = Field(default_factory=Cost)
    updated: Timestamp
    seq: NonNegativeInt = 0
    audit: AuditHead | None = None
    vault_sessions: list[Accessor] = Field(default_factory=list)
    signatures: list[EmbeddedSignature] = Field(default_factory=list, max_length=16)


class RegistryEntry(StrictModel):
    """One artefact known to the run."""

    sha256: Sha256Hex
    size: NonNegativeInt
    origin: Annotated[str, Field(pattern=r"^(input|step:[a-z0-9][a-z0-9_-]{0,63})$")]
    signers: list[Sha256Hex] = Field(min_length=1)


class RegistryMap(StrictModel):
    """registry_map.json."""

    schema_: Literal["haios/registry_map/v1"] = Field(alias="schema")
    plan_id: Identifier
    artefacts: dict[ArtefactName, RegistryEntry]
    signatures: list[EmbeddedSignature] = Field(default_factory=list, max_length=16)
