# SPDX-License-Identifier: Apache-2.0
"""The launch plan: plain values the sandbox child executes, and their wire form.

A `LaunchPlan` is built by the engine (`_plan.build_plan`) and either used
directly by a forked child or sent as JSON to the launcher process over a
private socket (`to_wire` / `from_wire`). This module is imported by the
launcher, so it stays free of heavy dependencies. Pure: no I/O.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any, Final

from haios.sandbox import mounts, netns


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """One step's launch, as plain values.

    Attributes:
        step_id: for messages.
        argv: execve's argv; argv[0] is the program path.
        env: execve's environment, ``NAME=value``.
        uid: the step's uid.
        gid: the step's gid.
        namespaces: unshare(2) flags for the init (PID excluded).
        network: the step's network namespace (loopback, addresses, listeners).
        hostname: the UTS namespace's hostname.
        cgroups: cgroup directories to join (kill/accounting, limits).
        view: the filesystem view.
        rlimits: (resource, soft, hard) triples.
        cap_last_cap: highest capability number of the running kernel.
        seccomp: BPF programs, in load order (floor, profile).
        umask: the step's umask.
        dry_run: stop right before execve and exit 0 (preflight).
    """

    step_id: str
    argv: tuple[str, ...]
    env: tuple[str, ...]
    uid: int
    gid: int
    namespaces: int
    network: netns.NetworkPlan
    hostname: str
    cgroups: tuple[str, ...]
    view: mounts.ViewPlan
    rlimits: tuple[tuple[int, int, int], ...]
    cap_last_cap: int
    seccomp: tuple[bytes, ...]
    umask: int
    dry_run: bool


#: base64 of the few seccomp programs a run uses, by content
_encoded: dict[bytes, str] = {}
_ENCODED_MAX: Final = 64


#: field names of each dataclass met in a plan
_field_names: dict[type, tuple[str, ...]] = {}


def _plain(value: Any) -> Any:
    """`dataclasses.asdict` without its deep copies: tuples stay tuples (JSON
    writes them as lists) unless they hold dataclasses."""
    kind = type(value)
    if kind is tuple:
        if value and dataclasses.is_dataclass(value[0]):
            return [_plain(item) for item in value]
        return value
    names = _field_names.get(kind)
    if names is None:
        if not dataclasses.is_dataclass(kind):
            return value
        names = _field_names.setdefault(kind, tuple(f.name for f in dataclasses.fields(kind)))
    return {name: _plain(getattr(value, name)) for name in names}


def _base64(program: bytes) -> str:
    encoded = _encoded.get(program)
    if encoded is None:
        encoded = base64.b64encode(program).decode("ascii")
        if len(_encoded) >= _ENCODED_MAX:
            _encoded.clear()
        _encoded[program] = encoded
    return encoded


def to_wire(plan: LaunchPlan) -> dict[str, Any]:
    """A JSON-compatible form of `plan` (bytes as base64)."""
    data: dict[str, Any] = _plain(plan)
    data["seccomp"] = [_base64(program) for program in plan.seccomp]
    return data


def from_wire(data: dict[str, Any]) -> LaunchPlan:
    """Rebuild a plan from `to_wire` output (sent by the engine over a private socket).

    Raises:
        KeyError: a field is missing.
        TypeError: a field has the wrong shape.
        ValueError: base64 does not decode.
    """
    view = dict(data["view"])
    view["entries"] = tuple(mounts.ViewEntry(**entry) for entry in view["entries"])
    view["hosts"] = tuple((str(address), str(name)) for address, name in view["hosts"])
    network = data["network"]
    return LaunchPlan(
        step_id=str(data["step_id"]),
        argv=tuple(data["argv"]),
        env=tuple(data["env"]),
        uid=int(data["uid"]),
        gid=int(data["gid"]),
        namespaces=int(data["namespaces"]),
        network=netns.NetworkPlan(
            mode=network["mode"],
            addresses=tuple((int(f), str(a), int(p)) for f, a, p in network["addresses"]),
            listeners=tuple((int(f), str(a), int(p)) for f, a, p in network["listeners"]),
            backlog=int(network["backlog"]),
        ),
        hostname=str(data["hostname"]),
        cgroups=tuple(str(path) for path in data["cgroups"]),
        view=mounts.ViewPlan(**view),
        rlimits=tuple((int(a), int(b), int(c)) for a, b, c in data["rlimits"]),
        cap_last_cap=int(data["cap_last_cap"]),
        seccomp=tuple(base64.b64decode(program, validate=True) for program in data["seccomp"]),
        umask=int(data["umask"]),
        dry_run=bool(data["dry_run"]),
    )
