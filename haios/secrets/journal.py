# SPDX-License-Identifier: Apache-2.0
"""Retrying the revocation of step tokens the engine could not revoke in time.

Contract section 12: a token whose revocation fails is recorded by accessor
in state and audit, retried at the end of the run and at the next run. The
engine owns the durable record (state, audit); this module is the retry it
calls with the recorded accessors, e.g. `revoke_leftovers(provider,
state.pending_accessors)` before the first step of a resumed run.

No I/O of its own: it calls the provider and the injected `sleep`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

from haios.errors import HaiosError, InternalError
from haios.secrets.provider import SecretProvider

DEFAULT_ATTEMPTS: Final = 3
DEFAULT_BACKOFF_SECONDS: Final = 0.5


class LeftoverRevocation(NamedTuple):
    """Which leftover accessors are now revoked, and which still are not.

    Attributes:
        revoked: accessors Vault confirmed revoked (or already gone).
        failed: accessors still pending; keep them recorded and retry later.
    """

    revoked: tuple[str, ...]
    failed: tuple[str, ...]


def revoke_leftovers(
    provider: SecretProvider,
    accessors: Iterable[str],
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> LeftoverRevocation:
    """Revoke each accessor, retrying the failures a few times.

    Revocation by accessor is idempotent (an unknown accessor counts as
    revoked), so retrying and repeating across runs is always safe. Each
    round retries only what failed before, after `backoff_seconds` doubled
    per round. Duplicate accessors are revoked once; order is kept.

    Args:
        provider: the secret provider.
        accessors: accessors recorded as not yet revoked.
        attempts: rounds to try (>= 1).
        backoff_seconds: pause before the second round; doubles each round.
        sleep: how to pause (injected so tests need not wait).

    Returns:
        The revoked and the still-failing accessors.

    Raises:
        InternalError: `attempts` < 1.

    Side Effects:
        Revokes tokens in Vault through `provider`; sleeps between rounds.
    """
    if attempts < 1:
        raise InternalError("revoke_leftovers needs at least one attempt")
    pending = tuple(dict.fromkeys(accessors))
    revoked: list[str] = []
    for round_index in range(attempts):
        if not pending:
            break
        if round_index:
            sleep(backoff_seconds * 2 ** (round_index - 1))
        pending = _revoke_round(provider, pending, revoked)
    return LeftoverRevocation(tuple(revoked), pending)


def _revoke_round(
    provider: SecretProvider, accessors: tuple[str, ...], revoked: list[str]
) -> tuple[str, ...]:
    """Try each accessor once.

    Args:
        provider: the secret provider.
        accessors: what to revoke this round.
        revoked: extended with each accessor revoked now.

    Returns:
        The accessors that failed this round.

    Side Effects:
        Revokes tokens in Vault through `provider`.
    """
    failed: list[str] = []
    for accessor in accessors:
        try:
            provider.revoke(accessor)
        except HaiosError:
            # Expected while Vault is down; the caller keeps it recorded.
            failed.append(accessor)
        else:
            revoked.append(accessor)
    return tuple(failed)
