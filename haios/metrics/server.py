# SPDX-License-Identifier: Apache-2.0
"""Serving a registry on `--metrics-addr` (loopback by default), and parsing it.

I/O: the server listens on a socket and answers scrapes from its own threads.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import sys
import threading
from typing import TYPE_CHECKING, Final, NoReturn
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from haios.errors import EnvironmentUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable


_log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_SECONDS: Final = 5.0
#: Clients served at once; more are disconnected on arrival.
SCRAPE_CLIENTS_MAX: Final = 32
_CLOSE_JOIN_SECONDS: Final = 5.0
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")
_PORT_MAX: Final = 65535


class MetricsServer:
    """A running `/metrics` endpoint; `close()` stops it."""

    def __init__(self, httpd: _MetricsHTTPServer, thread: threading.Thread) -> None:
        """Wrap a serving server and its thread; use `MetricsRecorder.serve`.

        Args:
            httpd: the bound, serving WSGI server.
            thread: the thread running `httpd.serve_forever`.
        """
        self._httpd = httpd
        self._thread = thread

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is real even when 0 was asked."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving and release the socket.

        Side Effects:
            Stops the serving thread and closes the listening socket.
        """
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(_CLOSE_JOIN_SECONDS)


class _QuietHandler(WSGIRequestHandler):
    """Request handler with a socket timeout and no per-request logging."""

    timeout = SCRAPE_TIMEOUT_SECONDS

    def log_message(self, *_args: object) -> None:
        """Log nothing per request: a scrape every few seconds is noise."""


# What socketserver hands a TCP server's request methods.
_Request = socket.socket | tuple[bytes, socket.socket]


class _MetricsHTTPServer(ThreadingWSGIServer):
    """prometheus_client's threading server, with a bound on concurrent clients.

    Each client gets a thread; past `SCRAPE_CLIENTS_MAX` at once, new
    connections are closed at once, so a flood of slow clients costs at most
    that many sleeping threads and never the engine's progress.
    """

    client_slots: threading.BoundedSemaphore

    def process_request(self, request: _Request, client_address: object) -> None:
        """Serve the client in a thread if a slot is free, else hang up."""
        if not self.client_slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.client_slots.release()
            raise

    def process_request_thread(self, request: _Request, client_address: object) -> None:
        """Serve one client, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.client_slots.release()

    def handle_error(self, _request: _Request, client_address: object) -> None:
        """Log a failed request quietly: a client timing out is routine, not news.

        The base class prints a traceback to stderr, where the engine's
        diagnostics go; an idle or malicious client must not flood it.
        """
        _log.debug("metrics client %s dropped: %s", client_address, sys.exc_info()[1])


# -- --metrics-addr ---------------------------------------------------------------


def parse_metrics_addr(text: str) -> tuple[str, int]:
    """Parse `--metrics-addr` as HOST:PORT. Pure.

    HOST is an IPv4 literal (`127.0.0.1`, `0.0.0.0`), a bracketed IPv6
    literal (`[::1]`), or `localhost`; hostnames are refused so the listener
    never depends on DNS. PORT is 1-65535 in plain decimal.

    Args:
        text: the option's value.

    Returns:
        (host, port), with an IPv6 host unbracketed (`("::1", 9100)`).

    Raises:
        ValueError: the text is not of that form; the message says why.
    """
    host_part, sep, port_part = text.rpartition(":")
    if not sep or not host_part:
        msg = f"--metrics-addr {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464"
        raise ValueError(msg)
    return _parse_host(host_part, text), _parse_port(port_part, text)


def _parse_host(host: str, text: str) -> str:
    """Return the host of `parse_metrics_addr`, unbracketed."""
    if host == "localhost":
        return host
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:
        msg = f"--metrics-addr {text!r}: put an IPv6 address in brackets, e.g. [::1]:9464"
        raise ValueError(msg)
    literal = host[1:-1] if bracketed else host
    parse: Callable[[str], ipaddress.IPv4Address | ipaddress.IPv6Address] = (
        ipaddress.IPv6Address if bracketed else ipaddress.IPv4Address
    )
    # No zone ids (`%eth0`): an interface name is not an address.
    if "%" in literal:
        _bad_host(text)
    try:
        return str(parse(literal))
    except ValueError:
        _bad_host(text)


def _bad_host(text: str) -> NoReturn:
    """Raise the error for a host that is not an IP literal or localhost."""
    msg = f"--metrics-addr {text!r}: HOST must be an IPv4 address, [IPv6] address or localhost"
    raise ValueError(msg)


def _parse_port(port: str, text: str) -> int:
    """The port of `parse_metrics_addr`."""
    if not _PORT_RE.fullmatch(port) or int(port) > _PORT_MAX:
        msg = f"--metrics-addr {text!r}: PORT must be a number from 1 to {_PORT_MAX}"
        raise ValueError(msg)
    return int(port)


def serve_registry(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve `/metrics` from `registry` on `host:port` only.

    Raises:
        EnvironmentUnavailableError: the address cannot be resolved or bound.

    Side Effects:
        Binds a listening socket and starts a daemon thread serving it;
        each client gets its own thread (at most `SCRAPE_CLIENTS_MAX` at
        once), dropped after `SCRAPE_TIMEOUT_SECONDS` of silence.
    """
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]

        class _Server(_MetricsHTTPServer):
            """The server for this address's family (IPv4 or IPv6)."""

            address_family = family

        httpd = make_server(
            str(sockaddr[0]),
            port,
            make_wsgi_app(registry),
            _Server,
            handler_class=_QuietHandler,
        )
    except OSError as e:
        msg = f"cannot serve metrics on {host}:{port}: {e.strerror or type(e).__name__}"
        raise EnvironmentUnavailableError(msg) from e
    httpd.client_slots = threading.BoundedSemaphore(SCRAPE_CLIENTS_MAX)
    thread = threading.Thread(target=httpd.serve_forever, name="haios-metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)
