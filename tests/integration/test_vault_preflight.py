# SPDX-License-Identifier: Apache-2.0
"""Preflight against a real OpenBao dev server (threats T-V07, T-V10; catalog 83).

Attacker or accident: Vault down or unset, a wrong, weak, batch or
use-limited engine token, or a scope the engine cannot grant. Expected:
VaultUnavailableError (exit 6) before any step runs, with a message that
names the problem and never carries a token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from haios.errors import EXIT_ENVIRONMENT, VaultUnavailableError
from haios.secrets import HvacProvider, ScopeGrant, provider_from_environment
from tests.support.openbao import (
    ENGINE_POLICY,
    OTHER_POLICY,
    REPORTS_POLICY,
    OpenBaoServer,
    assert_no_secret,
)

pytest_plugins = ("tests.support.openbao",)

REPORTS = ScopeGrant((REPORTS_POLICY,), ttl_seconds=120)
CREATE_ONLY_HCL = 'path "auth/token/create" { capabilities = ["update", "sudo"] }'
REVOKE_ONLY_HCL = 'path "auth/token/revoke-accessor" { capabilities = ["update"] }'
NO_SUDO_HCL = (
    'path "auth/token/create" { capabilities = ["update"] }\n'
    'path "auth/token/revoke-accessor" { capabilities = ["update"] }\n'
)


def _refused(provider: HvacProvider, grants: list[ScopeGrant], *secrets: str) -> str:
    with pytest.raises(VaultUnavailableError) as caught:
        provider.preflight(grants)
    assert caught.value.exit_code == EXIT_ENVIRONMENT
    assert_no_secret(caught.value, *secrets)
    return str(caught.value)


def test_engine_token_with_the_documented_policy_passes(openbao: OpenBaoServer) -> None:
    engine = openbao.create_token([ENGINE_POLICY])
    env = {"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": engine}
    provider = provider_from_environment(env)

    provider.preflight([REPORTS, ScopeGrant((REPORTS_POLICY, OTHER_POLICY), 60, num_uses=3)])
    provider.close()


def test_unset_vault_addr_fails_before_any_request(openbao: OpenBaoServer) -> None:
    with pytest.raises(VaultUnavailableError, match="VAULT_ADDR is not set") as caught:
        provider_from_environment({"VAULT_TOKEN": openbao.root_token})
    assert_no_secret(caught.value, openbao.root_token)


def test_vault_down_fails_cleanly(openbao_factory: Callable[[], OpenBaoServer]) -> None:
    server = openbao_factory()
    engine = server.create_token([ENGINE_POLICY])
    server.stop()

    message = _refused(HvacProvider(server.addr, engine), [REPORTS], engine, server.root_token)
    assert "connection refused" in message


def test_bad_engine_token_is_refused(openbao: OpenBaoServer) -> None:
    bad = "s.NotAValidTokenAtAll0123"
    message = _refused(HvacProvider(openbao.addr, bad), [REPORTS], bad)
    assert "HTTP 403" in message
    assert "VAULT_TOKEN" in message


def test_revoked_engine_token_is_refused(openbao: OpenBaoServer) -> None:
    engine = openbao.create_token([ENGINE_POLICY])
    openbao.client().auth.token.revoke(engine)

    assert "HTTP 403" in _refused(HvacProvider(openbao.addr, engine), [], engine)


@pytest.mark.parametrize(
    ("hcl", "expected"),
    [
        pytest.param(REVOKE_ONLY_HCL, "lacks create or update on auth/token/create", id="create"),
        pytest.param(CREATE_ONLY_HCL, "lacks update on auth/token/revoke-accessor", id="revoke"),
    ],
)
def test_engine_token_lacking_a_capability_is_refused(
    openbao: OpenBaoServer, hcl: str, expected: str
) -> None:
    name = f"weak-{abs(hash(hcl))}"
    openbao.write_policy(name, hcl)
    engine = openbao.create_token([name])

    assert expected in _refused(HvacProvider(openbao.addr, engine), [REPORTS], engine)


def test_scope_the_engine_cannot_grant_is_found_by_the_probe(openbao: OpenBaoServer) -> None:
    openbao.write_policy("engine-no-sudo", NO_SUDO_HCL)
    engine = openbao.create_token(["engine-no-sudo"])
    provider = HvacProvider(openbao.addr, engine)

    provider.preflight([])  # capabilities alone look fine...
    message = _refused(provider, [REPORTS], engine)  # ...but the scope cannot be granted
    assert "subset of parent" in message


def test_probe_tokens_do_not_outlive_preflight(openbao: OpenBaoServer) -> None:
    engine = openbao.create_token([ENGINE_POLICY])
    before = set(openbao.client().list("auth/token/accessors")["data"]["keys"])

    HvacProvider(openbao.addr, engine).preflight([REPORTS])

    after = set(openbao.client().list("auth/token/accessors")["data"]["keys"])
    assert after == before


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        pytest.param({"token_type": "batch"}, "type 'batch'", id="batch"),
        pytest.param({"num_uses": 50}, "use limit", id="use-limited"),
    ],
)
def test_engine_token_unfit_for_a_whole_run_is_refused(
    openbao: OpenBaoServer, kind: dict[str, Any], expected: str
) -> None:
    engine = openbao.create_token([ENGINE_POLICY], **kind)

    assert expected in _refused(HvacProvider(openbao.addr, engine), [REPORTS], engine)


def test_engine_token_without_the_default_policy_gets_a_clear_refusal(
    openbao: OpenBaoServer,
) -> None:
    engine = openbao.create_token([ENGINE_POLICY], no_default_policy=True)

    message = _refused(HvacProvider(openbao.addr, engine), [REPORTS], engine)
    assert "lookup of the engine token" in message
    assert "HTTP 403" in message
