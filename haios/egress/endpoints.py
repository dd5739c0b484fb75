# SPDX-License-Identifier: Apache-2.0
"""The egress endpoint grammar of a profile, and which destinations are refused.

A profile's ``egress`` list names TCP endpoints, each one of:

- ``vault``: the engine's own ``VAULT_ADDR`` (host and port, resolved at
  run start);
- ``NAME:PORT``: a DNS name in lowercase (``pypi.org:443``), or
  ``localhost:PORT`` (this host's loopback, named on purpose);
- ``IPV4:PORT`` or ``[IPV6]:PORT``: an address, used exactly as written.

`parse_endpoint` turns one entry into an `Endpoint` and refuses anything
else (wildcards, schemes, paths, upper case, a trailing dot, port 0,
zone ids, addresses no TCP connection can go to). `refused_destination`
says why an address a *name* resolved to must not be dialled (DNS
rebinding: loopback, link-local, cloud metadata, ...); an address the
operator wrote as a literal is the operator's explicit choice and is only
checked for being a possible TCP destination.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Final, Literal

#: the keyword for the engine's VAULT_ADDR
VAULT: Final = "vault"
LOCALHOST: Final = "localhost"
#: the most endpoints one profile may list
ENDPOINTS_MAX: Final = 64
PORT_MAX: Final = 65535
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")
_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NAME_MAX: Final = 253

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Instance-metadata and platform endpoints that hand out credentials or
#: configuration: never a destination a *name* may resolve to.
METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle instance metadata
        "169.254.170.2",  # AWS ECS task credentials
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure wire server
        "fd00:ec2::254",  # AWS instance metadata over IPv6
    )
)
#: RFC 6052 NAT64 prefix: an IPv4 address hides in the low 32 bits
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
#: RFC 1122 "this network": never a destination
_THIS_NETWORK: Final = ipaddress.ip_network("0.0.0.0/8")

EndpointKind = Literal["vault", "localhost", "name", "address"]


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One parsed ``egress`` entry.

    Attributes:
        text: the entry as written in the profile (the label in records).
        kind: ``vault``, ``localhost``, ``name`` or ``address``.
        host: the DNS name, ``localhost``, or the address in canonical form;
            empty for ``vault`` (known only from VAULT_ADDR at run start).
        port: the TCP port; 0 for ``vault``.
    """

    text: str
    kind: EndpointKind
    host: str
    port: int


def parse_port(text: str, where: str) -> int:
    """A TCP port in plain decimal, 1..65535.

    Raises:
        ValueError: anything else (the message names `where`).
    """
    if not _PORT_RE.fullmatch(text) or int(text) > PORT_MAX:
        raise ValueError(f"{where}: the port must be a number from 1 to {PORT_MAX}")
    return int(text)


def is_dns_name(text: str) -> bool:
    """Whether `text` is a lowercase host name: LDH labels, no trailing dot.

    A name whose last label is all digits is refused too: resolvers read
    such names as numbers (``0x7f.1``, ``2130706433``), not as names.
    """
    if not text or len(text) > _NAME_MAX:
        return False
    labels = text.split(".")
    return all(_LABEL_RE.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def parse_address(text: str, where: str) -> IPAddress:
    """An IPv4 or IPv6 literal in canonical-enough form, without a zone id.

    Raises:
        ValueError: not an address, a zone id, or an IPv6 link-local address
            (meaningless without a zone).
    """
    if "%" in text:
        raise ValueError(f"{where}: zone ids are not supported")
    try:
        address = ipaddress.ip_address(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {text!r} is not an IP address") from exc
    if isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
        raise ValueError(f"{where}: an IPv6 link-local address needs a zone; not supported")
    return address


def unusable_destination(address: IPAddress) -> str | None:
    """Why no TCP connection can go to `address` at all, or None.

    Applies to every destination, literal or resolved.
    """
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if address in _THIS_NETWORK:
        return "an address of 0.0.0.0/8"
    return None


def refused_destination(address: IPAddress) -> str | None:
    """Why a *resolved* name must not lead to `address`, or None when it may.

    The forwarder dials from the host, so a name that resolves to the host's
    loopback, a link-local or metadata address would let the step reach
    what only the host may reach (DNS rebinding, threat T-E01). IPv4
    addresses embedded in IPv6 (mapped, NAT64) are judged as IPv4.

    Returns:
        A short reason (``loopback``, ``link-local``, ``metadata``, ...), or
        None for an ordinary unicast address.
    """
    unusable = unusable_destination(address)
    if unusable is not None:
        return unusable
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        if address in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for candidate in candidates:
        if candidate in METADATA_ADDRESSES:
            return "metadata"
        if candidate.is_loopback:
            return "loopback"
        if candidate.is_link_local:
            return "link-local"
        if candidate.is_unspecified or candidate.is_multicast:
            return "not unicast"
        if isinstance(candidate, ipaddress.IPv4Address) and candidate.is_reserved:
            return "reserved"
    return None


def split_host_port(text: str, where: str) -> tuple[str, str]:
    """``host:port`` or ``[v6]:port`` into its two parts (not yet checked).

    Raises:
        ValueError: no port, or brackets that do not close before the port.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{where}: write an IPv6 endpoint as [ADDRESS]:PORT")
        return text[1:close], text[close + 2 :]
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{where}: expected {VAULT!r}, NAME:PORT, IPV4:PORT or [IPV6]:PORT")
    if ":" in host:
        raise ValueError(f"{where}: put an IPv6 address in brackets, e.g. [2001:db8::1]:443")
    return host, port


def parse_endpoint(text: str) -> Endpoint:
    """Parse one ``egress`` entry of a profile.

    Args:
        text: the entry, e.g. ``"vault"``, ``"pypi.org:443"``,
            ``"10.1.2.3:5432"``, ``"[2001:db8::1]:443"``.

    Returns:
        The endpoint; an address host is in canonical form.

    Raises:
        ValueError: the entry is not one of the forms above (the message
            quotes the entry, which the operator wrote).
    """
    where = f"egress entry {text!r}"
    if text == VAULT:
        return Endpoint(text, "vault", "", 0)
    bracketed = text.startswith("[")
    host, port_text = split_host_port(text, where)
    port = parse_port(port_text, where)
    if bracketed or re.fullmatch(r"[0-9.]+", host):
        address = parse_address(host, where)
        if bracketed != isinstance(address, ipaddress.IPv6Address):
            raise ValueError(f"{where}: only IPv6 addresses go in brackets")
        unusable = unusable_destination(address)
        if unusable is not None:
            raise ValueError(f"{where}: {unusable} cannot be a TCP destination")
        return Endpoint(text, "address", str(address), port)
    if host == LOCALHOST:
        return Endpoint(text, "localhost", host, port)
    if host == VAULT:
        # Ambiguous: the keyword alone is the engine's VAULT_ADDR.
        raise ValueError(f"{where}: write {VAULT!r} alone for the engine's VAULT_ADDR, or the "
                         "host's full name")
    if not is_dns_name(host):
        raise ValueError(
            f"{where}: {host!r} is not a lowercase host name (letters, digits, '-', '.'; "
            "no wildcard, no trailing dot)"
        )
    return Endpoint(text, "name", host, port)
