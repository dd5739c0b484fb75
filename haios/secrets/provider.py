# SPDX-License-Identifier: Apache-2.0
"""The seam between the engine and the Vault/OpenBao backend: a Protocol and its values.

`SecretProvider` is what the engine calls to mint, revoke and check per-step
tokens; `ScopeGrant` is what a `[vault_scopes.<name>]` entry of the policy
grants; `IssuedToken` carries a minted token without ever showing it;
`VaultSession` is a run's parent token with the provider that issues under it.

This module does no I/O except `IssuedToken.write_to`, which writes to a file
descriptor the caller opened. It does not talk to Vault (see `_hvac.py`) and
does not parse the policy file (the engine does, then builds `ScopeGrant`s).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import urllib.parse
from collections.abc import Collection
from typing import NoReturn, Protocol

from haios.errors import InternalError, PolicyLoadError

#: policies a scope may never grant: `root` is every capability, and `default`
#: would give the step lookup-self, cubbyhole and more than the scope names
#: (the contract asks for a token limited to the scope's policies).
FORBIDDEN_POLICIES = frozenset({"root", "default"})

#: what `IssuedToken.redact` puts in place of every encoding of the token.
REDACTED = b"***"


@dataclasses.dataclass(frozen=True)
class ScopeGrant:
    """What one `[vault_scopes.<name>]` policy entry grants to a step.

    Invariants are checked on construction, so a grant built in code is as
    safe as one parsed from the policy. An empty policy list is refused:
    Vault would give the child token *all of its parent's* policies.

    Attributes:
        policies: Vault policy names the step token gets, and no others.
        ttl_seconds: upper bound of the token's lifetime, in seconds (>= 1).
        num_uses: how many requests the token may make; 0 means unlimited
            within the TTL.
    """

    policies: tuple[str, ...]
    ttl_seconds: int
    num_uses: int = 0

    def __post_init__(self) -> None:
        """Refuse grants that would widen the token.

        Raises:
            PolicyLoadError: empty, duplicate, blank or forbidden policy
                names, a TTL below one second, or a negative use count.
        """
        if not self.policies:
            _invalid_scope("policies must name at least one Vault policy")
        for name in self.policies:
            if not name.strip() or name != name.strip():
                _invalid_scope("policy names must be non-blank strings without edge spaces")
            if name in FORBIDDEN_POLICIES:
                _invalid_scope(f"policy {name!r} may not be granted to a step")
            if "*" in name:
                _invalid_scope(f"policy {name!r}: wildcards are not allowed")
        if len(set(self.policies)) != len(self.policies):
            _invalid_scope("policies must not repeat")
        if isinstance(self.ttl_seconds, bool) or self.ttl_seconds < 1:
            _invalid_scope("ttl_seconds must be an integer >= 1")
        if isinstance(self.num_uses, bool) or self.num_uses < 0:
            _invalid_scope("num_uses must be an integer >= 0")


def _invalid_scope(why: str) -> NoReturn:
    """Raise the error for an invalid Vault scope.

    Args:
        why: which rule the scope breaks (no secret values).

    Raises:
        PolicyLoadError: always; a scope comes from the operator's policy.
    """
    raise PolicyLoadError(f"invalid vault scope: {why}")


def effective_ttl_seconds(grant: ScopeGrant, ttl_seconds: int) -> int:
    """The TTL a step token gets: the scope's, bounded by the caller's.

    Args:
        grant: the scope's grant.
        ttl_seconds: the caller's bound, normally the step's wall timeout
            rounded up to whole seconds.

    Returns:
        min(grant.ttl_seconds, ttl_seconds).

    Raises:
        InternalError: `ttl_seconds` is below 1 (a caller bug: a token with no
            lifetime cannot be issued).
    """
    if isinstance(ttl_seconds, bool) or ttl_seconds < 1:
        raise InternalError("token TTL bound must be an integer >= 1 second")
    return min(grant.ttl_seconds, ttl_seconds)


class IssuedToken:
    """A minted step token: the accessor is public, the token never shows.

    The accessor can look up and revoke the token but cannot act as it, so it
    may be recorded in state, audit and logs; the token may not. `repr`, `str`,
    pickling and copying never reveal it (threat T-V03). The only ways out are
    `write_to` (the token file) and `redact` (masking output).

    Attributes:
        accessor: the token's accessor.
        ttl_seconds: the lifetime Vault granted, in seconds.
    """

    __slots__ = ("_token", "accessor", "ttl_seconds")

    def __init__(self, accessor: str, token: str, ttl_seconds: int) -> None:
        """Wrap a token Vault issued.

        Args:
            accessor: the token's accessor (non-empty).
            token: the token itself (non-empty, printable ASCII).
            ttl_seconds: the lifetime Vault granted, in seconds.

        Raises:
            InternalError: an empty accessor or token, or a token with
                characters that cannot travel in an HTTP header or a file line.
        """
        if not accessor or not token:
            raise InternalError("an issued token needs both an accessor and a token")
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            # A newline or space would break the one-line token file contract
            # and hvac's header; refuse rather than deliver a broken token.
            raise InternalError("Vault returned a token with unexpected characters")
        self.accessor = accessor
        self.ttl_seconds = ttl_seconds
        self._token = token.encode("ascii")

    def __repr__(self) -> str:
        """Show the accessor only."""
        return f"IssuedToken(accessor={self.accessor!r}, token=<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        """Refuse pickling and copying, which would carry the token along.

        Raises:
            TypeError: always.
        """
        msg = "IssuedToken cannot be pickled or copied"
        raise TypeError(msg)

    def write_to(self, fd: int) -> None:
        """Write the token, alone and without a newline, to an open file.

        Args:
            fd: a file descriptor opened for writing.

        Raises:
            OSError: the write failed (the caller translates it).

        Side Effects:
            Writes the token's bytes to `fd`.
        """
        view = memoryview(self._token)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def redact(self, data: bytes) -> bytes:
        """Mask every common encoding of the token in `data`.

        Masks the raw value and its base64, base64url, hex and URL-encoded
        forms (the encodings the leak scan looks for). Masking is best effort:
        a step that owns the token can always transform it further.

        Args:
            data: bytes that may contain the token (a log, a message).

        Returns:
            `data` with each occurrence replaced by `REDACTED`.
        """
        for form in _encodings(self._token):
            data = data.replace(form, REDACTED)
        return data

    def appears_in(self, data: bytes) -> bool:
        """Whether any common encoding of the token occurs in `data`.

        Args:
            data: bytes to scan.

        Returns:
            True when `redact` would change `data`.
        """
        return any(form in data for form in _encodings(self._token))


def _encodings(token: bytes) -> tuple[bytes, ...]:
    """The forms of `token` a scan should catch, longest first.

    Args:
        token: the raw token bytes.

    Returns:
        Distinct encodings; longest first so a longer form is masked before
        a shorter one could break it apart.
    """
    forms = {
        token,
        base64.b64encode(token),
        base64.b64encode(token).rstrip(b"="),
        base64.urlsafe_b64encode(token).rstrip(b"="),
        binascii.hexlify(token),
        binascii.hexlify(token).upper(),
        urllib.parse.quote(token, safe="").encode("ascii"),
    }
    return tuple(sorted(forms, key=len, reverse=True))


@dataclasses.dataclass(frozen=True)
class VaultSession:
    """A run's parent token: revoking `accessor` revokes all its step tokens.

    Attributes:
        accessor: the session token's accessor (record it durably).
        ttl_seconds: the lifetime Vault granted the session token.
        provider: issues and revokes the run's step tokens under the session.
    """

    accessor: str
    ttl_seconds: int
    provider: SecretProvider


class SecretProvider(Protocol):
    """Mints, revokes and checks per-step Vault tokens. Thread-safe.

    Every method raises only haios errors; none puts a token in a message.
    """

    def preflight(self, grants: Collection[ScopeGrant] = ()) -> None:
        """Check, before any step runs, that tokens can be issued and revoked.

        Args:
            grants: the scopes the plan will use; each is proven by issuing
                and revoking a short-lived probe token. Empty: only the
                engine token and its capabilities are checked.

        Raises:
            VaultUnavailableError: Vault is unreachable, the engine token is
                invalid, or it cannot create or revoke the tokens needed.

        Side Effects:
            Calls Vault; may create and revoke one probe token per grant.
        """
        ...

    def issue(self, step_id: str, grant: ScopeGrant, *, ttl_seconds: int) -> IssuedToken:
        """Mint a token for one step, limited to the grant.

        Args:
            step_id: the step's id (token metadata and display name).
            grant: the scope's policies, TTL and use count.
            ttl_seconds: upper bound of the TTL (the step's timeout, rounded up).

        Returns:
            The token, verified to be what was asked for.

        Raises:
            VaultUnavailableError: Vault refused or could not be reached, or
                issued a token other than the one asked for (then revoked).
            InternalError: `ttl_seconds` < 1 or an empty `step_id`.

        Side Effects:
            Creates a child token of the engine token in Vault.
        """
        ...

    def revoke(self, accessor: str) -> None:
        """Revoke a token (and any children) by accessor; idempotent.

        Args:
            accessor: the accessor `issue` returned.

        Raises:
            VaultUnavailableError: the revocation could not be confirmed.

        Side Effects:
            Revokes the token in Vault.
        """
        ...

    def is_live(self, accessor: str) -> bool:
        """Whether Vault still knows a token by this accessor.

        Args:
            accessor: the accessor to look up.

        Returns:
            False when Vault reports the accessor unknown (revoked or expired).

        Raises:
            VaultUnavailableError: Vault could not answer; the answer is
                never guessed.

        Side Effects:
            Looks the accessor up in Vault.
        """
        ...

    def open_session(self, run_id: str, *, ttl_seconds: int = ...) -> VaultSession:
        """Create the run's parent token and a provider issuing under it.

        Args:
            run_id: the run's id (token metadata and display name).
            ttl_seconds: the session's lifetime, in seconds.

        Returns:
            The session; record its accessor before issuing step tokens.

        Raises:
            VaultUnavailableError: Vault refused or could not be reached.
            InternalError: an empty `run_id` or `ttl_seconds` < 1.

        Side Effects:
            Creates a child token of the engine token in Vault.
        """
        ...

    def close(self) -> None:
        """Release connections; the provider is not used afterwards.

        Side Effects:
            Closes network connections.
        """
        ...
