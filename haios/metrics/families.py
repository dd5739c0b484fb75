# SPDX-License-Identifier: Apache-2.0
"""The metric families of contract section 10 (and ADR 0004), and their label values.

Label values come only from fixed lists: the contract's enumerations, a
fixed list of rejection reasons, sandbox violation kinds and egress
outcomes and refusal reasons (anything else becomes `other`), and profile
names that look like names (at most `PROFILE_LABELS_MAX` of them). A step
id, endpoint, address, path, plan id, accessor or message never becomes a
label, so neither cardinality nor an attacker's string can reach the
exposition. Pure: definitions on a registry the caller owns.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import haios
from haios.models.state import CostTotals, PlanStatus, StepStatus

METRICS_FILE_NAME: Final = "metrics.prom"

# -- label values ---------------------------------------------------------------
# Contract sections 6 and 10 enumerate these; a value outside them is a bug.
# The statuses and cost units come from the types they count.
PLAN_OUTCOMES: Final[tuple[str, ...]] = typing.get_args(PlanStatus)
STEP_OUTCOMES: Final[tuple[str, ...]] = typing.get_args(StepStatus)
VERIFICATION_KINDS: Final = ("plan", "artefact", "link", "digest")
VERIFICATION_RESULTS: Final = ("ok", "fail")
KILL_SCOPES: Final = ("global", "step", "engine_lost")
COST_UNITS: Final = tuple(CostTotals.model_fields)
# Not enumerated by the contract, so fixed here (attack catalog 122): the
# `reason` of every haios.errors class, plus `usage`; anything else is `other`.
OTHER: Final = "other"
REJECTION_REASONS: Final = (
    "usage",
    "input",
    "schema",
    "path",
    "verification",
    "signature",
    "threshold",
    "digest",
    "link",
    "expired",
    "replay",
    "tampered",
    "policy_denied",
    "killed",
    "budget_exhausted",
    "environment",
    "copy_failed",
    "policy",
    "sandbox",
    "vault",
    "engine_key",
    "watchdog_lost",
    "busy",
    "step_failed",
    "internal",
    OTHER,
)
# The violations a StepRunner reports (haios.sandbox.spec.StepOutcome).
SANDBOX_VIOLATION_KINDS: Final = (
    "seccomp",
    "cpu_limit",
    "file_size",
    "memory",
    "processes",
    OTHER,
)
# Egress (docs/adr/0004-egress.md): how forwarded connections ended, why the
# engine refused, and which way bytes went (haios.egress.forward keeps the
# same lists; a test keeps them in step). Anything else is `other`.
EGRESS_OUTCOMES: Final = (
    "closed",
    "reset",
    "connect_failed",
    "byte_limit",
    "step_ended",
    "error",
    OTHER,
)
EGRESS_REFUSAL_REASONS: Final = ("total_limit", "byte_limit", "resolution", OTHER)
EGRESS_DIRECTIONS: Final = ("out", "in")
# Profiles are operator-named (policy/profiles/<name>.toml), so trusted but
# open-ended: names must look like names, and only the first few get a series.
SHIPPED_PROFILES: Final = ("default", "network")
PROFILE_LABELS_MAX: Final = 16
PROFILE_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

# -- buckets --------------------------------------------------------------------
# Steps run from milliseconds to the longest timeout a profile allows.
STEP_DURATION_BUCKETS: Final = (
    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
# A kill is expected in milliseconds; the tail shows a watchdog in trouble.
KILL_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# A scrape client gets this long per read before its connection is dropped:
# idle or slow clients must not pin server threads (attack catalog 120).


@dataclasses.dataclass(frozen=True)
class Families:
    """The contract's metric families (section 10, ADR 0004), one attribute each."""

    build_info: Gauge
    plan_runs: Counter
    steps: Counter
    steps_running: Gauge
    step_duration: Histogram
    verifications: Counter
    rejections: Counter
    kill_switch_engaged: Gauge
    kills: Counter
    kill_latency: Histogram
    vault_tokens_issued: Counter
    vault_tokens_revoked: Counter
    cost: Counter
    budget_remaining: Gauge
    sandbox_violations: Counter
    egress_connections: Counter
    egress_refusals: Counter
    egress_bytes: Counter


def define_families(registry: CollectorRegistry) -> Families:
    """Create every contract metric in `registry`: the one place they are named."""
    r = registry
    return Families(
        build_info=Gauge(
            "haios_build_info", "haios build; always 1", ["version", "contract"], registry=r
        ),
        plan_runs=Counter(
            "haios_plan_runs_total", "Plan runs by final status", ["outcome"], registry=r
        ),
        steps=Counter("haios_steps_total", "Finished steps by status", ["outcome"], registry=r),
        steps_running=Gauge("haios_steps_running", "Steps running now", registry=r),
        step_duration=Histogram(
            "haios_step_duration_seconds",
            "Wall time of finished steps",
            ["profile"],
            buckets=STEP_DURATION_BUCKETS,
            registry=r,
        ),
        verifications=Counter(
            "haios_verifications_total",
            "Verifications by kind and result",
            ["kind", "result"],
            registry=r,
        ),
        rejections=Counter(
            "haios_rejections_total", "Refused inputs and runs by reason", ["reason"], registry=r
        ),
        kill_switch_engaged=Gauge(
            "haios_kill_switch_engaged", "1 while a kill switch is engaged", registry=r
        ),
        kills=Counter("haios_kills_total", "Step trees killed by scope", ["scope"], registry=r),
        kill_latency=Histogram(
            "haios_kill_latency_seconds",
            "From a flag seen to the last process of the tree reaped",
            buckets=KILL_LATENCY_BUCKETS,
            registry=r,
        ),
        vault_tokens_issued=Counter(
            "haios_vault_tokens_issued_total", "Step Vault tokens issued", registry=r
        ),
        vault_tokens_revoked=Counter(
            "haios_vault_tokens_revoked_total", "Step Vault tokens revoked", registry=r
        ),
        cost=Counter("haios_cost_total", "Cost consumed by unit", ["unit"], registry=r),
        budget_remaining=Gauge(
            "haios_budget_remaining", "Budget left by unit (+Inf: unlimited)", ["unit"], registry=r
        ),
        sandbox_violations=Counter(
            "haios_sandbox_violations_total", "Steps stopped by the sandbox", ["kind"], registry=r
        ),
        egress_connections=Counter(
            "haios_egress_connections_total",
            "Connections steps made to allowed endpoints, by how they ended",
            ["outcome"],
            registry=r,
        ),
        egress_refusals=Counter(
            "haios_egress_refusals_total",
            "Egress refused by the engine (limits reached, endpoints not resolved)",
            ["reason"],
            registry=r,
        ),
        egress_bytes=Counter(
            "haios_egress_bytes_total",
            "Bytes forwarded for steps (out: to the endpoint, in: back)",
            ["direction"],
            registry=r,
        ),
    )


def preinitialise(families: Families, version: str) -> None:
    """Create every enumerable child so each family shows samples from the start.

    A labelled family without children has no samples, and a scraper (or an
    alert using `increase`) cannot tell "zero" from "absent".
    """
    families.build_info.labels(version=version, contract=haios.CONTRACT_VERSION).set(1)
    for outcome in PLAN_OUTCOMES:
        families.plan_runs.labels(outcome=outcome)
    for outcome in STEP_OUTCOMES:
        families.steps.labels(outcome=outcome)
    for profile in SHIPPED_PROFILES:
        families.step_duration.labels(profile=profile)
    for kind in VERIFICATION_KINDS:
        for result in VERIFICATION_RESULTS:
            families.verifications.labels(kind=kind, result=result)
    for reason in REJECTION_REASONS:
        families.rejections.labels(reason=reason)
    for scope in KILL_SCOPES:
        families.kills.labels(scope=scope)
    for unit in COST_UNITS:
        families.cost.labels(unit=unit)
        # Unknown until the engine says: "no limit known" must not look exhausted.
        families.budget_remaining.labels(unit=unit).set(math.inf)
    for kind in SANDBOX_VIOLATION_KINDS:
        families.sandbox_violations.labels(kind=kind)
    for outcome in EGRESS_OUTCOMES:
        families.egress_connections.labels(outcome=outcome)
    for reason in EGRESS_REFUSAL_REASONS:
        families.egress_refusals.labels(reason=reason)
    for direction in EGRESS_DIRECTIONS:
        families.egress_bytes.labels(direction=direction)
