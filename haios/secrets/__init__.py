# SPDX-License-Identifier: Apache-2.0
"""Per-step Vault/OpenBao tokens behind a Protocol (contract sections 9, 11, 12).

Public names:

- `SecretProvider`, `ScopeGrant`, `IssuedToken`, `VaultSession`: the seam
  (provider.py).
- `HvacProvider`, `provider_from_environment`: the hvac backend (_hvac.py),
  imported on first use so that a run without Vault scopes never loads hvac.
- `write_token_into`: the step's token file in its secret filesystem
  (tokenfile.py).
- `revoke_leftovers`: retrying failed revocations (journal.py).

Importing this package does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from haios.secrets.journal import LeftoverRevocation, revoke_leftovers
from haios.secrets.provider import IssuedToken, ScopeGrant, SecretProvider, VaultSession
from haios.secrets.tokenfile import TOKEN_FILE_NAME, write_token_into

if TYPE_CHECKING:
    from haios.secrets._hvac import HvacProvider

__all__ = [
    "TOKEN_FILE_NAME",
    "HvacProvider",
    "IssuedToken",
    "LeftoverRevocation",
    "ScopeGrant",
    "SecretProvider",
    "VaultSession",
    "provider_from_environment",
    "revoke_leftovers",
    "write_token_into",
]


def provider_from_environment(
    env: Mapping[str, str], *, token_role: str | None = None
) -> HvacProvider:
    """The hvac-backed provider configured from `VAULT_*` variables.

    Args:
        env: the environment to read (normally `os.environ`).
        token_role: mint step tokens through this Vault token role.

    Returns:
        A provider; nothing has been sent to Vault yet (call `preflight`).

    Raises:
        VaultUnavailableError: `VAULT_ADDR` or `VAULT_TOKEN` is missing, or a
            setting is unsafe.
    """
    from haios.secrets._hvac import HvacProvider  # hvac loads only when used

    return HvacProvider.from_environment(env, token_role=token_role)


def __getattr__(name: str) -> object:
    """Load `HvacProvider` on first use (hvac and requests take ~150 ms to import).

    Args:
        name: the attribute asked for.

    Returns:
        The class asked for.

    Raises:
        AttributeError: any other name.
    """
    if name == "HvacProvider":
        from haios.secrets._hvac import HvacProvider  # see docstring

        return HvacProvider
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
