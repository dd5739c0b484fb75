# SPDX-License-Identifier: Apache-2.0
"""The production `StepGuard`: the kill watch, Vault grants and egress routes composed.

Before a step: its kill cgroup is registered with the watchdog (a flag
already set refuses it), its scoped Vault token is written into its secret
filesystem (a detached tmpfs no host path names) readable by the step's uid
only, and the egress routes of its profile, resolved once at run start,
are handed over. After the step, whatever happened: the token is revoked by
accessor and the cgroup unregistered. `make_guard` builds it in the order
that leaves least behind on a refusal. Does I/O.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from haios import events as ev
from haios.egress.resolve import raise_refusals
from haios.errors import HaiosError, VaultUnavailableError
from haios.guard.api import GuardRequest, StepGrant
from haios.guard.kill_watch import KillWatch
from haios.guard.preflight import resolve_egress
from haios.guard.vault_grants import VaultGrants
from haios.models.plan import PlanStep
from haios.sandbox.spec import EgressRoute
from haios.watchdog.client import PendingWatchdog


class RunGuard:
    """Kill watch and Vault grants for one run, with the pinned egress routes."""

    def __init__(self, request: GuardRequest, kills: KillWatch,
                 vault: VaultGrants | None) -> None:
        self.request = request
        self.kills = kills
        self.vault = vault
        #: profile name -> the routes resolved at run start
        self.egress: dict[str, tuple[EgressRoute, ...]] = {}

    def pin_egress(self, environ: Mapping[str, str]) -> None:
        """Resolve and pin every egress endpoint of the plan's profiles; audit it.

        Raises:
            SandboxSetupError: an endpoint is refused (exit 6; audited first).
        """
        bus = self.request.bus
        for resolution in resolve_egress(self.request.policy, self.request.plan, environ):
            for route in resolution.routes:
                bus.publish(ev.EgressResolved(profile=resolution.profile,
                            endpoint=route.endpoint, port=route.port,
                            addresses=list(route.destinations)))
            for refusal in resolution.refusals:
                bus.publish(ev.EgressRefused(step_id=None, endpoint=refusal.endpoint,
                            reason="resolution", message=refusal.message))
            raise_refusals(resolution)
            self.egress[resolution.profile] = resolution.routes

    def before(self, step: PlanStep, uid: int, gid: int, secret_fd: int | None) -> StepGrant:
        """Register the step's kill cgroup; issue its scoped token.

        Raises:
            KilledError: a flag killed the step at registration (do not start it).
            WatchdogLostError, VaultUnavailableError: the run must stop.
        """
        cgroup = self.kills.register(step.id)
        egress = self.egress.get(step.profile)
        if step.vault_scope is None:
            return StepGrant(cgroup=cgroup, egress=egress)
        try:
            if self.vault is None:
                raise VaultUnavailableError(f"step {step.id}: Vault is not configured")
            accessor, env = self.vault.issue(step, step.vault_scope, uid, gid, secret_fd)
        except BaseException:
            self.kills.release(step.id, cgroup)
            raise
        return StepGrant(cgroup=cgroup, env=env, accessor=accessor, egress=egress)

    def after(self, step: PlanStep, grant: StepGrant) -> None:
        """Revoke the token and unregister the cgroup, whatever happened."""
        try:
            if grant.accessor is not None and self.vault is not None:
                self.vault.revoke(step.id, grant.accessor)
        finally:
            self.kills.release(step.id, grant.cgroup)

    def was_killed(self, step_id: str) -> str | None:
        """The kill flag that stopped the step, or None."""
        return self.kills.was_killed(step_id)

    def failure(self) -> HaiosError | None:
        """An error that must stop the run (the watchdog was lost), or None."""
        return self.kills.failure()

    def unrevoked(self) -> frozenset[str]:
        """Accessors whose revocation failed so far."""
        return self.vault.unrevoked() if self.vault is not None else frozenset()

    def close(self) -> None:
        """Retry failed revocations, revoke the run session; stop the watchdog."""
        try:
            if self.vault is not None:
                self.vault.close()
        finally:
            self.kills.close()


def make_guard(request: GuardRequest, environ: Mapping[str, str] | None = None, *,
               watchdog: PendingWatchdog | None = None) -> RunGuard:
    """The run's guard: egress pinned, Vault session open, watchdog started.

    `watchdog` is the process `haios run` spawned ahead; it is configured
    here, after everything that can refuse first. Not taken (a refusal
    before), it stays its spawner's to discard.

    Raises:
        SandboxSetupError: an egress endpoint is refused (exit 6).
        VaultUnavailableError: a step needs Vault and it is not configured.
        EnvironmentUnavailableError: the watchdog cannot start (exit 6).

    Side Effects:
        Resolves names, contacts Vault, starts (or spawns) the watchdog process.
    """
    env = environ if environ is not None else os.environ
    vault = _vault_grants(request, env)
    guard = RunGuard(request, KillWatch(request, watchdog), vault)
    # Before the Vault session and the watchdog: a refused endpoint leaves
    # nothing behind to clean up.
    guard.pin_egress(env)
    if vault is not None:
        vault.revoke_recorded()
        vault.open_session(sum(step.timeout_seconds for step in request.plan.steps))
    try:
        guard.kills.start()
    except BaseException:
        guard.close()  # the session just opened is revoked, not left to its TTL
        raise
    return guard


def _vault_grants(request: GuardRequest, environ: Mapping[str, str]) -> VaultGrants | None:
    """Vault grants when a step names a scope, else None (hvac never loads)."""
    if not any(step.vault_scope for step in request.plan.steps):
        return None
    from haios.secrets import provider_from_environment

    provider = provider_from_environment(environ)  # refuses without VAULT_ADDR
    addr = environ.get("VAULT_ADDR")
    if addr is None:
        raise VaultUnavailableError("a step needs Vault and VAULT_ADDR is not set")
    return VaultGrants(request, provider, addr)
