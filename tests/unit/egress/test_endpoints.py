# SPDX-License-Identifier: Apache-2.0
"""The egress endpoint grammar and the destination rules (pure).

Threats T-E01 (DNS rebinding) and T-E07 (an ambiguous allowlist) of
threat_model/egress.md: an entry is one exact form or it is refused, and a
name may never lead to loopback, link-local, metadata or other special
addresses.
"""

from __future__ import annotations

import ipaddress

import pytest

from haios.egress.endpoints import (
    Endpoint,
    is_dns_name,
    parse_endpoint,
    refused_destination,
    unusable_destination,
)

VALID = {
    "vault": Endpoint("vault", "vault", "", 0),
    "pypi.org:443": Endpoint("pypi.org:443", "name", "pypi.org", 443),
    "files.pythonhosted.org:443": Endpoint("files.pythonhosted.org:443", "name",
                                           "files.pythonhosted.org", 443),
    "db-1.internal:5432": Endpoint("db-1.internal:5432", "name", "db-1.internal", 5432),
    "localhost:8443": Endpoint("localhost:8443", "localhost", "localhost", 8443),
    "10.1.2.3:5432": Endpoint("10.1.2.3:5432", "address", "10.1.2.3", 5432),
    "127.0.0.1:8200": Endpoint("127.0.0.1:8200", "address", "127.0.0.1", 8200),
    "[2001:db8::1]:443": Endpoint("[2001:db8::1]:443", "address", "2001:db8::1", 443),
    "[2001:0db8:0::1]:443": Endpoint("[2001:0db8:0::1]:443", "address", "2001:db8::1", 443),
    "x:1": Endpoint("x:1", "name", "x", 1),
    "x:65535": Endpoint("x:65535", "name", "x", 65535),
}


@pytest.mark.parametrize("text", VALID, ids=list(VALID))
def test_valid_entries_parse(text: str) -> None:
    assert parse_endpoint(text) == VALID[text]


INVALID = {
    "empty": "",
    "no_port": "pypi.org",
    "port_zero": "pypi.org:0",
    "port_too_big": "pypi.org:65536",
    "port_leading_zero": "pypi.org:0443",
    "port_sign": "pypi.org:+443",
    "port_space": "pypi.org: 443",
    "scheme": "https://pypi.org:443",
    "path": "pypi.org:443/simple",
    "wildcard": "*.pypi.org:443",
    "trailing_dot": "pypi.org.:443",
    "upper_case": "PyPI.org:443",
    "underscore": "my_host:80",
    "label_dash_start": "-a.org:80",
    "label_too_long": "a" * 64 + ".org:80",
    "numeric_tld": "host.123:80",
    "inet_aton_hex": "0x7f.1:80",
    "inet_aton_int": "2130706433:80",
    "short_ipv4": "127.1:80",
    "octal_ipv4": "0177.0.0.1:80",
    "leading_zero_ipv4": "010.1.2.3:80",
    "unbracketed_ipv6": "::1:80",
    "bracketed_ipv4": "[10.1.2.3]:80",
    "zone_id": "[fe80::1%eth0]:80",
    "ipv6_link_local": "[fe80::1]:80",
    "unspecified": "0.0.0.0:80",
    "unspecified_v6": "[::]:80",
    "multicast": "224.0.0.1:80",
    "broadcast": "255.255.255.255:80",
    "this_network": "0.1.2.3:80",
    "vault_with_port": "vault:8200",
    "non_ascii": "bücher.example:443",
    "user_info": "user@host:443",
    "whitespace": " pypi.org:443",
    "newline": "pypi.org:443\n",
}


@pytest.mark.parametrize("text", INVALID.values(), ids=list(INVALID))
def test_invalid_entries_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="egress entry"):
        parse_endpoint(text)


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"),
    ("127.200.0.1", "loopback"),
    ("::1", "loopback"),
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "metadata"),
    ("64:ff9b::7f00:1", "loopback"),
    ("64:ff9b::a9fe:a9fe", "metadata"),
    ("0.0.0.0", "the unspecified address"),
    ("::", "the unspecified address"),
    ("224.0.0.251", "a multicast address"),
    ("ff02::1", "a multicast address"),
    ("255.255.255.255", "the broadcast address"),
    ("240.0.0.1", "reserved"),
    ("0.0.0.8", "an address of 0.0.0.0/8"),
])
def test_names_may_not_resolve_to_special_addresses(address: str, reason: str) -> None:
    assert refused_destination(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", [
    "192.0.2.10", "198.51.100.7", "203.0.113.5", "10.1.2.3", "172.16.0.1", "192.168.1.1",
    "2001:db8::1", "fd12:3456::1", "100.64.0.1",
])
def test_ordinary_unicast_addresses_are_allowed(address: str) -> None:
    # Private ranges are allowed: an internal service is a legitimate
    # endpoint (threat_model/egress.md states what that means).
    assert refused_destination(ipaddress.ip_address(address)) is None


def test_literals_are_checked_only_for_being_tcp_destinations() -> None:
    assert unusable_destination(ipaddress.ip_address("169.254.169.254")) is None
    assert unusable_destination(ipaddress.ip_address("127.0.0.1")) is None
    assert unusable_destination(ipaddress.ip_address("224.0.0.1")) == "a multicast address"


@pytest.mark.parametrize(("name", "valid"), [
    ("a", True), ("a-b.c", True), ("x" * 63 + ".org", True), ("a." * 126 + "b", True),
    ("a." * 127 + "b", False), ("a..b", False), (".a", False), ("a.", False), ("", False),
    ("a.1", False), ("1a.b", True),
])
def test_dns_name_shape(name: str, *, valid: bool) -> None:
    assert is_dns_name(name) is valid
