# SPDX-License-Identifier: Apache-2.0
"""What surrounds a step, as the executor sees it: the guard's protocol and values.

A `StepGuard` prepares what a step needs from outside the sandbox before it
starts (its kill cgroup registered with the watchdog, its scoped Vault
token, its egress routes) and releases it afterwards, whatever happened.
The production guard composes a kill watch and Vault grants
(haios/guard/run_guard.py); `NoGuard` is the guard of a run with neither.
Pure: value types and the protocol only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from haios import events as ev
from haios.errors import HaiosError
from haios.load.policy import Policy
from haios.models.plan import ExecPlan, PlanStep
from haios.osroot import OsRoot
from haios.sandbox.spec import EgressRoute


class StepGuard(Protocol):
    """Kill-switch and secret hooks around one step (watchdog, Vault)."""

    def before(self, step: PlanStep, uid: int, gid: int, secret_fd: int | None) -> StepGrant:
        """Prepare external resources for the step; raise a HaiosError to refuse.

        `secret_fd` is the root of the step's secret filesystem (a Vault
        scope's token goes there), or None when the step has no scope.
        """
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

    def unrevoked(self) -> frozenset[str]:
        """Accessors of tokens whose revocation failed (kept in state for a retry)."""
        ...


@dataclasses.dataclass(frozen=True)
class StepGrant:
    """What `StepGuard.before` set up for one step.

    `egress` holds the routes of the step's profile as resolved at run start
    (haios/egress/resolve.py), or None when the guard resolved none; a
    profile that names endpoints needs them.
    """

    cgroup: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    accessor: str | None = None
    egress: tuple[EgressRoute, ...] | None = None


@dataclasses.dataclass(frozen=True)
class GuardRequest:
    """What the guard factory needs to watch and scope one run."""

    osr: OsRoot
    policy: Policy
    plan: ExecPlan
    bus: ev.EventBus
    run_id: str
    #: where the watchdog journals kills (inside the engine's run area)
    journal_path: Path
    #: Vault accessors a previous run recorded as not yet revoked
    leftover_accessors: tuple[str, ...] = ()
    #: durably records a token accessor in state before the token is handed out
    record_accessor: Callable[[str, str], None] | None = None
    #: durably records (True) or forgets (False) a run session's accessor
    record_session: Callable[[str, bool], None] | None = None


class NoGuard:
    """A guard for runs with no watchdog and no Vault (unit tests of the executor)."""

    def before(self, step: PlanStep, uid: int, gid: int, secret_fd: int | None) -> StepGrant:
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

    def unrevoked(self) -> frozenset[str]:
        """Never issues a token."""
        return frozenset()
