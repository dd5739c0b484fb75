# SPDX-License-Identifier: Apache-2.0
"""Step tokens against a real OpenBao dev server (threats T-V01, T-V02, T-V08, T-V09).

Attacker: a step that holds its token and tries to read beyond its scope,
mint children or orphans, renew, or keep using the token (or a copy it
leaked) after the step ends. Expected (attack catalog 77-80, 107): only the
scope's paths answer; the token is a non-renewable service child of the
engine token with exactly the scope's policies, a TTL bounded by the step,
the scope's use count; after revocation, lookup by accessor finds nothing
and the token is refused, also when revocation first failed while Vault was
unreachable and was retried later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest

from haios.errors import VaultUnavailableError
from haios.sandbox.stepfs import StepMounts
from haios.secrets import (
    TOKEN_FILE_NAME,
    HvacProvider,
    IssuedToken,
    ScopeGrant,
    revoke_leftovers,
    write_token_into,
)
from tests.support.openbao import (
    ENGINE_POLICY,
    OTHER_POLICY,
    REPORTS_POLICY,
    ROLE_ENGINE_POLICY,
    STEP_ROLE,
    OpenBaoServer,
    OutageProxy,
    assert_no_secret,
)

pytest_plugins = ("tests.support.openbao",)

REPORTS = ScopeGrant((REPORTS_POLICY,), ttl_seconds=120)
DENIED = (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest)


@pytest.fixture
def engine_token(openbao: OpenBaoServer) -> str:
    return openbao.create_token([ENGINE_POLICY])


@pytest.fixture
def provider(openbao: OpenBaoServer, engine_token: str) -> Iterator[HvacProvider]:
    vault = HvacProvider(openbao.addr, engine_token)
    yield vault
    vault.close()


def _deliver(issued: IssuedToken, tmp_path: Path) -> str:
    """Hand the token over as the engine does and read it back as the step would."""
    del tmp_path  # nothing of the token lives under a host path
    mounts = StepMounts.create(65533, 65533, workspace_bytes=1 << 20, workspace_inodes=64,
                               with_secret=True)
    try:
        assert mounts.secret is not None
        write_token_into(mounts.secret.dir.fd, issued, 65533, 65533)
        return Path(f"/proc/self/fd/{mounts.secret.dir.fd}/{TOKEN_FILE_NAME}").read_text()
    finally:
        mounts.close()


def _read(step: Any, path: str) -> dict[str, Any]:
    response = step.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)
    return dict(response["data"]["data"])


def test_scoped_token_reads_its_secret_and_nothing_else(
    openbao: OpenBaoServer, provider: HvacProvider, tmp_path: Path
) -> None:
    issued = provider.issue("s1", REPORTS, ttl_seconds=60)
    step = openbao.client(_deliver(issued, tmp_path))

    assert _read(step, "reports/q1") == {"total": "42"}
    refused: list[Callable[[], object]] = [
        lambda: _read(step, "other/x"),
        lambda: step.sys.list_mounted_secrets_engines(),
        lambda: step.sys.read_policy("haios-engine"),
        lambda: step.list("auth/token/accessors"),
        lambda: step.auth.token.create(policies=[REPORTS_POLICY], ttl="1h"),
        lambda: step.auth.token.create_orphan(policies=[REPORTS_POLICY], ttl="1h"),
        lambda: step.auth.token.create(period="768h"),
        lambda: step.auth.token.lookup_self(),
        lambda: step.auth.token.renew_self(increment="87600h"),
        lambda: step.sys.unwrap(),
    ]
    for attempt in refused:
        with pytest.raises(DENIED):
            attempt()
    provider.revoke(issued.accessor)


def test_token_is_exactly_the_scope_and_not_an_orphan(
    openbao: OpenBaoServer, provider: HvacProvider
) -> None:
    issued = provider.issue("s1", REPORTS, ttl_seconds=60)
    info = openbao.lookup_accessor(issued.accessor)

    assert info is not None
    assert info["policies"] == [REPORTS_POLICY]  # no "default"
    assert info["type"] == "service"  # batch tokens cannot be revoked by hand
    assert info["renewable"] is False
    assert info["orphan"] is False
    assert info["meta"] == {"step_id": "s1"}
    assert info["display_name"] == "token-haios-s1"
    assert info["path"] == "auth/token/create"
    provider.revoke(issued.accessor)


@pytest.mark.parametrize(("bound", "expected"), [(30, 30), (3600, 120)])
def test_ttl_is_bounded_by_the_step_and_cannot_be_extended(
    openbao: OpenBaoServer, provider: HvacProvider, tmp_path: Path, bound: int, expected: int
) -> None:
    issued = provider.issue("s1", REPORTS, ttl_seconds=bound)
    info = openbao.lookup_accessor(issued.accessor)

    assert info is not None
    assert issued.ttl_seconds == expected
    assert 0 < info["ttl"] <= expected
    assert info["explicit_max_ttl"] == expected
    step = openbao.client(_deliver(issued, tmp_path))
    with pytest.raises(DENIED):
        step.auth.token.renew_self(increment="87600h")
    with pytest.raises(DENIED):  # not even root may renew it
        openbao.client().auth.token.renew(token=step.token, increment="87600h")
    info_after = openbao.lookup_accessor(issued.accessor)
    assert info_after is not None
    assert info_after["ttl"] <= expected
    provider.revoke(issued.accessor)


def test_num_uses_is_honoured(
    openbao: OpenBaoServer, provider: HvacProvider, tmp_path: Path
) -> None:
    grant = ScopeGrant((REPORTS_POLICY,), ttl_seconds=60, num_uses=2)
    issued = provider.issue("s1", grant, ttl_seconds=60)
    step = openbao.client(_deliver(issued, tmp_path))

    assert _read(step, "reports/q1") == {"total": "42"}
    assert _read(step, "reports/q1") == {"total": "42"}
    with pytest.raises(DENIED):
        _read(step, "reports/q1")
    assert not provider.is_live(issued.accessor)  # used up: Vault revoked it


def test_revoked_token_is_gone_and_a_leaked_copy_is_useless(
    openbao: OpenBaoServer, provider: HvacProvider, tmp_path: Path
) -> None:
    issued = provider.issue("s1", REPORTS, ttl_seconds=60)
    leaked = _deliver(issued, tmp_path)  # e.g. copied into a product by the step
    assert provider.is_live(issued.accessor)

    provider.revoke(issued.accessor)

    assert not provider.is_live(issued.accessor)
    assert openbao.lookup_accessor(issued.accessor) is None
    with pytest.raises(DENIED):
        _read(openbao.client(leaked), "reports/q1")
    provider.revoke(issued.accessor)  # idempotent: a retry after success is harmless


def test_revoking_the_engine_token_revokes_every_step_token(
    openbao: OpenBaoServer, provider: HvacProvider, engine_token: str, tmp_path: Path
) -> None:
    first = provider.issue("s1", REPORTS, ttl_seconds=60)
    second = provider.issue("s2", REPORTS, ttl_seconds=60)
    step = openbao.client(_deliver(first, tmp_path))

    openbao.client().auth.token.revoke(engine_token)

    assert openbao.lookup_accessor(first.accessor) is None
    assert openbao.lookup_accessor(second.accessor) is None
    with pytest.raises(DENIED):
        _read(step, "reports/q1")


def test_token_role_mints_the_same_token_without_sudo(
    openbao: OpenBaoServer, tmp_path: Path
) -> None:
    engine = openbao.create_token([ROLE_ENGINE_POLICY])
    vault = HvacProvider(openbao.addr, engine, token_role=STEP_ROLE)
    vault.preflight([REPORTS])

    issued = vault.issue("s1", REPORTS, ttl_seconds=60)
    info = openbao.lookup_accessor(issued.accessor)
    assert info is not None
    assert info["policies"] == [REPORTS_POLICY]
    assert info["path"] == f"auth/token/create/{STEP_ROLE}"
    assert _read(openbao.client(_deliver(issued, tmp_path)), "reports/q1") == {"total": "42"}
    vault.revoke(issued.accessor)
    assert not vault.is_live(issued.accessor)
    vault.close()


def test_token_role_refuses_a_policy_it_does_not_allow(openbao: OpenBaoServer) -> None:
    engine = openbao.create_token([ROLE_ENGINE_POLICY])
    vault = HvacProvider(openbao.addr, engine, token_role=STEP_ROLE)
    outside = ScopeGrant((ENGINE_POLICY,), ttl_seconds=60)

    with pytest.raises(VaultUnavailableError, match="HTTP 400") as caught:
        vault.preflight([ScopeGrant((OTHER_POLICY,), 60), outside])
    assert_no_secret(caught.value, engine, openbao.root_token)


@pytest.mark.parametrize("role", [None, STEP_ROLE])
def test_revoking_the_run_session_kills_step_tokens_never_recorded(
    openbao: OpenBaoServer, role: str | None
) -> None:
    engine = openbao.create_token([ENGINE_POLICY if role is None else ROLE_ENGINE_POLICY])
    vault = HvacProvider(openbao.addr, engine, token_role=role)
    session = vault.open_session("plan-1", ttl_seconds=600)
    session.provider.preflight([REPORTS])
    # The engine dies right after Vault created this token: its accessor is
    # never recorded, only the session's was (attack catalog 107).
    lost = session.provider.issue("s1", REPORTS, ttl_seconds=60).accessor
    info = openbao.lookup_accessor(session.accessor)
    assert info is not None
    assert (info["renewable"], info["orphan"], info["type"]) == (False, False, "service")
    assert 0 < info["ttl"] <= session.ttl_seconds <= 600
    assert info["display_name"] == "token-haios-run-plan-1"

    revoke_leftovers(vault, [session.accessor], sleep=lambda _: None)  # the resumed run

    assert openbao.lookup_accessor(lost) is None
    assert openbao.lookup_accessor(session.accessor) is None
    with pytest.raises(VaultUnavailableError):
        session.provider.issue("s2", REPORTS, ttl_seconds=60)
    vault.close()


def test_failed_revocation_is_retried_once_vault_is_back(
    openbao: OpenBaoServer, engine_token: str, outage_proxy: OutageProxy
) -> None:
    vault = HvacProvider(outage_proxy.addr, engine_token, timeout_seconds=2)
    issued = vault.issue("s1", REPORTS, ttl_seconds=60)

    outage_proxy.block()
    with pytest.raises(VaultUnavailableError, match="connection") as caught:
        vault.revoke(issued.accessor)
    assert_no_secret(caught.value, engine_token)
    assert revoke_leftovers(vault, [issued.accessor], attempts=2, sleep=lambda _: None) == (
        (),
        (issued.accessor,),
    )
    assert openbao.lookup_accessor(issued.accessor) is not None  # still live meanwhile

    outage_proxy.unblock()
    result = revoke_leftovers(vault, [issued.accessor], sleep=lambda _: None)

    assert result == ((issued.accessor,), ())
    assert openbao.lookup_accessor(issued.accessor) is None
    vault.close()


def test_vault_dying_mid_run_fails_the_next_issue_cleanly(
    openbao_factory: Callable[[], OpenBaoServer],
) -> None:
    server = openbao_factory()
    engine = server.create_token([ENGINE_POLICY])
    vault = HvacProvider(server.addr, engine, timeout_seconds=2)
    vault.preflight([REPORTS])
    issued = vault.issue("s1", REPORTS, ttl_seconds=60)

    server.stop()

    for attempt in (
        lambda: vault.issue("s2", REPORTS, ttl_seconds=60),
        lambda: vault.revoke(issued.accessor),
        lambda: vault.is_live(issued.accessor),
    ):
        with pytest.raises(VaultUnavailableError, match="connection refused") as caught:
            attempt()
        assert_no_secret(caught.value, engine, server.root_token)
    vault.close()
