# SPDX-License-Identifier: Apache-2.0
"""The step's network namespace: planned by the engine, built by the sandbox init.

Every step gets its own network namespace (unless its profile sets the
unsafe host network). `plan_network` (engine side, pure) turns the step's
allowed endpoints into a `NetworkPlan` of plain values; `apply_network`
(child side, in the init right after unshare(CLONE_NEWNET), while still
root) builds it:

1. bring the namespace's loopback interface up (netlink RTM_NEWLINK);
2. add each address endpoint that is not already a loopback address to
   the loopback interface as a /32 or /128 (netlink RTM_NEWADDR), so the
   step dials the very address the operator named;
3. create one listening TCP socket per endpoint, at the address the step
   will dial and the endpoint's port;
4. send the listening descriptors to the engine over the egress channel
   (SCM_RIGHTS, in route order) and close every copy the init holds.

Nothing else exists in the namespace: no other interface, no route, so any
other destination fails at once (ENETUNREACH, or ECONNREFUSED on a
loopback address nothing listens on), and UDP, ICMP and raw packets have
no way out. With no endpoint (`mode = "none"`) the loopback interface
stays down. Only the standard library is used: the launcher imports this.

No I/O at import; `apply_network` uses sockets (netlink, TCP, unix).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import struct
from typing import Final, Literal

from haios.sandbox.spec import StepEgress

NetworkMode = Literal["none", "egress", "host"]

#: the message that carries the listeners over the egress channel
LISTENERS_MESSAGE: Final = b"haios-egress-listeners/1"
#: connections the kernel queues per listener while the forwarder is busy
LISTEN_BACKLOG: Final = 64
#: the loopback interface of a fresh network namespace
LOOPBACK: Final = "lo"

# -- netlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h) -----------
_NLMSG_HEADER: Final = struct.Struct("=LHHLL")
_NLMSG_ERROR: Final = 2
_NLM_F_REQUEST: Final = 0x1
_NLM_F_ACK: Final = 0x4
_NLM_F_EXCL: Final = 0x200
_NLM_F_CREATE: Final = 0x400
_RTM_NEWLINK: Final = 16
_RTM_NEWADDR: Final = 20
_IFF_UP: Final = 0x1
_IFA_ADDRESS: Final = 1
_IFA_LOCAL: Final = 2
_IFA_F_NODAD: Final = 0x02
_RT_SCOPE_HOST: Final = 254
_IFINFOMSG: Final = struct.Struct("=BxHiII")
_IFADDRMSG: Final = struct.Struct("=BBBBI")
_RTATTR: Final = struct.Struct("=HH")
_REPLY_MAX_BYTES: Final = 8192


@dataclasses.dataclass(frozen=True)
class NetworkPlan:
    """The step's network, as plain values (crosses the launcher socket).

    Attributes:
        mode: ``none`` (own namespace, loopback down), ``egress`` (own
            namespace with listeners) or ``host`` (the host's namespace:
            the profile's unsafe host network).
        addresses: (family, address, prefix length) added to the loopback
            interface.
        listeners: (family, address, port) of each listener, in route order.
        backlog: listen(2) backlog of each listener.
    """

    mode: NetworkMode
    addresses: tuple[tuple[int, str, int], ...] = ()
    listeners: tuple[tuple[int, str, int], ...] = ()
    backlog: int = LISTEN_BACKLOG


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def plan_network(egress: StepEgress | None, *, host_network: bool) -> NetworkPlan:
    """The network plan for a step. Pure.

    Args:
        egress: the step's endpoints, or None for none.
        host_network: the profile shares the host's namespace (unsafe).

    Returns:
        The plan; ``host`` when `host_network`, ``none`` without endpoints.

    Raises:
        ValueError: endpoints together with the host network, a listen
            address that is not an IP address, or a listener (address,
            port) used twice.
    """
    if host_network:
        if egress is not None:
            raise ValueError("egress endpoints and the host network exclude each other")
        return NetworkPlan("host")
    if egress is None:
        return NetworkPlan("none")
    if not egress.routes:
        raise ValueError("egress without endpoints")
    addresses: list[tuple[int, str, int]] = []
    listeners: list[tuple[int, str, int]] = []
    for route in egress.routes:
        address = ipaddress.ip_address(route.listen)
        family = _family(route.listen)
        if (family, str(address), route.port) in listeners:
            raise ValueError(f"two endpoints listen on {route.listen} port {route.port}")
        listeners.append((family, str(address), route.port))
        # 127.0.0.0/8 and ::1 already belong to the loopback interface.
        if not address.is_loopback:
            entry = (family, str(address), address.max_prefixlen)
            if entry not in addresses:
                addresses.append(entry)
    return NetworkPlan("egress", tuple(addresses), tuple(listeners))


def hosts_entries(egress: StepEgress | None) -> tuple[tuple[str, str], ...]:
    """(address, name) lines of the step's /etc/hosts. Pure.

    ``localhost`` is always 127.0.0.1 (the namespace's own loopback); each
    allowed host name maps to its listener's address. Nothing else is
    named: the step sees only the names it may reach.
    """
    entries: list[tuple[str, str]] = [("127.0.0.1", "localhost")]
    for route in egress.routes if egress is not None else ():
        if route.host is not None and route.host != "localhost":
            entry = (route.listen, route.host)
            if entry not in entries:
                entries.append(entry)
    return tuple(entries)


# -- child side ---------------------------------------------------------------


def _attribute(kind: int, data: bytes) -> bytes:
    length = _RTATTR.size + len(data)
    return _RTATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def _netlink_request(sock: socket.socket, kind: int, flags: int, payload: bytes) -> None:
    """Send one request and wait for its acknowledgement.

    Raises:
        OSError: the kernel refused (its errno), or the reply is malformed.
    """
    sock.send(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(payload), kind,
                                 _NLM_F_REQUEST | _NLM_F_ACK | flags, 1, 0) + payload)
    reply = sock.recv(_REPLY_MAX_BYTES)
    if len(reply) < _NLMSG_HEADER.size + 4:
        raise OSError(71, "short netlink reply")  # EPROTO
    _length, reply_kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(reply)
    if reply_kind != _NLMSG_ERROR:
        raise OSError(71, f"unexpected netlink reply type {reply_kind}")
    error = struct.unpack_from("=i", reply, _NLMSG_HEADER.size)[0]
    if error:
        raise OSError(-error, os.strerror(-error))


def _link_up(sock: socket.socket, index: int) -> None:
    _netlink_request(sock, _RTM_NEWLINK, 0,
                     _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, _IFF_UP, _IFF_UP))


def _add_address(sock: socket.socket, index: int, family: int, address: str,
                 prefix: int) -> None:
    packed = socket.inet_pton(family, address)
    payload = _IFADDRMSG.pack(family, prefix, _IFA_F_NODAD, _RT_SCOPE_HOST, index)
    payload += _attribute(_IFA_LOCAL, packed) + _attribute(_IFA_ADDRESS, packed)
    _netlink_request(sock, _RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL, payload)


def _listen(family: int, address: str, port: int, backlog: int) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind((address, port))
        listener.listen(backlog)
    except BaseException:
        listener.close()
        raise
    return listener


def apply_network(plan: NetworkPlan, channel_fd: int) -> None:
    """Build the step's network in its fresh namespace (child side, as root).

    Must run after unshare(CLONE_NEWNET) and before the privilege drop
    (bringing an interface up and adding addresses need CAP_NET_ADMIN;
    ports below 1024 need CAP_NET_BIND_SERVICE).

    Args:
        plan: what to build.
        channel_fd: the egress channel (needed for mode ``egress``), or -1;
            closed here in every mode (once the listeners are sent).

    Raises:
        OSError: netlink refused, a listener could not be bound, or the
            channel is missing or broken.

    Side Effects:
        Changes the namespace's interfaces; sends descriptors; closes
        `channel_fd` and every listener this process held.
    """
    if plan.mode != "egress":
        if channel_fd >= 0:
            os.close(channel_fd)
        return
    if channel_fd < 0:
        raise OSError(9, "no egress channel")  # EBADF
    index = socket.if_nametoindex(LOOPBACK)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as netlink:
        netlink.bind((0, 0))
        _link_up(netlink, index)
        for family, address, prefix in plan.addresses:
            _add_address(netlink, index, family, address, prefix)
    listeners: list[socket.socket] = []
    try:
        for family, address, port in plan.listeners:
            listeners.append(_listen(family, address, port, plan.backlog))
        with socket.socket(fileno=channel_fd) as channel:
            socket.send_fds(channel, [LISTENERS_MESSAGE], [item.fileno() for item in listeners])
    finally:
        for listener in listeners:
            listener.close()
