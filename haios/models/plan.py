# SPDX-License-Identifier: Apache-2.0
"""exec_plan.json (contract section 4): the planner's signed request.

The model checks each field and the plan-wide invariants that need no
policy: unique step ids, known `needs`, unique products that never shadow
inputs or collide by case, materials reachable through `needs`, and an
acyclic graph. Policy-dependent checks (profiles, scopes, denied env names,
limits) live in `haios.decide`. No I/O.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, field_validator, model_validator

from haios.decide.dag import check_acyclic, transitive_needs
from haios.models.common import (
    ArtefactName,
    EnvName,
    Identifier,
    NonNegativeFloat,
    SafeText,
    Sha256Hex,
    StrictModel,
    Timestamp,
)

PLAN_SCHEMA = "haios/exec_plan/v1"
MAX_STEPS = 4096
MAX_INPUTS = 10_000
MAX_ARGV_ITEMS = 4096
MAX_ARGV_BYTES = 128 * 1024  # well under ARG_MAX, so execve never fails with E2BIG
MAX_ENV_ENTRIES = 256
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600

ArgvItem = Annotated[str, StringConstraints(max_length=MAX_ARGV_BYTES)]


def _unique(values: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} is listed twice")
        seen.add(value)
    return values


class Budget(StrictModel):
    """Plan budget; an absent key is unlimited. Units are in the names."""

    cpu_seconds: NonNegativeFloat | int | None = None
    wall_seconds: NonNegativeFloat | int | None = None
    usd: NonNegativeFloat | int | None = None
    tokens: NonNegativeFloat | int | None = None

    @field_validator("cpu_seconds", "wall_seconds", "usd", "tokens")
    @classmethod
    def _non_negative(cls, value: float | int | None) -> float | int | None:
        if value is not None and value < 0:
            raise ValueError("budget values must not be negative")
        return value


class PlanInput(StrictModel):
    """An artefact the plan consumes from `inbox/`, pinned by digest."""

    name: ArtefactName
    sha256: Sha256Hex


class PlanStep(StrictModel):
    """One step: a command run in a sandbox over named materials."""

    id: Identifier
    run: list[ArgvItem] = Field(min_length=1, max_length=MAX_ARGV_ITEMS)
    needs: list[Identifier] = Field(default_factory=list, max_length=MAX_STEPS)
    materials: list[ArtefactName] = Field(default_factory=list, max_length=MAX_INPUTS)
    products: list[ArtefactName] = Field(default_factory=list, max_length=MAX_INPUTS)
    profile: Identifier = "default"
    vault_scope: Identifier | None = None
    env: dict[EnvName, SafeText] = Field(default_factory=dict, max_length=MAX_ENV_ENTRIES)
    timeout_seconds: int = Field(default=300, ge=1, le=MAX_TIMEOUT_SECONDS)

    @field_validator("run")
    @classmethod
    def _argv(cls, run: list[str]) -> list[str]:
        if any("\x00" in arg for arg in run):
            raise ValueError("run arguments must not contain NUL")
        if not run[0].startswith("/"):
            raise ValueError("run[0] must be an absolute path (no PATH lookup, no shell)")
        if sum(len(arg.encode("utf-8")) + 1 for arg in run) > MAX_ARGV_BYTES:
            raise ValueError(f"run exceeds {MAX_ARGV_BYTES} bytes")
        return run

    @field_validator("needs", "materials", "products")
    @classmethod
    def _no_duplicates(cls, values: list[str]) -> list[str]:
        return _unique(values, "entry")


class ExecPlan(StrictModel):
    """The whole plan (contract section 4)."""

    schema_: Literal["haios/exec_plan/v1"] = Field(alias="schema")
    plan_id: Identifier
    expires: Timestamp
    budget: Budget = Field(default_factory=Budget)
    inputs: list[PlanInput] = Field(default_factory=list, max_length=MAX_INPUTS)
    steps: list[PlanStep] = Field(min_length=1, max_length=MAX_STEPS)

    @model_validator(mode="after")
    def _plan_invariants(self) -> Self:
        inputs = _unique([i.name for i in self.inputs], "input")
        ids = _unique([s.id for s in self.steps], "step id")
        known = set(ids)
        producer: dict[str, str] = {}
        folded: dict[str, str] = {name.casefold(): name for name in inputs}
        for step in self.steps:
            for need in step.needs:
                if need not in known:
                    raise ValueError(f"step {step.id!r} needs unknown step {need!r}")
                if need == step.id:
                    raise ValueError(f"step {step.id!r} needs itself")
            for product in step.products:
                if product in inputs:
                    raise ValueError(f"product {product!r} shadows an input")
                if product in producer:
                    raise ValueError(f"product {product!r} is made by two steps")
                if product.casefold() in folded:
                    raise ValueError(f"product {product!r} collides by case with "
                                     f"{folded[product.casefold()]!r}")
                producer[product] = step.id
                folded[product.casefold()] = product
        graph = {s.id: tuple(s.needs) for s in self.steps}
        check_acyclic(graph)
        input_set = set(inputs)
        for step in self.steps:
            upstream = transitive_needs(graph, step.id)
            for material in step.materials:
                if material in input_set:
                    continue
                origin = producer.get(material)
                if origin is None:
                    raise ValueError(f"step {step.id!r} material {material!r} is neither an "
                                     "input nor a product")
                if origin not in upstream:
                    raise ValueError(f"step {step.id!r} uses {material!r} from {origin!r} "
                                     "without needing it")
        return self

    def step(self, step_id: str) -> PlanStep:
        """The step with id `step_id` (KeyError when absent)."""
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def producer_of(self) -> dict[str, str]:
        """Product name -> id of the step that makes it."""
        return {p: s.id for s in self.steps for p in s.products}
