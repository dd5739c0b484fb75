# SPDX-License-Identifier: Apache-2.0
"""Turn a profile's egress entries into routes: resolved once, from the host.

At run start the engine resolves every endpoint of every profile the plan
uses (`resolve_egress_result`), and pins the answer for the whole run:

- ``vault`` is the host and port of the engine's own ``VAULT_ADDR``;
- an address endpoint leads to exactly that address (the operator wrote it);
- ``localhost`` must resolve to loopback addresses only (RFC 6761);
- a name is resolved with the host's resolver (`system_resolver`), never
  the step's; every address it yields must be an ordinary unicast address
  that is not one of this host's own (`endpoints.refused_destination`,
  `is_host_address`), or the endpoint is refused (DNS rebinding, T-E01).

Each route also says where the step dials: a name gets its own private
loopback address (127.200.0.1, 127.200.0.2, ... in name order, published
in the step's /etc/hosts); ``localhost`` is 127.0.0.1; an address endpoint
is the address itself. A refusal is a typed result (`Refusal`) so the
caller can audit it; `resolve_egress` raises instead.

I/O: `system_resolver` asks the host's resolver, `is_host_address` binds a
throwaway socket (no packet is sent). Everything else is pure.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Final

from haios.egress.endpoints import (
    LOCALHOST,
    VAULT,
    Endpoint,
    IPAddress,
    is_dns_name,
    parse_address,
    parse_endpoint,
    refused_destination,
    unusable_destination,
)
from haios.errors import SandboxSetupError
from haios.sandbox.spec import EgressRoute

#: the first private loopback address handed to a host name
NAME_ADDRESS_BASE: Final = ipaddress.IPv4Address("127.200.0.1")
#: destinations kept per name (in the resolver's order)
DESTINATIONS_MAX: Final = 8
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

Resolver = Callable[[str, int], Sequence[str]]
HostAddressCheck = Callable[[str], bool]


@dataclasses.dataclass(frozen=True)
class Refusal:
    """An endpoint the engine will not forward to.

    Attributes:
        endpoint: the profile's entry.
        message: why, naming the name and address at fault.
    """

    endpoint: str
    message: str


@dataclasses.dataclass(frozen=True)
class EgressResolution:
    """The outcome of resolving one profile's egress.

    Attributes:
        profile: the profile's name.
        routes: the usable endpoints, in the profile's order.
        refusals: the refused ones; a run must not start with any.
    """

    profile: str
    routes: tuple[EgressRoute, ...]
    refusals: tuple[Refusal, ...]


def system_resolver(host: str, port: int) -> tuple[str, ...]:
    """The host's answer for `host`: unique addresses in the resolver's order.

    Raises:
        OSError: the name does not resolve (socket.gaierror included).

    Side Effects:
        Queries the host's resolver (files, DNS, ...).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    found: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in found:
            found.append(address)
    return tuple(found)


def is_host_address(address: str) -> bool:
    """Whether `address` belongs to this host (binding to it succeeds).

    An address the host can bind is the host itself: forwarding there would
    hand the step the host's own services (T-E02). Unknown errors count as
    "yes" (refuse); with ``ip_nonlocal_bind`` set every address looks local,
    so every name is refused (fail closed).

    Side Effects:
        Creates and binds a throwaway UDP socket; sends nothing.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        return exc.errno != errno.EAFNOSUPPORT
    with probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


def vault_endpoint(vault_addr: str | None) -> Endpoint:
    """The ``vault`` endpoint: the host and port of `vault_addr`.

    Raises:
        ValueError: VAULT_ADDR unset or not ``http(s)://HOST[:PORT]``.
    """
    if not vault_addr or not vault_addr.strip():
        raise ValueError("VAULT_ADDR is not set")
    try:
        parts = urllib.parse.urlsplit(vault_addr.strip())
        host = parts.hostname
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError as exc:
        raise ValueError("VAULT_ADDR is not a valid URL") from exc
    if parts.scheme not in _DEFAULT_PORTS or not host or not port:
        raise ValueError("VAULT_ADDR must be http(s)://HOST[:PORT]")
    if host == LOCALHOST:
        return Endpoint(VAULT, "localhost", host, port)
    try:
        address = parse_address(host, "VAULT_ADDR")
    except ValueError:
        if not is_dns_name(host):
            raise ValueError(f"VAULT_ADDR host {host!r} is not a host name") from None
        return Endpoint(VAULT, "name", host, port)
    unusable = unusable_destination(address)
    if unusable is not None:
        raise ValueError(f"VAULT_ADDR host is {unusable}")
    return Endpoint(VAULT, "address", str(address), port)


def _name_addresses(names: Sequence[str], taken: set[str]) -> dict[str, str]:
    """A private loopback address per name, skipping addresses already used."""
    assigned: dict[str, str] = {}
    candidate = NAME_ADDRESS_BASE
    for name in sorted(set(names)):
        while str(candidate) in taken:
            candidate += 1
        assigned[name] = str(candidate)
        candidate += 1
    return assigned


def _check_name(endpoint: Endpoint, answer: Sequence[str],
                is_local: HostAddressCheck) -> tuple[tuple[str, ...], str | None]:
    """The name's usable destinations, or why it is refused."""
    if not answer:
        return (), f"{endpoint.host} resolves to no address"
    addresses: list[IPAddress] = []
    for text in answer:
        try:
            address = parse_address(text, endpoint.host)
        except ValueError:
            return (), f"{endpoint.host} resolves to {text!r}, not a usable address"
        if endpoint.kind == "localhost":
            if not address.is_loopback:
                return (), f"localhost resolves to {address}, not a loopback address"
        else:
            reason = refused_destination(address)
            if reason is None and is_local(str(address)):
                reason = "an address of this host"
            if reason is not None:
                return (), f"{endpoint.host} resolves to {address} ({reason})"
        addresses.append(address)
    return tuple(str(address) for address in addresses[:DESTINATIONS_MAX]), None


def resolve_egress_result(profile: str, entries: Sequence[str], *, vault_addr: str | None,
                          resolver: Resolver = system_resolver,
                          is_local: HostAddressCheck = is_host_address) -> EgressResolution:
    """Resolve one profile's egress entries into routes, without raising.

    Args:
        profile: the profile's name (for messages).
        entries: its ``egress`` list (already valid, see `parse_endpoint`).
        vault_addr: the engine's VAULT_ADDR, needed when ``vault`` is listed.
        resolver: the host's resolver (tests pass a fake).
        is_local: the host-address check (tests pass a fake).

    Returns:
        The routes for the usable endpoints and a refusal for each other one.

    Side Effects:
        Those of `resolver` and `is_local`.
    """
    endpoints: list[Endpoint] = []
    refusals: list[Refusal] = []
    for text in entries:
        try:
            endpoints.append(vault_endpoint(vault_addr) if text == VAULT else parse_endpoint(text))
        except ValueError as exc:
            refusals.append(Refusal(text, f"profile {profile}: {exc}"))
    literals = {e.host for e in endpoints if e.kind == "address"}
    listen = _name_addresses([e.host for e in endpoints if e.kind == "name"], literals)
    routes: list[EgressRoute] = []
    for endpoint in endpoints:
        if endpoint.kind == "address":
            route = EgressRoute(endpoint.text, None, endpoint.host, endpoint.port,
                                (endpoint.host,))
        else:
            try:
                answer = resolver(endpoint.host, endpoint.port)
            except OSError as exc:
                refusals.append(Refusal(endpoint.text, f"profile {profile}: {endpoint.host} "
                                        f"does not resolve ({exc.strerror or exc})"))
                continue
            destinations, problem = _check_name(endpoint, answer, is_local)
            if problem is not None:
                refusals.append(Refusal(endpoint.text, f"profile {profile}: {problem}"))
                continue
            address = "127.0.0.1" if endpoint.kind == "localhost" else listen[endpoint.host]
            route = EgressRoute(endpoint.text, endpoint.host, address, endpoint.port,
                                destinations)
        clash = next((r for r in routes if (r.listen, r.port) == (route.listen, route.port)),
                     None)
        if clash is not None:
            refusals.append(Refusal(endpoint.text, f"profile {profile}: {endpoint.text!r} and "
                                    f"{clash.endpoint!r} are the same endpoint"))
            continue
        routes.append(route)
    return EgressResolution(profile, tuple(routes), tuple(refusals))


def resolve_egress(profile: str, entries: Sequence[str], *, vault_addr: str | None,
                   resolver: Resolver = system_resolver,
                   is_local: HostAddressCheck = is_host_address) -> tuple[EgressRoute, ...]:
    """Resolve one profile's egress entries, or refuse.

    Raises:
        SandboxSetupError: an endpoint is refused (exit 6; the message names
            every refused endpoint and why).

    Side Effects:
        Those of `resolve_egress_result`.
    """
    resolution = resolve_egress_result(profile, entries, vault_addr=vault_addr,
                                       resolver=resolver, is_local=is_local)
    raise_refusals(resolution)
    return resolution.routes


def raise_refusals(resolution: EgressResolution) -> None:
    """Raise for a resolution with refusals.

    Raises:
        SandboxSetupError: naming each refused endpoint.
    """
    if resolution.refusals:
        raise SandboxSetupError("egress refused: " + "; ".join(
            refusal.message for refusal in resolution.refusals))
