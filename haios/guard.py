# SPDX-License-Identifier: Apache-2.0
"""External resources around each step: its kill cgroup and its Vault token.

`RunGuard` is the production `StepGuard`: before a step it creates the
step's cgroup and registers it with the watchdog, issues a token scoped to
the step's Vault scope and writes it into the step's secret filesystem
(a detached tmpfs no host path names), readable by the step's uid only,
and hands over the egress routes of the step's profile; after the step it
unregisters and revokes the token by accessor, whatever the outcome.
`make_guard` resolves every egress endpoint of the plan's profiles once,
at run start, from the host (haios/egress/resolve.py), audits the answers
and pins them for the run. `preflight` checks, before anything runs, that
the sandbox, (when a step needs it) Vault, and every egress endpoint are
usable (exit 6). Does I/O.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haios import events as ev
from haios.errors import HaiosError, KilledError, VaultUnavailableError, WatchdogLostError
from haios.execute import GuardRequest, StepGrant
from haios.load.policy import Policy
from haios.models.plan import ExecPlan, PlanStep
from haios.sandbox.spec import VIEW_TOKEN_FILE, EgressRoute

if TYPE_CHECKING:
    from haios.egress.resolve import EgressResolution

SESSION_MAX_SECONDS = 86_400
SESSION_MARGIN_SECONDS = 300


def _grant(policy: Policy, scope: str) -> Any:
    from haios.secrets import ScopeGrant

    entry = policy.file.vault_scopes[scope]
    return ScopeGrant(tuple(entry.policies), entry.ttl_seconds, entry.num_uses)


def preflight(policy: Policy, plan: ExecPlan, environ: Mapping[str, str] | None = None) -> None:
    """Refuse (exit 6) when the sandbox or a needed Vault is unusable.

    Side Effects:
        Probes namespaces; contacts Vault when a step names a scope.
    """
    import os

    from haios.sandbox.cglimits import check_enforceable
    from haios.sandbox.preflight import check_sandbox_prerequisites
    from haios.sandbox.uidpool import check_pool_range

    names = sorted({step.profile for step in plan.steps})
    check_sandbox_prerequisites([policy.profiles[name] for name in names])
    # Step uids come from a host-wide pool; its range must be reserved for it.
    check_pool_range(policy.file.sandbox.uid_base, policy.file.sandbox.uid_count)
    # Every profile bounds memory and processes per step tree; a host that
    # cannot enforce that refuses the run rather than running unbounded.
    check_enforceable(memory=True, pids=True)
    scopes = sorted({s.vault_scope for s in plan.steps if s.vault_scope})
    if scopes:
        from haios.secrets import provider_from_environment

        provider = provider_from_environment(environ if environ is not None else os.environ)
        provider.preflight([_grant(policy, scope) for scope in scopes])
    # Every endpoint must resolve to an allowed destination before anything
    # runs; make_guard resolves again and pins that answer for the run.
    from haios.egress.resolve import raise_refusals

    for resolution in _resolve_egress(policy, plan, environ if environ is not None
                                      else os.environ):
        raise_refusals(resolution)


def _resolve_egress(policy: Policy, plan: ExecPlan,
                    environ: Mapping[str, str]) -> list[EgressResolution]:
    """Resolve the egress of every profile the plan uses (in name order).

    Side Effects:
        Queries the host's resolver for each name.
    """
    from haios.egress.resolve import resolve_egress_result

    names = sorted({step.profile for step in plan.steps if policy.profiles[step.profile].egress})
    return [resolve_egress_result(name, policy.profiles[name].egress,
                                  vault_addr=environ.get("VAULT_ADDR")) for name in names]


class RunGuard:
    """Watchdog registration and Vault tokens for one run."""

    def __init__(self, request: GuardRequest, watchdog: Any, provider: Any,
                 vault_addr: str | None) -> None:
        self.request = request
        self.watchdog = watchdog
        self.provider = provider
        self.vault_addr = vault_addr
        self.kills: dict[str, str] = {}
        self.leftovers: list[str] = []
        self._lock = threading.Lock()
        self.lost: HaiosError | None = None
        self.session: Any = None
        self.session_provider: Any = None
        #: profile name -> the routes resolved at run start
        self.egress: dict[str, tuple[EgressRoute, ...]] = {}

    def resolve_egress(self, environ: Mapping[str, str]) -> None:
        """Resolve and pin every egress endpoint of the plan's profiles; audit it.

        Raises:
            SandboxSetupError: an endpoint is refused (exit 6; audited first).

        Side Effects:
            Queries the host's resolver; publishes egress.resolved and
            egress.refused events.
        """
        from haios.egress.resolve import raise_refusals

        for resolution in _resolve_egress(self.request.policy, self.request.plan, environ):
            for route in resolution.routes:
                self.request.bus.publish(ev.EGRESS_RESOLVED, profile=resolution.profile,
                                         endpoint=route.endpoint, port=route.port,
                                         addresses=list(route.destinations))
            for refusal in resolution.refusals:
                self.request.bus.publish(ev.EGRESS_REFUSED, step_id=None,
                                         endpoint=refusal.endpoint, reason="resolution",
                                         message=refusal.message)
            raise_refusals(resolution)
            self.egress[resolution.profile] = resolution.routes

    def note_kill(self, step_id: str | None, flag: str) -> None:
        """Remember which flag killed which step (None: every running step)."""
        with self._lock:
            self.kills[step_id or "*"] = flag

    def on_kill(self, report: Any) -> None:
        """Watchdog callback (its reader thread): record and publish one kill."""
        latency_ms = report.latency_seconds * 1000
        self.note_kill(report.step_id, f"{_flag_name(report.flag)} (tree dead {latency_ms:.1f} ms "
                                       "after the flag was seen)")
        self.request.bus.publish(ev.KILL, scope=report.scope, flag=_flag_name(report.flag),
                                 step_id=report.step_id,
                                 latency_seconds=report.latency_seconds,
                                 complete=report.complete)

    def on_engaged(self, engagement: Any) -> None:
        """Watchdog callback: a flag was seen (latched for the run)."""
        self.request.bus.publish(ev.KILL_SWITCH, engaged=True,
                                 flag=_flag_name(engagement.flag), scope=engagement.scope)

    def on_lost(self) -> None:
        """Watchdog callback: it died. Kill every tree ourselves and fail closed."""
        with self._lock:
            self.lost = WatchdogLostError("the watchdog process died; every step tree "
                                          "was killed by the engine")
        if self.watchdog is not None:
            self.watchdog.kill_all_registered()

    def failure(self) -> HaiosError | None:
        """An error that must stop the run (the watchdog was lost), or None."""
        with self._lock:
            return self.lost

    def before(self, step: PlanStep, uid: int, gid: int, secret_fd: int | None) -> StepGrant:
        """Create and register the step's cgroup; issue its scoped token.

        Raises:
            KilledError: a flag killed the step at registration (do not start it).
            WatchdogLostError, VaultUnavailableError: the run must stop.
        """
        lost = self.failure()
        if lost is not None:
            raise lost
        cgroup = None
        if self.watchdog is not None:
            path = self.watchdog.create_step_cgroup(step.id)
            cgroup = str(path)
            report = self.watchdog.register(step.id, path)
            if report is not None:
                self.watchdog.remove_step_cgroup(path)
                raise KilledError(f"kill switch {_flag_name(report.flag)} engaged")
        egress = self.egress.get(step.profile)
        if step.vault_scope is None:
            return StepGrant(cgroup=cgroup, egress=egress)
        try:
            return dataclasses.replace(self._issue(step, uid, gid, secret_fd, cgroup),
                                       egress=egress)
        except BaseException:
            if self.watchdog is not None and cgroup is not None:
                self.watchdog.unregister(step.id)
                self.watchdog.remove_step_cgroup(Path(cgroup))
            raise

    def _issue(self, step: PlanStep, uid: int, gid: int, secret_fd: int | None,
               cgroup: str | None) -> StepGrant:
        from haios.secrets import write_token_into

        if secret_fd is None:
            raise VaultUnavailableError(f"step {step.id}: no secret filesystem for its token")
        if self.provider is None or self.vault_addr is None or step.vault_scope is None:
            raise VaultUnavailableError(f"step {step.id}: Vault is not configured")
        grant = _grant(self.request.policy, step.vault_scope)
        token = self.provider.issue(step.id, grant,
                                    ttl_seconds=min(grant.ttl_seconds, step.timeout_seconds))
        # Record the accessor durably before the token can be used (resume revokes it).
        if self.request.record_accessor is not None:
            self.request.record_accessor(step.id, token.accessor)
        self.request.bus.publish(ev.VAULT_TOKEN_ISSUED, step_id=step.id,
                                 accessor=token.accessor, ttl_seconds=token.ttl_seconds)
        try:
            write_token_into(secret_fd, token, uid, gid)
        except BaseException:
            self._revoke(step.id, token.accessor)
            raise
        env = {"VAULT_ADDR": self.vault_addr, "HAIOS_VAULT_TOKEN_FILE": VIEW_TOKEN_FILE}
        return StepGrant(cgroup=cgroup, env=env, accessor=token.accessor)

    def after(self, step: PlanStep, grant: StepGrant) -> None:
        """Unregister the cgroup and revoke the token, whatever happened."""
        try:
            if grant.accessor is not None:
                self._revoke(step.id, grant.accessor)
        finally:
            if self.watchdog is not None and grant.cgroup is not None and self.failure() is None:
                self.watchdog.unregister(step.id)
                self.watchdog.remove_step_cgroup(Path(grant.cgroup))

    def _revoke(self, step_id: str, accessor: str, provider: Any = None) -> bool:
        try:
            (provider or self.provider).revoke(accessor)
        except HaiosError as exc:
            with self._lock:
                self.leftovers.append(accessor)
            self.request.bus.publish(ev.VAULT_REVOKE_FAILED, step_id=step_id,
                                     accessor=accessor, message=exc.reason)
            return False
        self.request.bus.publish(ev.VAULT_TOKEN_REVOKED, step_id=step_id, accessor=accessor)
        return True

    def was_killed(self, step_id: str) -> str | None:
        """The flag that killed `step_id`, if one did.

        The watchdog's report can reach us a moment after the runner saw the
        tree die, so a latched engagement or a flag still present counts too.
        """
        from haios.watchdog.flags import global_flag_present, step_flag_present

        with self._lock:
            reported = self.kills.get(step_id) or self.kills.get("*")
        if reported is not None:
            return reported
        if self.watchdog is not None:
            for engagement in self.watchdog.engagements():
                if engagement.scope == "global" or engagement.step_id == step_id:
                    return _flag_name(engagement.flag)
        control = self.request.osr.path / "control"
        extra = self.request.policy.kill_paths
        flag = global_flag_present(control, extra)
        if flag is not None:
            return _flag_name(flag)
        return f"KILL.{step_id}" if step_flag_present(control, step_id) else None

    def unrevoked(self) -> frozenset[str]:
        """Accessors whose revocation failed so far (retried at close)."""
        with self._lock:
            return frozenset(self.leftovers)

    def revoke_leftovers(self, accessors: tuple[str, ...]) -> None:
        """Revoke tokens a previous (crashed) run recorded as not yet revoked."""
        for accessor in accessors:
            if self._revoke("resume", accessor) and self.request.record_session is not None:
                self.request.record_session(accessor, False)

    def open_session(self, run_seconds: int) -> None:
        """Give the run its own parent token; step tokens become its children.

        The session accessor is recorded durably before any step token
        exists, so a crash between Vault creating a step token and the
        engine recording it still leaves a way to revoke it (revoking the
        session revokes its children). The session lives at most as long as
        the plan's steps could run one after the other, plus a margin.
        """
        if self.provider is None:
            return
        ttl = min(SESSION_MAX_SECONDS, run_seconds + SESSION_MARGIN_SECONDS)
        session = self.provider.open_session(self.request.run_id, ttl_seconds=ttl)
        if self.request.record_session is not None:
            self.request.record_session(session.accessor, True)
        self.request.bus.publish(ev.VAULT_TOKEN_ISSUED, step_id="run", accessor=session.accessor,
                                 ttl_seconds=session.ttl_seconds)
        self.session_provider, self.session = self.provider, session
        self.provider = session.provider

    def close(self) -> None:
        """Retry failed revocations, revoke the run session; stop the watchdog."""
        try:
            if self.leftovers and self.provider is not None:
                from haios.secrets import revoke_leftovers

                revoke_leftovers(self.provider, list(self.leftovers))
            if self.session is not None:
                revoked = self._revoke("run", self.session.accessor, self.session_provider)
                if revoked and self.request.record_session is not None:
                    self.request.record_session(self.session.accessor, False)
        finally:
            if self.watchdog is not None:
                self.watchdog.close()


def _flag_name(flag: str | None) -> str:
    """A flag's base name for records (never the os_root path)."""
    if not flag:
        return "engine_lost"
    return Path(flag.split(" ", 1)[0]).name


def make_guard(request: GuardRequest) -> RunGuard:
    """Start the watchdog for this run and connect Vault when a step needs it.

    Raises:
        EnvironmentUnavailableError: the watchdog cannot start (exit 6).
        VaultUnavailableError: a step needs Vault and it is not configured.

    Side Effects:
        Spawns the watchdog process and creates the run's cgroup.
    """
    import os
    import secrets as pyrandom

    from haios.watchdog.client import Watchdog

    provider = None
    addr = None
    if any(step.vault_scope for step in request.plan.steps):
        from haios.secrets import provider_from_environment

        provider = provider_from_environment(os.environ)
        addr = os.environ.get("VAULT_ADDR")
    guard = RunGuard(request, None, provider, addr)
    # Before the Vault session and the watchdog: a refused endpoint leaves
    # nothing behind to clean up.
    guard.resolve_egress(os.environ)
    if provider is not None:
        if request.leftover_accessors:
            guard.revoke_leftovers(request.leftover_accessors)
        guard.open_session(sum(step.timeout_seconds for step in request.plan.steps))
    guard.watchdog = Watchdog.start(
        control_dir=request.osr.path / "control",
        extra_paths=request.policy.kill_paths,
        journal_path=request.journal_path,
        run_id=f"{request.run_id}-{os.getpid()}-{pyrandom.token_hex(3)}",
        on_kill=guard.on_kill, on_lost=guard.on_lost, on_engaged=guard.on_engaged,
    )
    return guard
