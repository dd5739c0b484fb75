# SPDX-License-Identifier: Apache-2.0
"""`HvacProvider`: the `SecretProvider` backed by Vault/OpenBao through hvac.

The only module of haios that imports hvac. Every hvac call goes through
`HvacProvider._attempt`, which turns hvac and requests exceptions into
scrubbed one-line reasons, and every response is checked field by field
before use: hvac has no type stubs, so its values are `Any` until checked.

Does network I/O to Vault. Does not read the process environment itself
(`from_environment` takes a mapping) and never reads `~/.vault-token`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Final, NoReturn

import hvac  # no stubs (pyproject: ignore_missing_imports); values are checked here
import hvac.exceptions
import requests

from haios.errors import InternalError, VaultUnavailableError
from haios.secrets._answers import (
    TokenAuth,
    auth_mismatch,
    check_engine_token,
    checked_addr,
    json_object,
    json_strings,
    lifetime_mismatch,
    parse_auth,
    scrub,
)
from haios.secrets.provider import IssuedToken, ScopeGrant, VaultSession, effective_ttl_seconds

#: per-request HTTP timeout; a hung Vault must not hold a step's start or end
DEFAULT_TIMEOUT_SECONDS: Final = 10.0
#: lifetime of the probe tokens `preflight` mints and revokes at once
PROBE_TTL_SECONDS: Final = 10
PROBE_STEP_ID: Final = "preflight"
#: default lifetime of a run's session token (`open_session`)
DEFAULT_SESSION_TTL_SECONDS: Final = 24 * 3600

_CREATE_PATH: Final = "auth/token/create"
_REVOKE_ACCESSOR_PATH: Final = "auth/token/revoke-accessor"
_FORBIDDEN: Final = 403
_INVALID_REQUEST: Final = 400
_TOKEN_HINT: Final = (
    "VAULT_TOKEN is invalid, expired or revoked, or lacks the default policy's "
    "lookup-self and capabilities-self"
)

#: hvac raises one class per HTTP status; the status is kept, the text scrubbed
_STATUS_OF: Final[Mapping[type[BaseException], int]] = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}

_FALSE_WORDS: Final = frozenset({"", "0", "false", "f", "no", "n"})


class _ScrubbedVaultError(Exception):
    """A failed Vault call, reduced to what is safe to show.

    Chained as the `__cause__` of the haios error instead of the hvac or
    requests exception: those keep the response body and the request (with
    its X-Vault-Token header) reachable from a traceback.

    Attributes:
        status: the HTTP status, or None when no response arrived.
        reason: a scrubbed one-line reason.
    """

    def __init__(self, status: int | None, reason: str, original: str) -> None:
        """Record a failure.

        Args:
            status: the HTTP status, or None.
            reason: scrubbed one-line reason.
            original: the name of the hvac/requests exception class.
        """
        super().__init__(f"{original}: {reason}")
        self.status = status
        self.reason = reason


class HvacProvider:
    """Per-step tokens as children of the engine token, through hvac.

    One HTTP session is reused for every call (connection reuse is most of
    the per-step cost). A lock serialises calls because a requests session is
    not documented as thread-safe; calls take a few milliseconds each.
    """

    def __init__(
        self,
        addr: str,
        token: str,
        *,
        token_role: str | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        verify: bool | str = True,
        client_cert: tuple[str, str] | None = None,
        namespace: str | None = None,
        allow_plaintext_http: bool = False,
    ) -> None:
        """Set up a client; no request is sent until a method is called.

        Args:
            addr: Vault's address, `https://host:port` (`http://` only to a
                loopback address unless `allow_plaintext_http`).
            token: the engine's token (it must be able to create children).
            token_role: mint step tokens through `auth/token/create/<role>`
                instead of `auth/token/create` (see docs/vault.md).
            timeout_seconds: per-request HTTP timeout.
            verify: TLS verification: True, or a CA bundle file or directory.
            client_cert: (certificate, key) paths for TLS client auth.
            namespace: Vault Enterprise namespace, or None.
            allow_plaintext_http: UNSAFE: accept `http://` to a non-loopback
                host, sending the engine token in clear. Off by default.

        Raises:
            VaultUnavailableError: the address is malformed or plaintext to a
                remote host, the token is empty, or `verify` is False.
        """
        self._addr = checked_addr(addr, allow_plaintext_http=allow_plaintext_http)
        if not token or token != token.strip():
            raise VaultUnavailableError("the engine's Vault token is empty or malformed")
        if verify is False:
            raise VaultUnavailableError("TLS verification of Vault cannot be disabled")
        if token_role is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", token_role):
            raise VaultUnavailableError(f"invalid Vault token role name {token_role!r}")
        self._token = token
        self._role = token_role
        self._timeout_seconds = timeout_seconds
        self._tls = (verify, client_cert, namespace)
        self._lock = threading.Lock()
        # Redirects are refused: requests drops Authorization on a cross-host
        # redirect but not X-Vault-Token, so following one could hand the
        # engine token to another host (threat T-V06).
        self._client = hvac.Client(
            url=self._addr,
            token=token,
            verify=verify,
            cert=client_cert,
            timeout=timeout_seconds,
            namespace=namespace,
            allow_redirects=False,
        )

    @classmethod
    def from_environment(
        cls,
        env: Mapping[str, str],
        *,
        token_role: str | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> HvacProvider:
        """Build a provider from the standard Vault variables.

        Reads `VAULT_ADDR` and `VAULT_TOKEN` (required), `VAULT_CACERT` or
        `VAULT_CAPATH`, `VAULT_CLIENT_CERT` with `VAULT_CLIENT_KEY`, and
        `VAULT_NAMESPACE`. `VAULT_SKIP_VERIFY` set to a true value is refused.
        `~/.vault-token` is never read: the engine's token is explicit.

        Args:
            env: the environment to read (normally `os.environ`).
            token_role: see `__init__`.
            timeout_seconds: see `__init__`.

        Returns:
            A provider; nothing has been sent to Vault yet.

        Raises:
            VaultUnavailableError: a required variable is missing, or a
                setting is unsafe or incomplete.
        """
        addr = env.get("VAULT_ADDR", "").strip()
        token = env.get("VAULT_TOKEN", "").strip()
        if not addr:
            raise VaultUnavailableError("VAULT_ADDR is not set; a step needs a Vault scope")
        if not token:
            raise VaultUnavailableError("VAULT_TOKEN is not set; a step needs a Vault scope")
        if env.get("VAULT_SKIP_VERIFY", "").strip().lower() not in _FALSE_WORDS:
            raise VaultUnavailableError("VAULT_SKIP_VERIFY is set; haios always verifies TLS")
        cert, key = env.get("VAULT_CLIENT_CERT"), env.get("VAULT_CLIENT_KEY")
        if bool(cert) != bool(key):
            raise VaultUnavailableError(
                "set both VAULT_CLIENT_CERT and VAULT_CLIENT_KEY, or neither"
            )
        return cls(
            addr,
            token,
            token_role=token_role,
            timeout_seconds=timeout_seconds,
            verify=env.get("VAULT_CACERT") or env.get("VAULT_CAPATH") or True,
            client_cert=(cert, key) if cert and key else None,
            namespace=env.get("VAULT_NAMESPACE") or None,
        )

    def __repr__(self) -> str:
        """Show where the provider points, never its token."""
        return f"HvacProvider(addr={self._addr!r}, token_role={self._role!r})"

    __str__ = __repr__

    def close(self) -> None:
        """Close the HTTP session.

        Side Effects:
            Closes pooled connections to Vault.
        """
        with self._lock:
            self._client.adapter.close()

    def open_session(
        self, run_id: str, *, ttl_seconds: int = DEFAULT_SESSION_TTL_SECONDS
    ) -> VaultSession:
        """Create the run's own parent token and a provider that uses it.

        Every step token the returned provider issues is a child of the
        session token, itself a child of the engine token. Record
        `session.accessor` durably *before* issuing step tokens: revoking it
        (on resume, after a crash) revokes every step token of the run, even
        one whose accessor was never recorded because the engine died right
        after Vault created it (attack catalog 107, threat T-V02).

        The session token has the engine token's policies (Vault copies
        them when none are named), is non-renewable and lives `ttl_seconds`
        at most: a run that outlasts it loses Vault access (fail closed).

        Args:
            run_id: the run's id (metadata and display name `haios-run-<id>`).
            ttl_seconds: the session's lifetime, in seconds.

        Returns:
            The session's accessor, lifetime and provider.

        Raises:
            VaultUnavailableError: Vault refused or issued something else
                (then revoked).
            InternalError: an empty `run_id` or `ttl_seconds` < 1.

        Side Effects:
            Creates a token in Vault.
        """
        if not run_id or ttl_seconds < 1:
            raise InternalError("a Vault session needs a run id and a TTL >= 1 second")
        response = self._call(
            "session token create", lambda: self._create_session(run_id, ttl_seconds)
        )
        auth = self._verified(response, lambda a: lifetime_mismatch(a, ttl_seconds), ttl_seconds)
        verify, client_cert, namespace = self._tls
        provider = HvacProvider(
            self._addr,
            auth.token,
            token_role=self._role,
            timeout_seconds=self._timeout_seconds,
            verify=verify,
            client_cert=client_cert,
            namespace=namespace,
            allow_plaintext_http=True,  # this address passed our own check already
        )
        return VaultSession(auth.accessor, auth.lease_seconds, provider)

    # -- SecretProvider --------------------------------------------------------

    def preflight(self, grants: Collection[ScopeGrant] = ()) -> None:
        """Check that the engine token can issue and revoke step tokens.

        In order: the token is valid, a service token without a use limit
        (a batch token cannot have children; a use-limited one runs dry
        mid-run); it may create tokens on the create path and revoke by
        accessor; then each distinct grant is proven end to end by a probe
        token, issued and revoked at once, so that a role, policy or
        parent-subset mismatch shows up before any step runs.

        Args:
            grants: the scopes the plan will use.

        Raises:
            VaultUnavailableError: any check failed; the message says which.

        Side Effects:
            Calls Vault; creates and revokes one probe token per grant.
        """
        info = json_object(
            self._call("lookup of the engine token (VAULT_TOKEN)", self._lookup_self, _TOKEN_HINT),
            "lookup-self response",
        )
        check_engine_token(json_object(info.get("data"), "lookup-self data"))
        self._check_capabilities()
        for grant in dict.fromkeys(grants):
            self._probe(grant)

    def _probe(self, grant: ScopeGrant) -> None:
        """Issue and revoke one short-lived token for `grant`.

        Raises:
            VaultUnavailableError: either call failed; the message names the
                scope's policies.

        Side Effects:
            Creates and revokes a token in Vault.
        """
        try:
            probe = self.issue(PROBE_STEP_ID, grant, ttl_seconds=PROBE_TTL_SECONDS)
            self.revoke(probe.accessor)
        except VaultUnavailableError as exc:
            policies = ", ".join(grant.policies)
            msg = f"the engine cannot issue a token for the scope policies [{policies}]: {exc}"
            raise VaultUnavailableError(msg) from exc

    def issue(self, step_id: str, grant: ScopeGrant, *, ttl_seconds: int) -> IssuedToken:
        """Mint a child token holding exactly the grant's policies.

        The request asks for: the grant's policies and no default policy, a
        non-renewable service token with `ttl` = `explicit_max_ttl` =
        min(grant TTL, `ttl_seconds`) so no renewal can extend it, the
        grant's use count, a parent (the engine token: revoking it revokes
        every step token), `step_id` as metadata and `haios-<step_id>` as
        display name. The response is then checked against the request; a
        token that differs is revoked and refused (fail closed).

        Args:
            step_id: the step's id.
            grant: the scope's grant.
            ttl_seconds: upper bound of the TTL (the step's timeout).

        Returns:
            The verified token.

        Raises:
            VaultUnavailableError: Vault refused, could not be reached, or
                issued a token that differs from the request.
            InternalError: an empty `step_id` or `ttl_seconds` < 1.

        Side Effects:
            Creates a token in Vault (and revokes it if it is refused).
        """
        if not step_id:
            raise InternalError("a step token needs a step id")
        ttl = effective_ttl_seconds(grant, ttl_seconds)
        response = self._call("token create", lambda: self._create(step_id, grant, ttl))
        auth = self._verified(response, lambda a: auth_mismatch(a, grant, ttl), ttl)
        return IssuedToken(auth.accessor, auth.token, auth.lease_seconds)

    def revoke(self, accessor: str) -> None:
        """Revoke a token and its children by accessor.

        An accessor Vault no longer knows (already revoked or expired) counts
        as revoked: Vault answers it with a warning, not an error.

        Args:
            accessor: the token's accessor.

        Raises:
            VaultUnavailableError: the revocation failed or could not be sent.
            InternalError: an empty accessor.

        Side Effects:
            Revokes the token in Vault.
        """
        if not accessor:
            raise InternalError("cannot revoke an empty accessor")
        self._call(
            "token revoke by accessor",
            lambda: self._client.auth.token.revoke_accessor(accessor),
        )

    def is_live(self, accessor: str) -> bool:
        """Whether Vault still holds a token with this accessor.

        Args:
            accessor: the accessor to look up.

        Returns:
            True if Vault returns the token; False if it answers 400 (unknown
            accessor: revoked or expired).

        Raises:
            VaultUnavailableError: any other failure; never guessed.
            InternalError: an empty accessor.

        Side Effects:
            Looks the accessor up in Vault.
        """
        if not accessor:
            raise InternalError("cannot look up an empty accessor")
        result = self._attempt(lambda: self._client.auth.token.lookup_accessor(accessor))
        if isinstance(result, _ScrubbedVaultError):
            if result.status == _INVALID_REQUEST:  # Vault's "invalid accessor"
                return False
            raise self._error("token lookup by accessor", result) from result
        data = json_object(json_object(result, "lookup-accessor response").get("data"), "data")
        return data.get("accessor") == accessor

    # -- hvac calls --------------------------------------------------------------

    def _lookup_self(self) -> object:
        """Look the engine token up (its own data, including its policies)."""
        return self._client.auth.token.lookup_self()

    def _create(self, step_id: str, grant: ScopeGrant, ttl: int) -> object:
        """Send the token-create request (the role path when a role is set)."""
        return self._client.auth.token.create(
            role_name=self._role,
            policies=list(grant.policies),
            meta={"step_id": step_id},
            no_parent=False,
            no_default_policy=True,
            renewable=False,
            ttl=f"{ttl}s",
            explicit_max_ttl=f"{ttl}s",
            type="service",
            display_name=f"haios-{step_id}",
            num_uses=grant.num_uses,
        )

    def _create_session(self, run_id: str, ttl: int) -> object:
        """Send the session-create request: no policies named, so the engine's are copied."""
        return self._client.auth.token.create(
            meta={"run_id": run_id},
            no_parent=False,
            renewable=False,
            ttl=f"{ttl}s",
            explicit_max_ttl=f"{ttl}s",
            type="service",
            display_name=f"haios-run-{run_id}",
            num_uses=0,
        )

    def _check_capabilities(self) -> None:
        """Refuse an engine token that cannot create or revoke step tokens.

        Raises:
            VaultUnavailableError: a capability is missing (named in the message).

        Side Effects:
            Calls `sys/capabilities-self`.
        """
        create_path = _CREATE_PATH if self._role is None else f"{_CREATE_PATH}/{self._role}"
        paths = [create_path, _REVOKE_ACCESSOR_PATH]
        response = self._call(
            "capability check of the engine token",
            lambda: self._client.sys.get_capabilities(paths=paths),
            _TOKEN_HINT,
        )
        data = json_object(json_object(response, "capabilities response").get("data"), "data")
        for path, wanted in (
            (create_path, {"create", "update"}),
            (_REVOKE_ACCESSOR_PATH, {"update"}),
        ):
            held = set(json_strings(data.get(path), f"capabilities of {path}"))
            if "root" not in held and ("deny" in held or not wanted & held):
                needed = " or ".join(sorted(wanted))
                raise VaultUnavailableError(
                    f"the engine token lacks {needed} on {path}; see docs/vault.md"
                )

    def _verified(
        self, response: object, mismatch_of: Callable[[TokenAuth], str | None], ttl: int
    ) -> TokenAuth:
        """Check a create answer against the request; refuse what differs.

        Args:
            response: hvac's answer to the create request.
            mismatch_of: how the token differs from the request, or None.
            ttl: the TTL asked for (for the message if revocation fails).

        Returns:
            The typed, verified fields.

        Raises:
            VaultUnavailableError: the answer is malformed or the token is
                not the one asked for; a token that exists is revoked first.

        Side Effects:
            Revokes the token in Vault when it is refused.
        """
        block = json_object(
            json_object(response, "token create response").get("auth"), "auth block"
        )
        try:
            auth = parse_auth(block)
        except VaultUnavailableError as exc:
            accessor = block.get("accessor")
            if not isinstance(accessor, str) or not accessor:
                raise  # nothing to revoke by; it dies at its TTL
            mismatch = str(exc)
        else:
            why = mismatch_of(auth)
            if why is None:
                return auth
            accessor, mismatch = auth.accessor, why
        self._refuse(accessor, mismatch, ttl)

    def _refuse(self, accessor: str, mismatch: str, ttl: int) -> NoReturn:
        """Revoke a token that differs from the request, then refuse it.

        Raises:
            VaultUnavailableError: always.

        Side Effects:
            Revokes the token in Vault.
        """
        try:
            self.revoke(accessor)
        except VaultUnavailableError:
            fate = f"revoking it failed; it expires within {ttl}s (accessor {accessor})"
        else:
            fate = "it was revoked"
        raise VaultUnavailableError(
            f"Vault issued a token other than requested ({mismatch}); {fate}"
        )

    # -- error translation ---------------------------------------------------------

    def _attempt(self, request: Callable[[], object]) -> object:
        """Run one hvac call; return its result or a scrubbed failure.

        The failure is returned, not raised, so the caller raises the haios
        error outside this `except` block: the hvac exception then does not
        ride along as `__context__` (it holds the response and the request
        with the token header).

        Args:
            request: the hvac call.

        Returns:
            hvac's result, or a `_ScrubbedVaultError`.

        Side Effects:
            Whatever the call does (network I/O to Vault).
        """
        with self._lock:
            try:
                return request()
            except hvac.exceptions.VaultError as exc:
                return _ScrubbedVaultError(
                    _STATUS_OF.get(type(exc)),
                    scrub(_server_text(exc), self._token),
                    type(exc).__name__,
                )
            except requests.exceptions.RequestException as exc:
                return _ScrubbedVaultError(
                    None, _transport_reason(exc, self._timeout_seconds), type(exc).__name__
                )

    def _call(self, operation: str, request: Callable[[], object], hint: str = "") -> object:
        """Run one hvac call; raise the haios error when it fails.

        Args:
            operation: what the call does, for the message.
            request: the hvac call.
            hint: what to check, appended to the message of an HTTP 403.

        Returns:
            hvac's result.

        Raises:
            VaultUnavailableError: the call failed (scrubbed reason inside).

        Side Effects:
            Network I/O to Vault.
        """
        result = self._attempt(request)
        if isinstance(result, _ScrubbedVaultError):
            raise self._error(operation, result, hint) from result
        return result

    def _error(
        self, operation: str, failure: _ScrubbedVaultError, hint: str = ""
    ) -> VaultUnavailableError:
        """The haios error for a failed call.

        Args:
            operation: what the call did.
            failure: the scrubbed failure.
            hint: appended when Vault answered 403.

        Returns:
            The error to raise (its message carries no token).
        """
        status = "" if failure.status is None else f"HTTP {failure.status}: "
        extra = f" ({hint})" if hint and failure.status == _FORBIDDEN else ""
        return VaultUnavailableError(
            f"Vault {operation} failed at {self._addr}: {status}{failure.reason}{extra}"
        )


# -- exception texts -------------------------------------------------------------------


def _server_text(exc: BaseException) -> str:
    """The server's error text carried by an hvac exception (unscrubbed).

    Args:
        exc: an hvac `VaultError`.

    Returns:
        Its `errors` joined, else its message; never its URL or body alone.
    """
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and all(isinstance(item, str) for item in errors):
        return "; ".join(errors)
    return str(exc.args[0]) if exc.args and exc.args[0] is not None else ""


def _transport_reason(exc: requests.exceptions.RequestException, timeout_seconds: float) -> str:
    """A fixed reason for a transport failure (no exception text).

    Args:
        exc: the requests exception.
        timeout_seconds: the configured timeout, for the message.

    Returns:
        A short reason; exception texts are not used because they can hold
        URLs and proxy settings, and are long.
    """
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake or certificate verification failed"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"connection timed out after {timeout_seconds:g}s"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {timeout_seconds:g}s"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection refused or reset (is Vault running?)"
    return f"request failed ({type(exc).__name__})"
