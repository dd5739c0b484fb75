# SPDX-License-Identifier: Apache-2.0
"""Resolving a profile's egress at run start: routes, private addresses, rebinding.

Threats T-E01 (DNS rebinding: a name that answers with loopback, link-local,
metadata or one of the host's own addresses), T-E02 (the forwarder's host
side) and T-E07 (ambiguous allowlists) of threat_model/egress.md. The
resolver and the host-address check are injected fakes, so nothing here
queries DNS or dials anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from haios.egress.resolve import (
    EgressResolution,
    is_host_address,
    resolve_egress,
    resolve_egress_result,
    system_resolver,
    vault_endpoint,
)
from haios.errors import SandboxSetupError
from haios.sandbox.spec import EgressRoute

ANSWERS: dict[str, tuple[str, ...]] = {
    "pypi.org": ("151.101.0.223", "2a04:4e42::223"),
    "db.internal": ("10.1.2.3",),
    "vault.example": ("192.0.2.10",),
    "localhost": ("127.0.0.1", "::1"),
    "rebind.example": ("127.0.0.1",),
    "half-rebind.example": ("192.0.2.20", "127.0.0.1"),
    "metadata.example": ("169.254.169.254",),
    "mapped.example": ("::ffff:169.254.169.254",),
    "linklocal.example": ("fe80::1",),
    "self.example": ("192.0.2.2",),
    "nothing.example": (),
}
HOST_ADDRESSES = {"192.0.2.2"}


def fake_resolver(host: str, port: int) -> Sequence[str]:
    del port
    if host not in ANSWERS:
        raise OSError(-2, "Name or service not known")
    return ANSWERS[host]


def resolve(entries: Sequence[str], vault_addr: str | None = None) -> EgressResolution:
    return resolve_egress_result("p", entries, vault_addr=vault_addr, resolver=fake_resolver,
                                 is_local=lambda address: address in HOST_ADDRESSES)


def test_names_get_private_loopback_addresses_in_name_order() -> None:
    resolution = resolve(["pypi.org:443", "db.internal:5432", "pypi.org:80"])
    assert resolution.refusals == ()
    assert resolution.routes == (
        EgressRoute("pypi.org:443", "pypi.org", "127.200.0.2", 443,
                    ("151.101.0.223", "2a04:4e42::223")),
        EgressRoute("db.internal:5432", "db.internal", "127.200.0.1", 5432, ("10.1.2.3",)),
        EgressRoute("pypi.org:80", "pypi.org", "127.200.0.2", 80,
                    ("151.101.0.223", "2a04:4e42::223")),
    )


def test_address_endpoints_lead_exactly_there_and_are_skipped_by_names() -> None:
    resolution = resolve(["127.200.0.1:9000", "db.internal:5432", "[2001:db8::5]:443"])
    assert resolution.routes == (
        EgressRoute("127.200.0.1:9000", None, "127.200.0.1", 9000, ("127.200.0.1",)),
        EgressRoute("db.internal:5432", "db.internal", "127.200.0.2", 5432, ("10.1.2.3",)),
        EgressRoute("[2001:db8::5]:443", None, "2001:db8::5", 443, ("2001:db8::5",)),
    )


def test_a_literal_loopback_or_metadata_address_is_the_operators_explicit_choice() -> None:
    resolution = resolve(["127.0.0.1:8200", "169.254.169.254:80"])
    assert resolution.refusals == ()
    assert [route.destinations for route in resolution.routes] == [
        ("127.0.0.1",), ("169.254.169.254",)]


def test_localhost_must_be_loopback_and_listens_on_127_0_0_1() -> None:
    resolution = resolve(["localhost:8443"])
    assert resolution.routes == (
        EgressRoute("localhost:8443", "localhost", "127.0.0.1", 8443, ("127.0.0.1", "::1")),)
    ANSWERS["localhost"] = ("127.0.0.1", "192.0.2.99")
    try:
        refused = resolve(["localhost:8443"])
    finally:
        ANSWERS["localhost"] = ("127.0.0.1", "::1")
    assert refused.routes == ()
    assert "not a loopback address" in refused.refusals[0].message


@pytest.mark.parametrize(("name", "reason"), [
    ("rebind.example", "127.0.0.1 (loopback)"),
    ("half-rebind.example", "127.0.0.1 (loopback)"),
    ("metadata.example", "169.254.169.254 (metadata)"),
    ("mapped.example", "::ffff:a9fe:a9fe (metadata)"),
    ("linklocal.example", "fe80::1"),
    ("self.example", "192.0.2.2 (an address of this host)"),
    ("nothing.example", "resolves to no address"),
    ("unknown.example", "does not resolve"),
])
def test_a_name_resolving_to_a_forbidden_address_is_refused(name: str, reason: str) -> None:
    resolution = resolve([f"{name}:443", "db.internal:5432"])
    assert [route.endpoint for route in resolution.routes] == ["db.internal:5432"]
    assert len(resolution.refusals) == 1
    assert resolution.refusals[0].endpoint == f"{name}:443"
    assert reason in resolution.refusals[0].message
    with pytest.raises(SandboxSetupError, match="egress refused"):
        resolve_egress("p", [f"{name}:443"], vault_addr=None, resolver=fake_resolver,
                       is_local=lambda address: address in HOST_ADDRESSES)


@pytest.mark.parametrize(("addr", "kind", "host", "port"), [
    ("http://127.0.0.1:8200", "address", "127.0.0.1", 8200),
    ("https://vault.example:8200", "name", "vault.example", 8200),
    ("https://Vault.Example", "name", "vault.example", 443),
    ("http://vault.example/", "name", "vault.example", 80),
    ("https://[2001:db8::7]:8200", "address", "2001:db8::7", 8200),
    ("http://localhost:8200", "localhost", "localhost", 8200),
])
def test_vault_is_the_host_and_port_of_vault_addr(addr: str, kind: str, host: str,
                                                   port: int) -> None:
    endpoint = vault_endpoint(addr)
    assert (endpoint.text, endpoint.kind, endpoint.host, endpoint.port) == ("vault", kind, host,
                                                                            port)


@pytest.mark.parametrize("addr", [None, "", "vault.example:8200", "ftp://vault.example",
                                  "https://", "https://vault.example:99999",
                                  "https://vault_x.example", "https://0.0.0.0:8200"])
def test_a_bad_vault_addr_refuses_the_vault_endpoint(addr: str | None) -> None:
    resolution = resolve(["vault"], vault_addr=addr)
    assert resolution.routes == ()
    assert "VAULT_ADDR" in resolution.refusals[0].message


def test_vault_route_keeps_the_name_the_step_dials() -> None:
    resolution = resolve(["vault", "pypi.org:443"], vault_addr="https://vault.example:8200")
    assert resolution.routes[0] == EgressRoute("vault", "vault.example", "127.200.0.2", 8200,
                                               ("192.0.2.10",))


def test_vault_naming_the_same_endpoint_twice_is_refused() -> None:
    resolution = resolve(["vault", "127.0.0.1:8200"], vault_addr="http://127.0.0.1:8200")
    assert [route.endpoint for route in resolution.routes] == ["vault"]
    assert "same endpoint" in resolution.refusals[0].message


def test_destinations_are_capped() -> None:
    ANSWERS["many.example"] = tuple(f"192.0.2.{n}" for n in range(100, 120))
    try:
        route = resolve(["many.example:443"]).routes[0]
    finally:
        del ANSWERS["many.example"]
    assert len(route.destinations) == 8
    assert route.destinations[0] == "192.0.2.100"


def test_host_address_check_binds_without_sending() -> None:
    assert is_host_address("127.0.0.1") is True
    # 198.18.0.0/15 is not configured on the test host (benchmarking range).
    assert is_host_address("198.19.255.254") is False


def test_system_resolver_answers_localhost_from_the_host() -> None:
    assert "127.0.0.1" in system_resolver("localhost", 443)
