# SPDX-License-Identifier: Apache-2.0
"""Retrying leftover revocations (contract section 12; attack catalog 80, 107).

Uses a fake provider of the `SecretProvider` protocol whose Vault "fails"
a given number of times; the real-server behaviour is in
tests/integration/test_vault_tokens.py.
"""

from __future__ import annotations

from collections.abc import Collection

import pytest

from haios.errors import InternalError, VaultUnavailableError
from haios.secrets import (
    IssuedToken,
    ScopeGrant,
    SecretProvider,
    VaultSession,
    revoke_leftovers,
)


class FlakyProvider:
    """Revocation fails `failures[accessor]` times, then succeeds."""

    def __init__(self, failures: dict[str, int]) -> None:
        self.failures = dict(failures)
        self.calls: list[str] = []

    def preflight(self, grants: Collection[ScopeGrant] = ()) -> None:
        """Not used here."""

    def issue(self, step_id: str, grant: ScopeGrant, *, ttl_seconds: int) -> IssuedToken:
        raise NotImplementedError

    def revoke(self, accessor: str) -> None:
        self.calls.append(accessor)
        if self.failures.get(accessor, 0) > 0:
            self.failures[accessor] -= 1
            raise VaultUnavailableError("Vault token revoke by accessor failed: connection refused")

    def is_live(self, accessor: str) -> bool:
        raise NotImplementedError

    def open_session(self, run_id: str, *, ttl_seconds: int = 60) -> VaultSession:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release."""


def test_leftovers_are_retried_until_vault_answers() -> None:
    provider: SecretProvider = FlakyProvider({"b": 2})
    pauses: list[float] = []

    result = revoke_leftovers(
        provider, ["a", "b"], attempts=3, backoff_seconds=0.5, sleep=pauses.append
    )

    assert result.revoked == ("a", "b")
    assert result.failed == ()
    assert pauses == [0.5, 1.0]


def test_leftovers_still_failing_are_reported_for_the_next_run() -> None:
    provider = FlakyProvider({"b": 10})

    revoked, failed = revoke_leftovers(provider, ["a", "b", "c"], attempts=2, sleep=lambda _: None)

    assert (revoked, failed) == (("a", "c"), ("b",))
    assert provider.calls == ["a", "b", "c", "b"]  # only failures are retried


def test_duplicate_accessors_are_revoked_once() -> None:
    provider = FlakyProvider({})

    result = revoke_leftovers(provider, ["a", "a", "b", "a"], sleep=lambda _: None)

    assert result.revoked == ("a", "b")
    assert provider.calls == ["a", "b"]


def test_no_leftovers_means_no_vault_call_and_no_pause() -> None:
    provider = FlakyProvider({})
    pauses: list[float] = []

    assert revoke_leftovers(provider, [], sleep=pauses.append) == ((), ())
    assert provider.calls == []
    assert pauses == []


def test_zero_attempts_is_a_bug() -> None:
    with pytest.raises(InternalError):
        revoke_leftovers(FlakyProvider({}), ["a"], attempts=0)
