# SPDX-License-Identifier: Apache-2.0
"""Pure checks of Vault settings and of what Vault answers.

`HvacProvider` (`_hvac.py`) sends requests; this module decides whether the
address is acceptable, whether an answer has the shape and the values that
were asked for, and how server text is made safe to show. hvac returns
untyped JSON, so every value is type-checked here before use.

No I/O, except one log line when an unsafe plaintext address is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import urllib.parse
from collections.abc import Mapping
from typing import Final

from haios._util.net import is_loopback_host
from haios.errors import VaultUnavailableError
from haios.secrets.provider import ScopeGrant

#: what replaces a secret in text shown to people
REDACTED: Final = "<redacted>"
#: longest server text kept in a message
MESSAGE_LIMIT_CHARS: Final = 200

# Any word long enough to be a credential and mixing letters and digits is
# masked in server text: a broken or hostile server (or a proxy) may echo the
# request token in any encoding (threat T-V05, attack catalog case 83).
_WORD: Final = re.compile(r"[A-Za-z0-9+/=_.-]{16,}")
_MULTIERROR_PREFIX: Final = re.compile(r"^\d+ errors? occurred:\s*")
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenAuth:
    """The fields of a token-create answer that `HvacProvider.issue` verifies.

    Internal only: it is turned into an `IssuedToken` at once. The token is
    kept out of the dataclass repr all the same (threat T-V03).
    """

    token: str = dataclasses.field(repr=False)
    accessor: str
    policies: tuple[str, ...]
    token_policies: tuple[str, ...] | None
    lease_seconds: int
    renewable: bool
    token_type: str
    orphan: bool
    num_uses: int | None


def checked_addr(addr: str, *, allow_plaintext_http: bool) -> str:
    """Validate Vault's address.

    Args:
        addr: the address as configured.
        allow_plaintext_http: accept `http://` to a non-loopback host.

    Returns:
        The address without a trailing slash.

    Raises:
        VaultUnavailableError: not http(s), no host, user info or a path in
            it, or plaintext HTTP to a non-loopback host.

    Side Effects:
        Logs a warning each time plaintext HTTP to a remote host is allowed.
    """
    try:
        parts = urllib.parse.urlsplit(addr.strip())
        host = parts.hostname
    except ValueError as exc:
        raise VaultUnavailableError("VAULT_ADDR is not a valid URL") from exc
    if parts.scheme not in {"http", "https"} or not host:
        raise VaultUnavailableError("VAULT_ADDR must be an http(s)://host:port address")
    if parts.username or parts.password or parts.path.strip("/") or parts.query:
        raise VaultUnavailableError("VAULT_ADDR must not carry credentials, a path or a query")
    if parts.scheme == "http" and not is_loopback_host(host):
        # The engine token would cross the network in clear (threat T-V06).
        if not allow_plaintext_http:
            raise VaultUnavailableError("VAULT_ADDR uses plaintext http:// to a non-loopback host")
        _log.warning("UNSAFE: Vault at %s is reached over plaintext http://", host)
    return f"{parts.scheme}://{parts.netloc}"


def check_engine_token(data: Mapping[str, object]) -> None:
    """Refuse an engine token that cannot serve a whole run.

    Args:
        data: the `data` of lookup-self (it holds the token id: never shown).

    Raises:
        VaultUnavailableError: a batch token or a use-limited token.
    """
    token_type = data.get("type")
    if token_type != "service":
        raise VaultUnavailableError(
            f"the engine token is of type {token_type!r}; a service token is needed to "
            "create revocable child tokens"
        )
    if data.get("num_uses") not in (0, None):
        raise VaultUnavailableError("the engine token has a use limit; it would run out mid-run")


def parse_auth(auth: Mapping[str, object]) -> TokenAuth:
    """Type the `auth` block of a token-create response.

    Args:
        auth: the block, as parsed JSON.

    Returns:
        The typed fields.

    Raises:
        VaultUnavailableError: a field is missing or of the wrong type, or
            the token has characters a token file or header cannot carry.
    """
    token = json_string(auth.get("client_token"), "client_token")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise VaultUnavailableError("Vault returned a malformed client_token")
    token_policies = auth.get("token_policies")
    num_uses = auth.get("num_uses")
    return TokenAuth(
        token=token,
        accessor=json_string(auth.get("accessor"), "accessor"),
        policies=json_strings(auth.get("policies"), "policies"),
        token_policies=None if token_policies is None else json_strings(token_policies, "policies"),
        lease_seconds=json_integer(auth.get("lease_duration"), "lease_duration"),
        renewable=auth.get("renewable") is True,
        token_type=json_string(auth.get("token_type"), "token_type"),
        orphan=auth.get("orphan") is True,
        num_uses=None if num_uses is None else json_integer(num_uses, "num_uses"),
    )


def auth_mismatch(auth: TokenAuth, grant: ScopeGrant, ttl: int) -> str | None:
    """How an issued step token differs from the request, or None.

    Args:
        auth: the issued token's fields.
        grant: what was asked for.
        ttl: the TTL asked for.

    Returns:
        A short reason naming the first difference (no secret), or None.
    """
    wanted = sorted(grant.policies)
    checks = (
        (sorted(auth.policies) == wanted, f"policies {sorted(auth.policies)} != {wanted}"),
        (
            auth.token_policies is None or sorted(auth.token_policies) == wanted,
            "token_policies differ from the scope's policies",
        ),
        (
            auth.num_uses is None or auth.num_uses == grant.num_uses,
            f"num_uses {auth.num_uses} != {grant.num_uses}",
        ),
    )
    found = next((why for ok, why in checks if not ok), None)
    return found or lifetime_mismatch(auth, ttl)


def lifetime_mismatch(auth: TokenAuth, ttl: int) -> str | None:
    """How a token's type, parentage or lifetime differs from the request.

    Every token haios creates is a non-renewable service child with a TTL
    of at most `ttl`.

    Args:
        auth: the issued token's fields.
        ttl: the TTL asked for.

    Returns:
        A short reason naming the first difference, or None.
    """
    checks = (
        (not auth.renewable, "token is renewable"),
        (auth.token_type == "service", f"token type {auth.token_type!r} is not 'service'"),
        (not auth.orphan, "token is an orphan (not a child of the engine token)"),
        (1 <= auth.lease_seconds <= ttl, f"TTL {auth.lease_seconds}s outside 1..{ttl}s"),
    )
    return next((why for ok, why in checks if not ok), None)


def _mask_if_secretish(match: re.Match[str]) -> str:
    """Mask a long word that mixes letters and digits (a token's shape)."""
    word = match.group(0)
    if any(c.isdigit() for c in word) and any(c.isalpha() for c in word):
        return REDACTED
    return word


def json_object(value: object, what: str) -> Mapping[str, object]:
    """`value` as a JSON object, or a VaultUnavailableError naming `what`."""
    if not isinstance(value, dict):
        raise VaultUnavailableError(f"Vault returned a malformed {what}")
    return value


def json_string(value: object, what: str) -> str:
    """`value` as a non-empty string, or a VaultUnavailableError naming `what`."""
    if not isinstance(value, str) or not value:
        raise VaultUnavailableError(f"Vault returned a malformed {what}")
    return value


def json_strings(value: object, what: str) -> tuple[str, ...]:
    """`value` as a list of strings, or a VaultUnavailableError naming `what`."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise VaultUnavailableError(f"Vault returned malformed {what}")
    return tuple(value)


def json_integer(value: object, what: str) -> int:
    """`value` as an int (not a bool), or a VaultUnavailableError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise VaultUnavailableError(f"Vault returned a malformed {what}")
    return value


def scrub(text: str, secret: str) -> str:
    """Make server text safe to show: no secret, one line, bounded.

    Args:
        text: text from a Vault response (an error message or body).
        secret: a value to remove wherever it occurs (the engine token).

    Returns:
        The text without `secret` or any token-shaped word.
    """
    text = text.replace(secret, REDACTED)
    text = _WORD.sub(_mask_if_secretish, text)
    text = _MULTIERROR_PREFIX.sub("", " ".join(text.split())).replace("* ", "")
    return text[:MESSAGE_LIMIT_CHARS] or "no reason given"
