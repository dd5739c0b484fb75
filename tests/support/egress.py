# SPDX-License-Identifier: Apache-2.0
"""Network fixtures for the egress tests: recorders, another host, a test CA, HTTPS.

Every address used here is either loopback or inside a network namespace
the test creates itself (`OtherHost`: `ip netns add` plus a veth pair in
198.18.0.0/15, the benchmarking range no real network uses). Nothing here
dials an outside address, a private-range address of the host's network or
the instance-metadata address.

- `Recorder`: a TCP listener on the host's loopback that records every
  connection and its bytes, and answers a fixed greeting.
- `UdpRecorder`: a UDP socket on the host's loopback that records datagrams.
- `OtherHost`: a network namespace standing for another machine, reached
  from the host over a veth pair, running TCP and UDP recorders (and an
  optional HTTPS server) inside it.
- `TestCA`: a certificate authority made in the test (cryptography), issuing
  server certificates for names and addresses.
- `HttpsServer`: an HTTPS server on the host's loopback with such a
  certificate, counting the requests it served.

Test code only; does process, network and file I/O.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import ipaddress
import itertools
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: Python run inside egress probes (after a `results = {}`): `attempt`
#: records each action's result, errno or "timeout" and how long it took;
#: `udp` sends one datagram and waits a second for an answer. Each test
#: file adds the `tcp` it needs.
PROBE_NET = r"""
import socket, ssl, time, urllib.error, urllib.request
def attempt(name, action):
    start = time.monotonic()
    try:
        results[name] = action()
    except socket.timeout:
        results[name] = "timeout"
    except OSError as exc:
        if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, OSError):
            exc = exc.reason
        results[name] = exc.errno if exc.errno is not None else repr(exc)
    results[name + "_seconds"] = time.monotonic() - start
def udp(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        sock.connect((host, port))
        sock.send(b"udp-escape")
        return sock.recv(100).decode()
"""

_networks = itertools.count((os.getpid() * 7) % 200)


class Recorder:
    """A TCP listener on the host that records what reaches it."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0,
                 greeting: bytes = b"recorder\n") -> None:
        self.server = socket.create_server((address, port), backlog=64)
        self.address, self.port = self.server.getsockname()[:2]
        self.greeting = greeting
        self.connections: list[bytes] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _peer = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        received = bytearray()
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                conn.sendall(self.greeting)
                while data := conn.recv(65536):
                    received += data
        with self._lock:
            self.connections.append(bytes(received))

    def received(self, settle_seconds: float = 0.2) -> list[bytes]:
        """The connections seen so far (after a short settle)."""
        time.sleep(settle_seconds)
        with self._lock:
            return list(self.connections)

    def close(self) -> None:
        # shutdown first: it wakes the thread blocked in accept(), which a
        # bare close would leave listening.
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UdpRecorder:
    """A UDP socket on the host that records datagrams."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]

    def received(self) -> list[bytes]:
        got: list[bytes] = []
        with contextlib.suppress(OSError):
            while True:
                got.append(self.sock.recvfrom(65536)[0])
        return got

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


#: run inside another host's namespace: TCP and UDP recorders, optional HTTPS
_OTHER_HOST_SERVER = r"""
import json, socket, ssl, sys, threading, http.server
address, tcp_port, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
https = json.loads(sys.argv[4])
lock = threading.Lock()
def log(kind, data):
    with lock, open(log_path, "a") as out:
        out.write(json.dumps({"kind": kind, "data": data.hex()}) + "\n")
tcp = socket.create_server((address, tcp_port), backlog=64)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((address, tcp_port))
def handle(conn):
    got = b""
    with conn:
        conn.settimeout(10)
        try:
            conn.sendall(b"other-host\n")
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                got += data
        except OSError:
            pass
    log("tcp", got)
def serve_tcp():
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
def serve_udp():
    while True:
        data, _ = udp.recvfrom(65536)
        log("udp", data)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        log("https", self.path.encode())
        body = https["body"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
for spec in https["servers"]:
    httpd = http.server.ThreadingHTTPServer((address, spec["port"]), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(spec["cert"], spec["key"])
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
serve_tcp()
"""


class OtherHost:
    """A network namespace standing for another machine, reached over a veth pair.

    The host side of the pair is `host_address`, the namespace side
    `address` (a /30 of 198.18.0.0/15); a TCP and a UDP recorder listen on
    `address:port` inside, plus the HTTPS servers asked for.
    """

    def __init__(self, workdir: Path, *, https: list[dict[str, Any]] | None = None,
                 body: str = "other host over TLS\n") -> None:
        index = next(_networks) % 250
        tag = f"{os.getpid() % 10000}{index}"
        self.namespace = f"hgo{tag}"
        self.host_link, self.peer_link = f"hgh{tag}", f"hgp{tag}"
        base = ipaddress.IPv4Address("198.18.0.0") + index * 256
        self.host_address, self.address = str(base + 1), str(base + 2)
        self.port = 9000 + index
        self.log = workdir / f"{self.namespace}.jsonl"
        self.https = https or []
        self.body = body
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> OtherHost:
        _ip("netns", "add", self.namespace)
        try:
            _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.peer_link)
            _ip("link", "set", self.peer_link, "netns", self.namespace)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
            _ip("link", "set", self.host_link, "up")
            _ip("-n", self.namespace, "addr", "add", f"{self.address}/30", "dev", self.peer_link)
            _ip("-n", self.namespace, "link", "set", self.peer_link, "up")
            _ip("-n", self.namespace, "link", "set", "lo", "up")
            self.log.write_text("")
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, sys.executable, "-c",
                 _OTHER_HOST_SERVER, self.address, str(self.port), str(self.log),
                 json.dumps({"servers": self.https, "body": self.body})],
                stdout=subprocess.PIPE, text=True)
            assert self.process.stdout is not None
            assert self.process.stdout.readline().strip() == "ready"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", self.namespace)

    def received(self, kind: str, settle_seconds: float = 0.2) -> list[bytes]:
        """What reached the namespace's recorders (`tcp`, `udp` or `https`)."""
        time.sleep(settle_seconds)
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [bytes.fromhex(line["data"]) for line in lines if line["kind"] == kind]


class TestCA:
    """A certificate authority created for one test."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haios test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.cert_path = directory / "ca.pem"
        self.cert_path.write_bytes(self.pem)

    def issue(self, stem: str, names: list[str]) -> tuple[Path, Path]:
        """A server certificate for DNS names and IP addresses; (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        os.chmod(cert_path, 0o644)
        os.chmod(key_path, 0o644)  # read by the other host's server process (root too)
        return cert_path, key_path


class HttpsServer:
    """An HTTPS server on the host's loopback, counting the requests it served."""

    def __init__(self, cert: Path, key: Path, body: bytes, address: str = "127.0.0.1") -> None:
        served: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                return

        self.served = served
        self.httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HttpsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
