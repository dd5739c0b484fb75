# SPDX-License-Identifier: Apache-2.0
"""Vault grants of one run: a session token, and one scoped token per step.

Order, each for a crash at any instant:

1. Tokens a previous run recorded as not yet revoked are revoked first.
2. The run gets its own parent token (a session) whose accessor is durable
   in state before any step token exists: revoking the session revokes
   every child, so a crash between Vault creating a step token and the
   engine recording it still leaves a way to revoke it.
3. Per step: the token is issued as a child of the session, its accessor
   made durable, then the token written into the step's secret filesystem.
4. After the step, whatever happened: revoked by accessor. A failed
   revocation is kept (`unrevoked`), stays in state, and is retried at close.

No token ever reaches a message, a record or a log. Does I/O (Vault).
"""

from __future__ import annotations

import threading

from haios import events as ev
from haios.errors import HaiosError, VaultUnavailableError
from haios.guard.api import GuardRequest
from haios.load.policy import Policy
from haios.models.plan import PlanStep
from haios.sandbox.spec import VIEW_TOKEN_FILE
from haios.secrets import (
    ScopeGrant,
    SecretProvider,
    VaultSession,
    revoke_leftovers,
    write_token_into,
)

SESSION_MAX_SECONDS = 86_400
SESSION_MARGIN_SECONDS = 300


def scope_grant(policy: Policy, scope: str) -> ScopeGrant:
    """What a token for `scope` may do, from the policy's `vault_scopes`."""
    entry = policy.file.vault_scopes[scope]
    return ScopeGrant(tuple(entry.policies), entry.ttl_seconds, entry.num_uses)


class VaultGrants:
    """Issues and revokes the run's Vault tokens; remembers what failed to revoke."""

    def __init__(self, request: GuardRequest, provider: SecretProvider, vault_addr: str) -> None:
        self.request = request
        self.provider = provider
        self.vault_addr = vault_addr
        self.session: VaultSession | None = None
        self._session_provider: SecretProvider | None = None
        self._unrevoked: list[str] = []
        self._lock = threading.Lock()

    def revoke_recorded(self) -> None:
        """(1) Revoke tokens a previous (crashed) run recorded as not yet revoked."""
        for accessor in self.request.leftover_accessors:
            if self._revoke("resume", accessor) and self.request.record_session is not None:
                self.request.record_session(accessor, False)

    def open_session(self, run_seconds: int) -> None:
        """(2) Give the run its own parent token; step tokens become its children.

        The session lives at most as long as the plan's steps could run one
        after the other, plus a margin.
        """
        ttl = min(SESSION_MAX_SECONDS, run_seconds + SESSION_MARGIN_SECONDS)
        session = self.provider.open_session(self.request.run_id, ttl_seconds=ttl)
        if self.request.record_session is not None:
            self.request.record_session(session.accessor, True)
        self.request.bus.publish(ev.VaultTokenIssued(step_id="run", accessor=session.accessor,
                                 ttl_seconds=session.ttl_seconds))
        self._session_provider, self.session = self.provider, session
        self.provider = session.provider

    def issue(self, step: PlanStep, scope: str, uid: int, gid: int,
              secret_fd: int | None) -> tuple[str, dict[str, str]]:
        """(3) Issue the step's token into its secret filesystem.

        Returns:
            The token's accessor and the environment that names the token file.

        Raises:
            VaultUnavailableError: Vault refused, or the step has no secret filesystem.
        """
        if secret_fd is None:
            raise VaultUnavailableError(f"step {step.id}: no secret filesystem for its token")
        grant = scope_grant(self.request.policy, scope)
        token = self.provider.issue(step.id, grant,
                                    ttl_seconds=min(grant.ttl_seconds, step.timeout_seconds))
        # The accessor is durable before the token can be used (resume revokes it).
        if self.request.record_accessor is not None:
            self.request.record_accessor(step.id, token.accessor)
        self.request.bus.publish(ev.VaultTokenIssued(step_id=step.id,
                                 accessor=token.accessor, ttl_seconds=token.ttl_seconds))
        try:
            write_token_into(secret_fd, token, uid, gid)
        except BaseException:
            self.revoke(step.id, token.accessor)
            raise
        return token.accessor, {"VAULT_ADDR": self.vault_addr,
                                "HAIOS_VAULT_TOKEN_FILE": VIEW_TOKEN_FILE}

    def revoke(self, step_id: str, accessor: str) -> None:
        """(4) Revoke one step token by accessor; a failure is kept for a retry."""
        self._revoke(step_id, accessor)

    def unrevoked(self) -> frozenset[str]:
        """Accessors whose revocation failed so far (retried at close)."""
        with self._lock:
            return frozenset(self._unrevoked)

    def close(self) -> None:
        """Retry failed revocations, then revoke the run session."""
        with self._lock:
            retry = list(self._unrevoked)
        if retry:
            revoke_leftovers(self.provider, retry)
        if self.session is not None:
            revoked = self._revoke("run", self.session.accessor, self._session_provider)
            if revoked and self.request.record_session is not None:
                self.request.record_session(self.session.accessor, False)

    def _revoke(self, step_id: str, accessor: str,
                provider: SecretProvider | None = None) -> bool:
        try:
            (provider or self.provider).revoke(accessor)
        except HaiosError as exc:
            with self._lock:
                self._unrevoked.append(accessor)
            self.request.bus.publish(ev.VaultRevokeFailed(step_id=step_id,
                                     accessor=accessor, message=exc.reason))
            return False
        self.request.bus.publish(ev.VaultTokenRevoked(step_id=step_id, accessor=accessor))
        return True
