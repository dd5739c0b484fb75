# SPDX-License-Identifier: Apache-2.0
"""The engine <-> watchdog protocol: one JSON object per line over two pipes.

Engine to watchdog (the watchdog's stdin; its EOF means the engine died):
`config` (first line, once), `register`, `unregister`, `shutdown`.
Watchdog to engine (the watchdog's stdout): `ready` or `failed` (answer to
`config`), `registered` or `refused` (answer to each `register`), `engaged`
(a flag was seen), `killed` (one step tree is gone).

Every message has a `type` and exactly the fields of its class: unknown or
missing fields, wrong types (a bool is not an int), duplicate keys, NaN or
Infinity and lines over `MAX_LINE_BYTES` are refused. Both ends are haios,
so a malformed line is a bug or a corrupted channel; it raises
`InternalError`, and each side treats it as losing the other.

No I/O: this module turns messages into bytes and back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar, Final

from haios._util.strict_json import StrictJSONError, parse_strict_json
from haios.errors import InternalError

MAX_LINE_BYTES: Final = 64 * 1024
PROTOCOL_VERSION: Final = 1

SCOPE_GLOBAL: Final = "global"
SCOPE_STEP: Final = "step"
SCOPE_ENGINE_LOST: Final = "engine_lost"
FLAG_SCOPES: Final = frozenset({SCOPE_GLOBAL, SCOPE_STEP})
KILL_SCOPES: Final = frozenset({SCOPE_GLOBAL, SCOPE_STEP, SCOPE_ENGINE_LOST})


@dataclasses.dataclass(frozen=True)
class Config:
    """First line to the watchdog: what to watch and where to record.

    Attributes:
        version: `PROTOCOL_VERSION`.
        run_id: the run's id (for the journal).
        control_dir: `<os_root>/control`, absolute.
        extra_paths: the policy's operator-wide flag paths, absolute.
        journal_path: the watchdog's append-only journal, absolute.
        run_cgroup: the run's parent cgroup; registered cgroups are its children.
        poll_interval_seconds: the polling period when inotify is off.
        use_inotify: False forces polling (tests, or file systems without it).
    """

    TYPE: ClassVar[str] = "config"
    version: int
    run_id: str
    control_dir: str
    extra_paths: tuple[str, ...]
    journal_path: str
    run_cgroup: str
    poll_interval_seconds: float
    use_inotify: bool


@dataclasses.dataclass(frozen=True)
class Register:
    """Watch one step: its flag, and its cgroup to kill."""

    TYPE: ClassVar[str] = "register"
    step_id: str
    cgroup: str


@dataclasses.dataclass(frozen=True)
class Unregister:
    """Stop watching a step (it ended); its cgroup is no longer killed."""

    TYPE: ClassVar[str] = "unregister"
    step_id: str


@dataclasses.dataclass(frozen=True)
class Shutdown:
    """The run is over: kill anything still registered and exit."""

    TYPE: ClassVar[str] = "shutdown"


@dataclasses.dataclass(frozen=True)
class Ready:
    """The watchdog watches; `inotify` says whether the fast path is on."""

    TYPE: ClassVar[str] = "ready"
    pid: int
    inotify: bool


@dataclasses.dataclass(frozen=True)
class Failed:
    """The watchdog could not start; it exits after sending this."""

    TYPE: ClassVar[str] = "failed"
    reason: str


@dataclasses.dataclass(frozen=True)
class Registered:
    """A `register` was handled (any kill it caused was reported first)."""

    TYPE: ClassVar[str] = "registered"
    step_id: str


@dataclasses.dataclass(frozen=True)
class Refused:
    """A `register` was refused; the step must not start."""

    TYPE: ClassVar[str] = "refused"
    step_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Engaged:
    """A flag was seen and latched for the rest of the run.

    Attributes:
        scope: "global" or "step".
        flag: the flag's path (with the reason if it could not be examined).
        step_id: the step a per-step flag names, None for a global flag.
    """

    TYPE: ClassVar[str] = "engaged"
    scope: str
    flag: str
    step_id: str | None


@dataclasses.dataclass(frozen=True)
class Killed:
    """One step's tree was killed.

    Attributes:
        scope: "global", "step" or "engine_lost" (the metric's label values).
        flag: the flag that caused it, None for engine_lost.
        step_id: the step whose tree was killed.
        latency_seconds: from the moment the watchdog saw the cause (flag
            event, or a register while a flag was latched) to the moment the
            step cgroup reported `populated 0`.
        complete: False when the tree was not empty by the kill deadline.
        cpu_seconds: the tree's CPU time from cgroup accounting, or None.
    """

    TYPE: ClassVar[str] = "killed"
    scope: str
    flag: str | None
    step_id: str
    latency_seconds: float
    complete: bool
    cpu_seconds: float | None


Message = (
    Config
    | Register
    | Unregister
    | Shutdown
    | Ready
    | Failed
    | Registered
    | Refused
    | Engaged
    | Killed
)
_CLASSES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        Config,
        Register,
        Unregister,
        Shutdown,
        Ready,
        Failed,
        Registered,
        Refused,
        Engaged,
        Killed,
    )
}


def encode(message: Message) -> bytes:
    """Serialize one message as a single JSON line (with the trailing LF).

    Raises:
        InternalError: the message holds a value JSON cannot carry exactly
            (NaN, Infinity) or is longer than `MAX_LINE_BYTES`.
    """
    body: dict[str, Any] = {"type": message.TYPE}
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        body[field.name] = list(value) if isinstance(value, tuple) else value
    try:
        line = json.dumps(body, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except ValueError as e:
        raise InternalError(f"cannot encode {message.TYPE}: {e}") from e
    data = line.encode("utf-8") + b"\n"
    if len(data) > MAX_LINE_BYTES:
        raise InternalError(f"{message.TYPE} message exceeds {MAX_LINE_BYTES} bytes")
    return data


def _check_value(kind: str, value: Any, name: str) -> Any:
    """Check one field against its annotation; return it in its final type."""
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if value is None and optional:
        return None
    ok: bool
    if base == "str":
        ok = isinstance(value, str)
    elif base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    elif base == "tuple[str, ...]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if ok:
            value = tuple(value)
    else:
        raise InternalError(f"field {name} has an unsupported type {kind}")
    if not ok:
        raise InternalError(f"field {name!r} is not a {kind}")
    return value


def decode(line: bytes) -> Message:
    """Parse one line (with or without its LF) into a message.

    Raises:
        InternalError: the line is too long, not UTF-8, not strict JSON, not
            an object, of an unknown type, or its fields do not match.
    """
    if len(line) > MAX_LINE_BYTES:
        raise InternalError("watchdog message too long")
    try:
        body = parse_strict_json(line.rstrip(b"\n"))
    except StrictJSONError as e:
        raise InternalError(f"malformed watchdog message: {e}") from e
    if not isinstance(body, dict):
        raise InternalError("watchdog message is not a JSON object")
    cls = _CLASSES.get(body.pop("type", None))
    if cls is None:
        raise InternalError("watchdog message has an unknown type")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if set(body) != set(fields):
        raise InternalError(f"{cls.TYPE} message fields do not match")
    values = {name: _check_value(str(f.type), body[name], name) for name, f in fields.items()}
    message = cls(**values)
    _check_semantics(message)
    return message


def _check_semantics(message: Message) -> None:
    """Check values a field type cannot express (scopes, version, sign)."""
    if isinstance(message, Engaged) and message.scope not in FLAG_SCOPES:
        raise InternalError(f"engaged message has an unknown scope {message.scope!r}")
    if isinstance(message, Killed):
        if message.scope not in KILL_SCOPES:
            raise InternalError(f"killed message has an unknown scope {message.scope!r}")
        if message.latency_seconds < 0:
            raise InternalError("killed message has a negative latency")
    if isinstance(message, Config) and message.version != PROTOCOL_VERSION:
        raise InternalError(f"unsupported watchdog protocol version {message.version}")
