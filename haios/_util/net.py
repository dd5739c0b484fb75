# SPDX-License-Identifier: Apache-2.0
"""Whether a host name or address is this machine's loopback. Pure."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (an IP literal or that one name).

    Any other name is not loopback: deciding from a resolver's answer would
    let whoever controls the resolver decide.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
