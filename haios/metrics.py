# SPDX-License-Identifier: Apache-2.0
"""Every Prometheus metric of contract section 10 (and ADR 0004), defined in one place.

`MetricsRecorder` owns a private `CollectorRegistry` (never the global one,
so runs and tests stay isolated), subscribes to the engine's events
(`haios.events`) and turns them into metric updates. It serves the registry
over HTTP during a run (`serve`) and writes `metrics.prom` at its end
(`write_textfile`). `parse_metrics_addr` validates `--metrics-addr`.

Label values come only from fixed lists: the contract's enumerations, a
fixed list of rejection reasons, sandbox violation kinds and egress
outcomes and refusal reasons (anything else becomes `other`), and profile
names that look like names (at most `PROFILE_LABELS_MAX` of them). A step
id, endpoint, address, path, plan id, accessor or message
never becomes a label, so neither cardinality nor an attacker's string can
reach the exposition.

What this module does not do: decide anything, or record history (metrics
are per process; `audit.jsonl` and `state.json` are the record).

I/O: `serve` listens on a socket; `write_textfile` writes into os_root
through a directory descriptor. Everything else is in-memory.
"""

from __future__ import annotations

import dataclasses
import decimal
import ipaddress
import logging
import math
import os
import re
import secrets
import socket
import stat
import sys
import threading
from typing import TYPE_CHECKING, Any, Final, NoReturn
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import ThreadingWSGIServer, generate_latest, make_wsgi_app

import haios
from haios import events
from haios.errors import EnvironmentUnavailableError, InternalError, PathError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from haios.events import Event

_log = logging.getLogger(__name__)

METRICS_FILE_NAME: Final = "metrics.prom"

# -- label values ---------------------------------------------------------------
# Contract sections 6 and 10 enumerate these; a value outside them is a bug.
PLAN_OUTCOMES: Final = (
    "pending",
    "running",
    "succeeded",
    "failed",
    "killed",
    "budget_exhausted",
    "rejected",
)
STEP_OUTCOMES: Final = (
    "pending",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "killed",
    "skipped",
)
VERIFICATION_KINDS: Final = ("plan", "artefact", "link", "digest")
VERIFICATION_RESULTS: Final = ("ok", "fail")
KILL_SCOPES: Final = ("global", "step", "engine_lost")
COST_UNITS: Final = ("cpu_seconds", "wall_seconds", "usd", "tokens")
# Not enumerated by the contract, so fixed here (attack catalog 122): the
# `reason` of every haios.errors class, plus `usage`; anything else is `other`.
OTHER: Final = "other"
REJECTION_REASONS: Final = (
    "usage",
    "input",
    "schema",
    "path",
    "verification",
    "signature",
    "threshold",
    "digest",
    "link",
    "expired",
    "replay",
    "tampered",
    "policy_denied",
    "killed",
    "budget_exhausted",
    "environment",
    "copy_failed",
    "policy",
    "sandbox",
    "vault",
    "engine_key",
    "watchdog_lost",
    "busy",
    "step_failed",
    "internal",
    OTHER,
)
# The violations a StepRunner reports (haios.sandbox.spec.StepOutcome).
SANDBOX_VIOLATION_KINDS: Final = (
    "seccomp",
    "cpu_limit",
    "file_size",
    "memory",
    "processes",
    OTHER,
)
# Egress (docs/adr/0004-egress.md): how forwarded connections ended, why the
# engine refused, and which way bytes went (haios.egress.forward keeps the
# same lists; a test keeps them in step). Anything else is `other`.
EGRESS_OUTCOMES: Final = (
    "closed",
    "reset",
    "connect_failed",
    "byte_limit",
    "step_ended",
    "error",
    OTHER,
)
EGRESS_REFUSAL_REASONS: Final = ("total_limit", "byte_limit", "resolution", OTHER)
EGRESS_DIRECTIONS: Final = ("out", "in")
# Profiles are operator-named (policy/profiles/<name>.toml), so trusted but
# open-ended: names must look like names, and only the first few get a series.
SHIPPED_PROFILES: Final = ("default", "network")
PROFILE_LABELS_MAX: Final = 16
_PROFILE_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

# -- buckets --------------------------------------------------------------------
# Steps run from milliseconds to the longest timeout a profile allows.
STEP_DURATION_BUCKETS: Final = (
    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
# A kill is expected in milliseconds; the tail shows a watchdog in trouble.
KILL_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# A scrape client gets this long per read before its connection is dropped:
# idle or slow clients must not pin server threads (attack catalog 120).
SCRAPE_TIMEOUT_SECONDS: Final = 5.0
#: Clients served at once; more are disconnected on arrival.
SCRAPE_CLIENTS_MAX: Final = 32
_CLOSE_JOIN_SECONDS: Final = 5.0
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")
_PORT_MAX: Final = 65535


@dataclasses.dataclass(frozen=True)
class _Families:
    """The contract's metric families (section 10, ADR 0004), one attribute each."""

    build_info: Gauge
    plan_runs: Counter
    steps: Counter
    steps_running: Gauge
    step_duration: Histogram
    verifications: Counter
    rejections: Counter
    kill_switch_engaged: Gauge
    kills: Counter
    kill_latency: Histogram
    vault_tokens_issued: Counter
    vault_tokens_revoked: Counter
    cost: Counter
    budget_remaining: Gauge
    sandbox_violations: Counter
    egress_connections: Counter
    egress_refusals: Counter
    egress_bytes: Counter


def _define_families(registry: CollectorRegistry) -> _Families:
    """Create every contract metric in `registry`: the one place they are named."""
    r = registry
    return _Families(
        build_info=Gauge(
            "haios_build_info", "haios build; always 1", ["version", "contract"], registry=r
        ),
        plan_runs=Counter(
            "haios_plan_runs_total", "Plan runs by final status", ["outcome"], registry=r
        ),
        steps=Counter("haios_steps_total", "Finished steps by status", ["outcome"], registry=r),
        steps_running=Gauge("haios_steps_running", "Steps running now", registry=r),
        step_duration=Histogram(
            "haios_step_duration_seconds",
            "Wall time of finished steps",
            ["profile"],
            buckets=STEP_DURATION_BUCKETS,
            registry=r,
        ),
        verifications=Counter(
            "haios_verifications_total",
            "Verifications by kind and result",
            ["kind", "result"],
            registry=r,
        ),
        rejections=Counter(
            "haios_rejections_total", "Refused inputs and runs by reason", ["reason"], registry=r
        ),
        kill_switch_engaged=Gauge(
            "haios_kill_switch_engaged", "1 while a kill switch is engaged", registry=r
        ),
        kills=Counter("haios_kills_total", "Step trees killed by scope", ["scope"], registry=r),
        kill_latency=Histogram(
            "haios_kill_latency_seconds",
            "From a flag seen to the last process of the tree reaped",
            buckets=KILL_LATENCY_BUCKETS,
            registry=r,
        ),
        vault_tokens_issued=Counter(
            "haios_vault_tokens_issued_total", "Step Vault tokens issued", registry=r
        ),
        vault_tokens_revoked=Counter(
            "haios_vault_tokens_revoked_total", "Step Vault tokens revoked", registry=r
        ),
        cost=Counter("haios_cost_total", "Cost consumed by unit", ["unit"], registry=r),
        budget_remaining=Gauge(
            "haios_budget_remaining", "Budget left by unit (+Inf: unlimited)", ["unit"], registry=r
        ),
        sandbox_violations=Counter(
            "haios_sandbox_violations_total", "Steps stopped by the sandbox", ["kind"], registry=r
        ),
        egress_connections=Counter(
            "haios_egress_connections_total",
            "Connections steps made to allowed endpoints, by how they ended",
            ["outcome"],
            registry=r,
        ),
        egress_refusals=Counter(
            "haios_egress_refusals_total",
            "Egress refused by the engine (limits reached, endpoints not resolved)",
            ["reason"],
            registry=r,
        ),
        egress_bytes=Counter(
            "haios_egress_bytes_total",
            "Bytes forwarded for steps (out: to the endpoint, in: back)",
            ["direction"],
            registry=r,
        ),
    )


def _preinitialise(families: _Families, version: str) -> None:
    """Create every enumerable child so each family shows samples from the start.

    A labelled family without children has no samples, and a scraper (or an
    alert using `increase`) cannot tell "zero" from "absent".
    """
    families.build_info.labels(version=version, contract=haios.CONTRACT_VERSION).set(1)
    for outcome in PLAN_OUTCOMES:
        families.plan_runs.labels(outcome=outcome)
    for outcome in STEP_OUTCOMES:
        families.steps.labels(outcome=outcome)
    for profile in SHIPPED_PROFILES:
        families.step_duration.labels(profile=profile)
    for kind in VERIFICATION_KINDS:
        for result in VERIFICATION_RESULTS:
            families.verifications.labels(kind=kind, result=result)
    for reason in REJECTION_REASONS:
        families.rejections.labels(reason=reason)
    for scope in KILL_SCOPES:
        families.kills.labels(scope=scope)
    for unit in COST_UNITS:
        families.cost.labels(unit=unit)
        # Unknown until the engine says: "no limit known" must not look exhausted.
        families.budget_remaining.labels(unit=unit).set(math.inf)
    for kind in SANDBOX_VIOLATION_KINDS:
        families.sandbox_violations.labels(kind=kind)
    for outcome in EGRESS_OUTCOMES:
        families.egress_connections.labels(outcome=outcome)
    for reason in EGRESS_REFUSAL_REASONS:
        families.egress_refusals.labels(reason=reason)
    for direction in EGRESS_DIRECTIONS:
        families.egress_bytes.labels(direction=direction)


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


class MetricsRecorder:
    """The contract's metrics, fed by engine events. Thread-safe.

    Attributes:
        registry: the private registry holding every contract metric.
    """

    def __init__(self, version: str = haios.__version__) -> None:
        """Create the registry and every contract metric, at zero.

        Args:
            version: the `version` label of `haios_build_info`.
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self._families = _define_families(self.registry)
        _preinitialise(self._families, version)
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._profiles: set[str] = set(SHIPPED_PROFILES)
        self._handlers: Mapping[str, Callable[[Mapping[str, Any]], None]] = {
            events.VERIFICATION: self._on_verification,
            events.REJECTION: self._on_rejection,
            events.STEP_STARTED: self._on_step_started,
            events.STEP_FINISHED: self._on_step_finished,
            events.SANDBOX_VIOLATION: self._on_sandbox_violation,
            events.COST_RECORDED: self._on_cost_recorded,
            events.BUDGET_REMAINING: self._on_budget_remaining,
            events.KILL_SWITCH: self._on_kill_switch,
            events.KILL: self._on_kill,
            events.VAULT_TOKEN_ISSUED: self._on_vault_token_issued,
            events.VAULT_TOKEN_REVOKED: self._on_vault_token_revoked,
            events.RUN_FINISHED: self._on_run_finished,
            events.EGRESS_CONNECTION: self._on_egress_connection,
            events.EGRESS_REFUSED: self._on_egress_refused,
        }

    def on_event(self, event: Event) -> None:
        """Update the metrics for one event; pass this to `EventBus.subscribe`.

        Kinds without a metric (run.started, budget.halt, product.recorded,
        vault.revoke_failed, which shows as issued minus revoked,
        egress.resolved, egress.opened, egress.closed) and unknown kinds are
        ignored.

        Args:
            event: an engine event.

        Raises:
            InternalError: a field the contract enumerates (a status, a
                verification kind or result, a kill scope, a cost unit) has
                a value outside its list, or a number field is missing,
                negative or not finite. These are publisher bugs.
        """
        handler = self._handlers.get(event.kind)
        if handler is not None:
            handler(event.fields)

    def render(self) -> bytes:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve `/metrics` from this registry on `host:port` only.

        Args:
            host: an IP literal or `localhost` (see `parse_metrics_addr`).
            port: a TCP port; 0 picks a free one (see `MetricsServer.address`).

        Returns:
            The running server.

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
                make_wsgi_app(self.registry),
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

    def write_textfile(self, dir_fd: int, name: str = METRICS_FILE_NAME) -> None:
        """Write the metrics to `name` in `dir_fd` atomically.

        Args:
            dir_fd: an open `O_DIRECTORY|O_NOFOLLOW` descriptor of os_root.
            name: the file name inside it (a single path component).

        Raises:
            PathError: `name` is not a plain file name, or a symlink, FIFO,
                device, directory or hardlinked file is at the path.
            EnvironmentUnavailableError: writing, syncing or renaming failed.

        Side Effects:
            Creates a temporary file (O_EXCL, no-follow, mode 0o600) in
            `dir_fd`, writes and fsyncs it, renames it over `name`, fsyncs the
            directory. On failure the temporary file is removed.
        """
        _check_replaceable(dir_fd, name)
        write_atomically(dir_fd, name, self.render())

    # -- event handlers (each gets the event's fields) -----------------------

    def _on_verification(self, fields: Mapping[str, Any]) -> None:
        """Count one verification by kind and result."""
        kind = _enumerated(fields, "kind", VERIFICATION_KINDS)
        result = _enumerated(fields, "result", VERIFICATION_RESULTS)
        self._families.verifications.labels(kind=kind, result=result).inc()

    def _on_rejection(self, fields: Mapping[str, Any]) -> None:
        """Count one rejection; an unlisted reason counts as `other`."""
        reason = _allowlisted(fields.get("reason"), REJECTION_REASONS)
        self._families.rejections.labels(reason=reason).inc()

    def _on_step_started(self, fields: Mapping[str, Any]) -> None:
        """Mark the step running (idempotent per step id)."""
        with self._lock:
            self._running.add(str(fields.get("step_id")))
            self._families.steps_running.set(len(self._running))

    def _on_step_finished(self, fields: Mapping[str, Any]) -> None:
        """Count the outcome, observe the duration, mark the step not running."""
        outcome = _enumerated(fields, "status", STEP_OUTCOMES)
        measured = fields.get("wall_seconds") is not None
        duration = _non_negative(fields, "wall_seconds") if measured else 0.0
        with self._lock:
            # The step id is only a set key here, never a label.
            self._running.discard(str(fields.get("step_id")))
            self._families.steps_running.set(len(self._running))
            profile = self._profile_label(fields.get("profile"))
        self._families.steps.labels(outcome=outcome).inc()
        if measured:
            self._families.step_duration.labels(profile=profile).observe(duration)

    def _on_sandbox_violation(self, fields: Mapping[str, Any]) -> None:
        """Count one violation; an unlisted kind counts as `other`."""
        kind = _allowlisted(fields.get("kind"), SANDBOX_VIOLATION_KINDS)
        self._families.sandbox_violations.labels(kind=kind).inc()

    def _on_cost_recorded(self, fields: Mapping[str, Any]) -> None:
        """Add each unit the cost record carries."""
        # Check every unit before counting any: a bad record changes nothing.
        amounts = {unit: _non_negative(fields, unit) for unit in COST_UNITS if unit in fields}
        for unit, amount in amounts.items():
            self._families.cost.labels(unit=unit).inc(amount)

    def _on_budget_remaining(self, fields: Mapping[str, Any]) -> None:
        """Set what remains of one unit; None (unlimited) is +Inf."""
        unit = _enumerated(fields, "unit", COST_UNITS)
        value = math.inf if fields.get("value") is None else _finite(fields, "value")
        self._families.budget_remaining.labels(unit=unit).set(value)

    def _on_kill_switch(self, fields: Mapping[str, Any]) -> None:
        """Show whether a kill switch is engaged."""
        engaged = fields.get("engaged")
        if not isinstance(engaged, bool):
            msg = "event kill_switch: field 'engaged' is not a bool"
            raise InternalError(msg)
        self._families.kill_switch_engaged.set(1 if engaged else 0)

    def _on_kill(self, fields: Mapping[str, Any]) -> None:
        """Count one kill and observe its latency when measured."""
        scope = _enumerated(fields, "scope", KILL_SCOPES)
        measured = fields.get("latency_seconds") is not None
        latency = _non_negative(fields, "latency_seconds") if measured else 0.0
        self._families.kills.labels(scope=scope).inc()
        if measured:
            self._families.kill_latency.observe(latency)

    def _on_vault_token_issued(self, _fields: Mapping[str, Any]) -> None:
        """Count one issued token (the accessor stays out of metrics)."""
        self._families.vault_tokens_issued.inc()

    def _on_vault_token_revoked(self, _fields: Mapping[str, Any]) -> None:
        """Count one revoked token."""
        self._families.vault_tokens_revoked.inc()

    def _on_egress_connection(self, fields: Mapping[str, Any]) -> None:
        """Count one forwarded connection by outcome and add its bytes."""
        # Check both numbers before counting anything: a bad record changes nothing.
        sent = _non_negative(fields, "bytes_out")
        received = _non_negative(fields, "bytes_in")
        outcome = _allowlisted(fields.get("outcome"), EGRESS_OUTCOMES)
        self._families.egress_connections.labels(outcome=outcome).inc()
        self._families.egress_bytes.labels(direction="out").inc(sent)
        self._families.egress_bytes.labels(direction="in").inc(received)

    def _on_egress_refused(self, fields: Mapping[str, Any]) -> None:
        """Count one refusal; an unlisted reason counts as `other`."""
        reason = _allowlisted(fields.get("reason"), EGRESS_REFUSAL_REASONS)
        self._families.egress_refusals.labels(reason=reason).inc()

    def _on_run_finished(self, fields: Mapping[str, Any]) -> None:
        """Count one finished run by its plan status."""
        outcome = _enumerated(fields, "status", PLAN_OUTCOMES)
        self._families.plan_runs.labels(outcome=outcome).inc()

    def _profile_label(self, value: object) -> str:
        """A profile name as a label: known, or new and within the cap, else `other`."""
        if not isinstance(value, str) or not _PROFILE_RE.fullmatch(value):
            return OTHER
        if value not in self._profiles:
            if len(self._profiles) >= PROFILE_LABELS_MAX:
                return OTHER
            self._profiles.add(value)
        return value


# -- field helpers (pure) --------------------------------------------------------


def _enumerated(fields: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    """A field whose values the contract enumerates; anything else is a bug."""
    value = fields.get(name)
    if value not in allowed:
        # The value is not echoed: it may be anything a publisher got wrong.
        msg = f"event field {name!r} is not one of {', '.join(allowed)}"
        raise InternalError(msg)
    return str(value)


def _allowlisted(value: object, allowed: tuple[str, ...]) -> str:
    """A label from a fixed list; anything else, attacker text included, is `other`."""
    if isinstance(value, str) and value in allowed:
        return value
    return OTHER


def _finite(fields: Mapping[str, Any], name: str) -> float:
    """A finite number field (int, float or Decimal, not bool) as a float."""
    value = fields.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float | decimal.Decimal):
        msg = f"event field {name!r} is not a number"
        raise InternalError(msg)
    number = float(value)
    if not math.isfinite(number):
        msg = f"event field {name!r} is not finite"
        raise InternalError(msg)
    return number


def _non_negative(fields: Mapping[str, Any], name: str) -> float:
    """A finite, non-negative number field as a float."""
    number = _finite(fields, name)
    if number < 0:
        msg = f"event field {name!r} is negative"
        raise InternalError(msg)
    return number


# -- metrics.prom (I/O) ----------------------------------------------------------


def _check_replaceable(dir_fd: int, name: str) -> None:
    """Refuse a bad name, or anything but a lone regular file at it (contract 12)."""
    if name in {"", ".", ".."} or "/" in name or "\0" in name:
        msg = f"{name!r} is not a plain file name"
        raise PathError(msg)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as e:
        msg = f"cannot stat {name}: {e.strerror or type(e).__name__}"
        raise EnvironmentUnavailableError(msg) from e
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        msg = f"{name} is not a regular file with a single link"
        raise PathError(msg)


def write_atomically(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600) -> None:
    """Temp file, write, fsync, rename over `name`, fsync the directory.

    The file gets exactly `mode`, whatever the umask. The temporary name
    never ends in `.prom`, so a textfile collector never reads a partial file.

    Raises:
        PathError: a directory was planted at `name`.
        EnvironmentUnavailableError: any other write, rename or sync failure.
    """
    temp = f".{name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, mode, dir_fd=dir_fd)
    except OSError as e:
        msg = f"cannot create a temporary file for {name}: {e.strerror or type(e).__name__}"
        raise EnvironmentUnavailableError(msg) from e
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # rename replaces a symlink or FIFO planted after the check without
        # following it; a directory planted since makes it fail (EISDIR).
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        _remove_quietly(dir_fd, temp)
        msg = f"cannot write {name}: {e.strerror or type(e).__name__}"
        if isinstance(e, IsADirectoryError):
            raise PathError(msg) from e
        raise EnvironmentUnavailableError(msg) from e
    try:
        os.fsync(dir_fd)
    except OSError as e:
        msg = f"cannot sync the directory of {name}: {e.strerror or type(e).__name__}"
        raise EnvironmentUnavailableError(msg) from e


def _remove_quietly(dir_fd: int, name: str) -> None:
    """Best-effort removal of a temporary file after a failure (logged, not raised)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError as e:
        # The original error is the one to report; this one is only logged.
        _log.warning("cannot remove temporary file %s: %s", name, e.strerror)


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


def is_loopback_host(host: str) -> bool:
    """True when `host` (as `parse_metrics_addr` returns it) is loopback only. Pure.

    The engine uses this to warn about, and audit, a listener other hosts
    can reach (attack catalog 123).

    Args:
        host: `localhost` or an IP literal.

    Returns:
        True for `localhost`, 127.0.0.0/8 and ::1.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
