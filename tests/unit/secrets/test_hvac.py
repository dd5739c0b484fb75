# SPDX-License-Identifier: Apache-2.0
"""HvacProvider configuration and failure paths (threats T-V05, T-V06, T-V07).

Attacker: a broken or hostile Vault endpoint (or a proxy in front of it)
that echoes the request token in an error body, redirects elsewhere, hangs,
or answers with a token other than the one asked for; or an operator
setting that would send the engine token in clear. Expected: a
VaultUnavailableError whose message, repr, traceback and cause chain hold
no token; tokens that differ from the request are revoked and refused.

A small HTTP stub stands in for Vault here because a real server cannot be
made to misbehave like this; the real-server behaviour is covered in
tests/integration/test_vault_*.py. hvac and requests run for real.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from haios.errors import VaultUnavailableError
from haios.secrets import HvacProvider, ScopeGrant, provider_from_environment
from tests.support.openbao import assert_no_secret

ENGINE_TOKEN = "s.EnGiNe0TokEn1SeCrEt2VaLuE"
STEP_TOKEN = "s.StEp0ToKeN1sHoUlDnEvErLeAk"
GRANT = ScopeGrant(("haios-reports-read",), ttl_seconds=60)

Reply = tuple[int, dict[str, str], bytes]
Route = Callable[[dict[str, str], bytes], Reply]


def _json(status: int, doc: object) -> Reply:
    return status, {"Content-Type": "application/json"}, json.dumps(doc).encode()


class _QuietServer(http.server.ThreadingHTTPServer):
    """Ignores clients that hang up first (the timeout test does)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet; a test asserts on what the client saw."""


class StubVault:
    """An HTTP server on 127.0.0.1 answering from a route table."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                """Keep test output quiet."""

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = dict(self.headers.items())
                stub.seen.append((self.path, headers, body))
                route = stub.routes.get(self.path)
                status, extra, payload = route(headers, body) if route else _json(404, {})
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _answer

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.addr = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubVault]:
    server = StubVault()
    yield server
    server.close()


def _provider(addr: str, *, timeout_seconds: float = 2.0) -> HvacProvider:
    return HvacProvider(addr, ENGINE_TOKEN, timeout_seconds=timeout_seconds)


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"VAULT_TOKEN": ENGINE_TOKEN}, "VAULT_ADDR is not set", id="no-addr"),
        pytest.param({"VAULT_ADDR": "http://127.0.0.1:8200"}, "VAULT_TOKEN", id="no-token"),
        pytest.param(
            {"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": "  "}, "VAULT_TOKEN", id="blank"
        ),
        pytest.param(
            {"VAULT_ADDR": "http://vault.example:8200", "VAULT_TOKEN": ENGINE_TOKEN},
            "plaintext",
            id="plaintext-to-remote-host",
        ),
        pytest.param(
            {"VAULT_ADDR": "ftp://127.0.0.1", "VAULT_TOKEN": ENGINE_TOKEN}, "http", id="scheme"
        ),
        pytest.param(
            {"VAULT_ADDR": "https://u:pw@vault.example", "VAULT_TOKEN": ENGINE_TOKEN},
            "credentials",
            id="userinfo",
        ),
        pytest.param(
            {"VAULT_ADDR": "https://vault.example/v1/x", "VAULT_TOKEN": ENGINE_TOKEN},
            "path",
            id="path",
        ),
        pytest.param(
            {"VAULT_ADDR": "https://[::1", "VAULT_TOKEN": ENGINE_TOKEN}, "valid URL", id="broken"
        ),
        pytest.param(
            {
                "VAULT_ADDR": "https://vault.example",
                "VAULT_TOKEN": ENGINE_TOKEN,
                "VAULT_SKIP_VERIFY": "1",
            },
            "VAULT_SKIP_VERIFY",
            id="skip-verify",
        ),
        pytest.param(
            {
                "VAULT_ADDR": "https://vault.example",
                "VAULT_TOKEN": ENGINE_TOKEN,
                "VAULT_CLIENT_CERT": "/c.pem",
            },
            "VAULT_CLIENT_KEY",
            id="cert-without-key",
        ),
    ],
)
def test_unsafe_or_incomplete_vault_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(VaultUnavailableError, match=message) as caught:
        provider_from_environment(env)
    assert_no_secret(caught.value, ENGINE_TOKEN)


@pytest.mark.parametrize(
    "addr",
    [
        "https://vault.example:8200",
        "https://vault.example:8200/",
        "http://127.0.0.1:8200",
        "http://127.7.0.1:8200",
        "http://[::1]:8200",
        "http://localhost:8200",
    ],
)
def test_tls_or_loopback_addresses_are_accepted(addr: str) -> None:
    env = {"VAULT_ADDR": addr, "VAULT_TOKEN": ENGINE_TOKEN, "VAULT_SKIP_VERIFY": "false"}
    provider = provider_from_environment(env)
    assert ENGINE_TOKEN not in repr(provider)
    assert ENGINE_TOKEN not in str(provider)
    assert repr(provider).startswith(f"HvacProvider(addr='{addr.rstrip('/')}'")


def test_plaintext_to_a_remote_host_needs_the_unsafe_flag_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = HvacProvider("http://vault.internal:8200", ENGINE_TOKEN, allow_plaintext_http=True)
    assert "vault.internal" in repr(provider)
    assert "UNSAFE" in caplog.text
    assert ENGINE_TOKEN not in caplog.text


def test_tls_verification_cannot_be_disabled() -> None:
    with pytest.raises(VaultUnavailableError, match="TLS verification"):
        HvacProvider("https://vault.example", ENGINE_TOKEN, verify=False)


# -- error paths: nothing leaks (catalog case 83) -------------------------------------------


def test_500_echoing_the_token_does_not_leak_it(stub: StubVault) -> None:
    def echo(headers: dict[str, str], _body: bytes) -> Reply:
        token = headers.get("X-Vault-Token", "")
        b64 = base64.b64encode(token.encode()).decode()
        return _json(500, {"errors": [f"internal error for token {token} ({b64})"]})

    stub.routes["/v1/auth/token/lookup-self"] = echo

    with pytest.raises(VaultUnavailableError, match="HTTP 500") as caught:
        _provider(stub.addr).preflight()
    assert "internal error for token <redacted>" in str(caught.value)
    assert_no_secret(caught.value, ENGINE_TOKEN)


def test_non_json_error_body_echoing_the_token_does_not_leak_it(stub: StubVault) -> None:
    def echo(headers: dict[str, str], _body: bytes) -> Reply:
        page = f"<html>bad gateway, header was {headers.get('X-Vault-Token')}</html>"
        return 502, {"Content-Type": "text/html"}, page.encode()

    stub.routes["/v1/auth/token/revoke-accessor"] = echo

    with pytest.raises(VaultUnavailableError, match="HTTP 502") as caught:
        _provider(stub.addr).revoke("acc-1")
    assert_no_secret(caught.value, ENGINE_TOKEN)


def test_connection_refused_is_vault_unavailable() -> None:
    with pytest.raises(VaultUnavailableError, match="connection refused") as caught:
        _provider("http://127.0.0.1:1").preflight()
    assert_no_secret(caught.value, ENGINE_TOKEN)


def test_hung_vault_times_out(stub: StubVault) -> None:
    def hang(_headers: dict[str, str], _body: bytes) -> Reply:
        time.sleep(1.0)
        return _json(200, {})

    stub.routes["/v1/auth/token/lookup-self"] = hang

    started = time.monotonic()
    with pytest.raises(VaultUnavailableError, match=r"no answer within 0\.2s") as caught:
        _provider(stub.addr, timeout_seconds=0.2).preflight()
    assert time.monotonic() - started < 1.0
    assert_no_secret(caught.value, ENGINE_TOKEN)


def test_redirect_is_not_followed_so_the_token_stays_home(stub: StubVault) -> None:
    elsewhere = StubVault()
    try:
        stub.routes["/v1/auth/token/lookup-self"] = lambda _h, _b: (
            307,
            {"Location": f"{elsewhere.addr}/v1/auth/token/lookup-self"},
            b"",
        )
        with pytest.raises(VaultUnavailableError) as caught:
            _provider(stub.addr).preflight()
        assert elsewhere.seen == []
        assert_no_secret(caught.value, ENGINE_TOKEN)
    finally:
        elsewhere.close()


# -- responses are checked, not trusted ---------------------------------------------------------


def _auth(**changes: object) -> dict[str, object]:
    auth: dict[str, object] = {
        "client_token": STEP_TOKEN,
        "accessor": "acc-issued",
        "policies": ["haios-reports-read"],
        "token_policies": ["haios-reports-read"],
        "lease_duration": 60,
        "renewable": False,
        "token_type": "service",
        "orphan": False,
        "num_uses": 0,
    }
    auth.update(changes)
    return {"auth": auth}


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        pytest.param(
            {"policies": ["default", "haios-reports-read"]}, "policies", id="default-policy"
        ),
        pytest.param({"policies": ["haios-engine"]}, "policies", id="parent-policies"),
        pytest.param({"token_policies": ["x"]}, "token_policies", id="token-policies"),
        pytest.param({"renewable": True}, "renewable", id="renewable"),
        pytest.param({"token_type": "batch"}, "batch", id="batch"),
        pytest.param({"orphan": True}, "orphan", id="orphan"),
        pytest.param({"lease_duration": 61}, "TTL 61s", id="longer-ttl"),
        pytest.param({"lease_duration": 0}, "TTL 0s", id="no-ttl"),
        pytest.param({"num_uses": 5}, "num_uses", id="uses"),
    ],
)
def test_token_other_than_requested_is_revoked_and_refused(
    stub: StubVault, changes: dict[str, object], why: str
) -> None:
    stub.routes["/v1/auth/token/create"] = lambda _h, _b: _json(200, _auth(**changes))
    stub.routes["/v1/auth/token/revoke-accessor"] = lambda _h, _b: (204, {}, b"")

    with pytest.raises(VaultUnavailableError, match=why) as caught:
        _provider(stub.addr).issue("s1", GRANT, ttl_seconds=600)

    assert "it was revoked" in str(caught.value)
    revokes = [body for path, _, body in stub.seen if path.endswith("/revoke-accessor")]
    assert [json.loads(body) for body in revokes] == [{"accessor": "acc-issued"}]
    assert_no_secret(caught.value, ENGINE_TOKEN, STEP_TOKEN)


def test_refused_token_that_cannot_be_revoked_names_its_accessor_and_ttl(stub: StubVault) -> None:
    stub.routes["/v1/auth/token/create"] = lambda _h, _b: _json(200, _auth(renewable=True))

    with pytest.raises(VaultUnavailableError, match="expires within 60s") as caught:
        _provider(stub.addr).issue("s1", GRANT, ttl_seconds=600)
    assert "acc-issued" in str(caught.value)
    assert_no_secret(caught.value, ENGINE_TOKEN, STEP_TOKEN)


@pytest.mark.parametrize(
    ("doc", "revoked"),
    [
        pytest.param({}, False, id="no-auth"),
        pytest.param({"auth": None}, False, id="null-auth"),
        pytest.param(_auth(accessor=7), False, id="accessor-type"),
        pytest.param(_auth(client_token=""), True, id="empty-token"),
        pytest.param(_auth(client_token="s.a b\n"), True, id="token-with-spaces"),
        pytest.param(_auth(policies="haios-reports-read"), True, id="policies-type"),
        pytest.param(_auth(lease_duration="60"), True, id="ttl-type"),
        pytest.param(_auth(lease_duration=True), True, id="ttl-bool"),
    ],
)
def test_malformed_create_response_is_refused_and_revoked_when_possible(
    stub: StubVault, doc: dict[str, object], revoked: bool
) -> None:
    stub.routes["/v1/auth/token/create"] = lambda _h, _b: _json(200, doc)
    stub.routes["/v1/auth/token/revoke-accessor"] = lambda _h, _b: (204, {}, b"")

    with pytest.raises(VaultUnavailableError, match="malformed") as caught:
        _provider(stub.addr).issue("s1", GRANT, ttl_seconds=600)

    revokes = [path for path, _, _ in stub.seen if path.endswith("/revoke-accessor")]
    assert len(revokes) == int(revoked)
    assert_no_secret(caught.value, ENGINE_TOKEN, STEP_TOKEN, "s.a b")


def test_create_request_asks_for_exactly_the_scope(stub: StubVault) -> None:
    stub.routes["/v1/auth/token/create"] = lambda _h, _b: _json(200, _auth(lease_duration=45))

    issued = _provider(stub.addr).issue("s1", GRANT, ttl_seconds=45)

    assert (issued.accessor, issued.ttl_seconds) == ("acc-issued", 45)
    [(_, headers, body)] = stub.seen
    assert json.loads(body) == {
        "policies": ["haios-reports-read"],
        "meta": {"step_id": "s1"},
        "no_parent": False,
        "no_default_policy": True,
        "renewable": False,
        "ttl": "45s",
        "explicit_max_ttl": "45s",
        "type": "service",
        "display_name": "haios-s1",
        "num_uses": 0,
    }
    assert headers["X-Vault-Token"] == ENGINE_TOKEN
    assert "X-Vault-Wrap-TTL" not in headers  # no response wrapping (docs/vault.md)
