# SPDX-License-Identifier: Apache-2.0
"""Sandbox profiles: the typed model of `DIR/profiles/<name>.toml`, its loader and lint.

A profile says what a step may do: which TCP endpoints it may reach (its
egress allowlist, docs/adr/0004-egress.md), which host paths it sees
read-only, its resource limits and its seccomp allowlist.
The format is documented for operators in `docs/sandbox.md`; each model field
below states its unit and default.

`load_profile` and `load_profile_from` are the only functions here that do
I/O: they read one file through `haios.load.policy_folder.PolicyFolder`, the
reader every policy file goes through (no symlink followed, owned by root or
the engine's user, not writable by group or others, size-capped). `Profile`
validation and `lint_profile` are pure. Every problem is reported as
`haios.errors.PolicyLoadError` with a one-line reason naming the file and field.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from haios._util.strict_json import printable
from haios.egress.endpoints import ENDPOINTS_MAX, parse_endpoint
from haios.errors import PolicyLoadError
from haios.load.policy_folder import PolicyFolder
from haios.sandbox import seccomp, syscall_policy
from haios.sandbox.seccomp_rules import (
    COMMENT,
    ArgCondition,
    SeccompPolicy,
    StrictProfileModel,
    resolve_symbolic,
)
from haios.sandbox.view import VIEW_COST_DIR, VIEW_SECRET_DIR, VIEW_WORKSPACE

_log = logging.getLogger(__name__)

PROFILE_SCHEMA: Final = "haios/profile/v1"
PROFILE_MAX_BYTES: Final = 256 * 1024
PROFILES_DIR: Final = "profiles"
PROFILE_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB
MIN_INODES: Final = 64
MAX_INODES: Final = 1 << 24

#: View paths the sandbox builds itself; a profile may not bind over them.
RESERVED_VIEW_PATHS: Final = (
    "/",
    "/proc",
    "/dev",
    "/tmp",
    "/haios",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    VIEW_WORKSPACE,
    VIEW_COST_DIR,
    VIEW_SECRET_DIR,
)

class Rlimits(StrictProfileModel):
    """Per-process resource limits (setrlimit(2)); soft = hard so the step cannot raise them.

    Core dumps are always disabled (RLIMIT_CORE = 0) and cannot be configured.

    Attributes:
        cpu_seconds: RLIMIT_CPU in seconds of CPU time per process; the
            engine lowers it to the step's budget. Default 600 (1..86400).
        address_space_bytes: RLIMIT_AS in bytes of virtual memory per
            process. Default 4 GiB (64 MiB..1 TiB).
        open_files: RLIMIT_NOFILE, descriptors per process. Default 1024
            (16..1048576).
        processes: RLIMIT_NPROC, processes and threads of the step's uid.
            Default 256 (8..65536).
        file_size_bytes: RLIMIT_FSIZE in bytes, the largest file the step
            can write. Default 1 GiB (1 MiB..1 TiB).
    """

    cpu_seconds: Annotated[int, Field(ge=1, le=86400)] = 600
    address_space_bytes: Annotated[int, Field(ge=64 * MIB, le=1024 * GIB)] = 4 * GIB
    open_files: Annotated[int, Field(ge=16, le=1048576)] = 1024
    processes: Annotated[int, Field(ge=8, le=65536)] = 256
    file_size_bytes: Annotated[int, Field(ge=MIB, le=1024 * GIB)] = GIB


class ReadOnlyPath(StrictProfileModel):
    """A host path shown read-only (nosuid, nodev) at the same place in the view.

    Attributes:
        path: absolute, normalised host path (no default). A symlink is
            recreated as the same symlink; list its target too.
        comment: why steps need it (no default; required).
        optional: true to skip the path when the host lacks it (default false:
            a missing path stops the run before any step).
    """

    path: Annotated[str, StringConstraints(min_length=2, max_length=1024)]
    comment: COMMENT
    optional: bool = False

    @model_validator(mode="after")
    def _check(self) -> ReadOnlyPath:
        if not self.path.startswith("/") or posixpath.normpath(self.path) != self.path:
            raise ValueError(f"path {self.path!r} must be absolute and normalised")
        for reserved in RESERVED_VIEW_PATHS:
            if self.path == reserved or (reserved != "/" and self.path.startswith(reserved + "/")):
                raise ValueError(f"path {self.path!r} is built by the sandbox itself")
        return self


class FilesystemPolicy(StrictProfileModel):
    """What the step sees besides its workspace, /proc, /dev and /tmp.

    Attributes:
        read_only: host paths bound read-only (at least one; no default).
        tmp_size_bytes: size of the private tmpfs at /tmp and of /dev/shm, in
            bytes. Default 64 MiB (1 MiB..16 GiB).
        tmp_inodes: inode cap (files, directories, links) of /tmp and of
            /dev/shm, each. Default 16384 (64..16777216).
        workspace_size_bytes: size of the step's workspace, a private tmpfs
            discarded after its products are copied out, in bytes. Default
            256 MiB (1 MiB..64 GiB).
        workspace_inodes: inode cap of that workspace tmpfs. Default 65536
            (64..16777216).
    """

    read_only: Annotated[tuple[ReadOnlyPath, ...], Field(min_length=1)]
    tmp_size_bytes: Annotated[int, Field(ge=MIB, le=16 * GIB)] = 64 * MIB
    tmp_inodes: Annotated[int, Field(ge=MIN_INODES, le=MAX_INODES)] = 16384
    workspace_size_bytes: Annotated[int, Field(ge=MIB, le=64 * GIB)] = 256 * MIB
    workspace_inodes: Annotated[int, Field(ge=MIN_INODES, le=MAX_INODES)] = 65536


class CgroupLimits(StrictProfileModel):
    """Limits on the step's whole process tree, enforced by cgroup controllers.

    Unlike `Rlimits` (per process or per uid), these bound every process of
    the step together, descendants that outlived their parent included. They
    are enforced with the cgroup v2 controllers where available, the v1
    controllers on a hybrid host; a host that cannot enforce them makes the
    run refuse to start (exit 6).

    Attributes:
        memory_max_bytes: memory of the whole step tree, as the memory
            controller counts it (anonymous memory, page cache, tmpfs pages
            of /tmp, /dev/shm and the workspace, kernel memory), in bytes.
            Default 1 GiB (16 MiB..1 TiB).
        pids_max: processes and threads of the whole step tree (the pids
            controller). Default 512 (8..65536).
    """

    memory_max_bytes: Annotated[int, Field(ge=16 * MIB, le=1024 * GIB)] = GIB
    pids_max: Annotated[int, Field(ge=8, le=65536)] = 512


class EgressLimits(StrictProfileModel):
    """Bounds on what one step may do through the engine's forwarder.

    They protect the engine (descriptors, threads, bandwidth, audit volume)
    from a step that floods its allowed endpoints (threat T-E04).

    Attributes:
        connections_max: connections forwarded at once; further connections
            wait in the listener's queue until one ends. Default 16 (1..1024).
        connections_total_max: connections over the step's whole life; once
            reached, the listeners are closed and later attempts are refused
            by the step's own kernel. Default 1024 (1..65536).
        bytes_max: bytes forwarded in both directions together over the
            step's whole life; once reached, every connection is cut and
            the listeners closed. Default 1 GiB (1 KiB..1 TiB).
        connect_timeout_seconds: how long the engine tries to reach a
            destination (all its addresses together) before it resets the
            step's connection. Default 10 (1..300).
    """

    connections_max: Annotated[int, Field(ge=1, le=1024)] = 16
    connections_total_max: Annotated[int, Field(ge=1, le=65536)] = 1024
    bytes_max: Annotated[int, Field(ge=1024, le=1024 * GIB)] = GIB
    connect_timeout_seconds: Annotated[int, Field(ge=1, le=300)] = 10


class Profile(StrictProfileModel):
    """One sandbox profile, as loaded from `DIR/profiles/<name>.toml`.

    Attributes:
        profile_schema: the format tag, ``schema = "haios/profile/v1"`` in
            TOML (required).
        name: the file's base name (set by the loader, not in the file).
        digest: lowercase hex SHA-256 of the file's bytes (set by the loader).
        description: what the profile is for (required).
        egress: the TCP endpoints the step may reach, each ``"vault"`` (the
            engine's VAULT_ADDR), ``"NAME:PORT"``, ``"IPV4:PORT"`` or
            ``"[IPV6]:PORT"`` (see `haios.egress.endpoints`). Default: none,
            so the step's private network namespace has no usable interface.
            At most 64, no duplicates.
        egress_limits: bounds on the step's forwarded connections (defaults
            as in `EgressLimits`).
        unsafe_host_network: true shares the host's network namespace: the
            step reaches everything the host reaches. Default false; never
            set in a shipped profile; excludes `egress`; warned on load.
        rlimits: per-process resource limits (defaults as in `Rlimits`).
        cgroup: limits on the whole step tree (defaults as in `CgroupLimits`).
        filesystem: the read-only view and the tmpfs sizes (required).
        seccomp: the system-call allowlist (required).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    profile_schema: Literal["haios/profile/v1"] = Field(alias="schema")
    name: Annotated[str, StringConstraints(pattern=PROFILE_NAME_RE.pattern)]
    digest: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    description: COMMENT
    egress: Annotated[tuple[str, ...], Field(max_length=ENDPOINTS_MAX)] = ()
    egress_limits: EgressLimits = EgressLimits()
    unsafe_host_network: bool = False
    rlimits: Rlimits = Rlimits()
    cgroup: CgroupLimits = CgroupLimits()
    filesystem: FilesystemPolicy
    seccomp: SeccompPolicy

    @model_validator(mode="after")
    def _check_egress(self) -> Profile:
        seen: set[str] = set()
        listeners: set[tuple[str, int]] = set()
        for text in self.egress:
            endpoint = parse_endpoint(text)
            if text in seen:
                raise ValueError(f"egress lists {text!r} twice")
            seen.add(text)
            if endpoint.kind in ("localhost", "address"):
                # localhost:P and 127.0.0.1:P would be one listener.
                host = "127.0.0.1" if endpoint.kind == "localhost" else endpoint.host
                if (host, endpoint.port) in listeners:
                    raise ValueError(f"egress entry {text!r} duplicates another entry")
                listeners.add((host, endpoint.port))
        if self.unsafe_host_network and self.egress:
            raise ValueError("unsafe_host_network shares the host's network: egress "
                             "cannot be combined with it")
        return self


# -- lint ---------------------------------------------------------------------


def _rule_key(syscall: str, args: tuple[ArgCondition, ...]) -> tuple[str, tuple[Any, ...]]:
    return syscall, tuple(sorted((a.index, a.op, resolve_symbolic(a.value), a.mask) for a in args))


def _lint_default(profile: Profile) -> list[str]:
    # The model type cannot hold "allow"; this guards models made with
    # model_construct(), which skips validation.
    if profile.seccomp.default_action not in ("kill_process", "errno"):
        return [f"seccomp.default_action {profile.seccomp.default_action!r} is not a deny action"]
    return []


def _lint_allow(profile: Profile) -> list[str]:
    findings: list[str] = []
    for number, rule in enumerate(profile.seccomp.allow):
        where = f"seccomp.allow[{number}]"
        if len(set(rule.syscalls)) != len(rule.syscalls):
            findings.append(f"{where} lists a system call twice")
        for name in rule.syscalls:
            if name in syscall_policy.FORBIDDEN_SYSCALLS:
                findings.append(f"{where} allows {name}, which haios always refuses")
            if name in syscall_policy.DANGEROUS_SYSCALLS and (
                len(rule.syscalls) != 1 or name not in rule.comment
            ):
                findings.append(
                    f"{where}: dangerous {name} needs a rule of its own whose comment names it"
                    f" ({syscall_policy.DANGEROUS_SYSCALLS[name]})"
                )
        if "clone" in rule.syscalls and not _clone_is_masked(rule.args):
            findings.append(f"{where}: clone must require (arg0 & CLONE_NAMESPACE_FLAGS) == 0")
        if "personality" in rule.syscalls and not _personality_is_fixed(rule.args):
            findings.append(
                f"{where}: personality must be limited to PER_LINUX or PERSONALITY_QUERY"
            )
    return findings


def _clone_is_masked(args: tuple[ArgCondition, ...]) -> bool:
    ns = syscall_policy.CLONE_NAMESPACE_FLAGS
    return any(
        a.index == 0
        and a.op == "masked_eq"
        and a.mask is not None
        and resolve_symbolic(a.mask) & ns == ns
        and resolve_symbolic(a.value) & ns == 0
        for a in args
    )


def _personality_is_fixed(args: tuple[ArgCondition, ...]) -> bool:
    return any(
        a.index == 0
        and a.op == "eq"
        and resolve_symbolic(a.value) in syscall_policy.PERSONALITY_ALLOWED
        for a in args
    )


def _lint_duplicates(profile: Profile) -> list[str]:
    findings: list[str] = []
    seen: dict[tuple[str, tuple[Any, ...]], str] = {}
    unconditional: dict[str, str] = {}
    conditional: dict[str, str] = {}
    rules = [("allow", n, r.syscalls, r.args) for n, r in enumerate(profile.seccomp.allow)]
    rules += [("deny", n, r.syscalls, r.args) for n, r in enumerate(profile.seccomp.deny)]
    for kind, number, syscalls, args in rules:
        where = f"seccomp.{kind}[{number}]"
        for name in syscalls:
            key = _rule_key(name, args)
            if key in seen:
                findings.append(f"{where}: duplicate rule for {name} (also in {seen[key]})")
                continue
            seen[key] = where
            # libseccomp merges an unconditional rule with any conditional
            # rule for the same call and silently drops the conditions, so
            # such a pair would not mean what it says.
            if not args:
                if name in unconditional or name in conditional:
                    other = unconditional.get(name) or conditional[name]
                    findings.append(f"{where}: {name} is also listed in {other}")
                unconditional[name] = where
            else:
                if name in unconditional:
                    findings.append(
                        f"{where}: {name} is also listed unconditionally in {unconditional[name]}"
                    )
                conditional.setdefault(name, where)
    return findings


def _lint_paths(profile: Profile) -> list[str]:
    findings: list[str] = []
    paths = [entry.path for entry in profile.filesystem.read_only]
    for number, path in enumerate(paths):
        if path in paths[:number]:
            findings.append(f"filesystem.read_only[{number}]: duplicate path {path}")
        for other in paths:
            if other != path and path.startswith(other + "/"):
                findings.append(f"filesystem.read_only[{number}]: {path} is inside {other}")
    return findings


def _lint_host_network(profile: Profile) -> list[str]:
    # In the host's network namespace, abstract unix socket names (dbus,
    # X11, daemons) are the host's: such a profile must not allow AF_UNIX.
    if not profile.unsafe_host_network:
        return []
    unix = syscall_policy.SYMBOLS["AF_UNIX"]
    for number, rule in enumerate(profile.seccomp.allow):
        if "socket" not in rule.syscalls:
            continue
        families = [resolve_symbolic(a.value) for a in rule.args if a.index == 0 and a.op == "eq"]
        if not families or unix in families:
            return [f"seccomp.allow[{number}]: unsafe_host_network needs socket(AF_UNIX) "
                    "refused (the host's abstract unix sockets are reachable)"]
    return []


def _lint_required(profile: Profile) -> list[str]:
    allowed = {name for rule in profile.seccomp.allow if not rule.args for name in rule.syscalls}
    findings = [
        f"seccomp.allow must include {name} (the sandbox needs it to start the step)"
        for name in syscall_policy.REQUIRED_SYSCALLS
        if name not in allowed
    ]
    if not any("clone" in rule.syscalls for rule in profile.seccomp.allow):
        findings.append("seccomp.allow must include clone (posix_spawn starts the step with it)")
    return findings


def lint_profile_result(profile: Profile) -> tuple[str, ...]:
    """Every lint finding for `profile`, without raising.

    Checks: the default action denies; no allow rule lists a call haios always
    refuses; each dangerous call has a rule of its own naming it; clone and
    personality carry the required argument filters; no call is listed twice
    in a way libseccomp would merge; no read-only path is duplicated or
    nested; the calls the sandbox itself needs are allowed; a profile with
    the unsafe host network does not allow AF_UNIX sockets.

    Returns:
        One-line findings; empty when the profile is clean.
    """
    return tuple(
        _lint_default(profile)
        + _lint_allow(profile)
        + _lint_duplicates(profile)
        + _lint_paths(profile)
        + _lint_host_network(profile)
        + _lint_required(profile)
    )


def lint_profile(profile: Profile) -> None:
    """Refuse a profile with any lint finding.

    Raises:
        PolicyLoadError: listing every finding on one line.
    """
    findings = lint_profile_result(profile)
    if findings:
        raise PolicyLoadError(f"profile {profile.name}: " + "; ".join(findings))


# -- load ---------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """Lists become tuples (the models are immutable and strict)."""
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    if isinstance(value, dict):
        return {key: _freeze(item) for key, item in value.items()}
    return value


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    return f"{printable(location)}: {printable(error['msg'])}"


def parse_profile(name: str, data: bytes) -> Profile:
    """Parse and validate profile bytes (no lint).

    Args:
        name: the profile's name (already checked).
        data: the file's bytes.

    Raises:
        PolicyLoadError: bad UTF-8, bad TOML, or a model violation.
    """
    shown = f"profiles/{name}.toml"
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyLoadError(f"{shown}: not UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyLoadError(f"{shown}: invalid TOML ({exc})") from exc
    for reserved in ("name", "digest"):
        if reserved in document:
            raise PolicyLoadError(f"{shown}: {reserved!r} is set by the engine, not the file")
    if "network" in document:
        # Refused rather than ignored: `network = true` used to share the
        # host's network, and silently meaning something else is worse.
        raise PolicyLoadError(
            f"{shown}: 'network' was replaced by 'egress' (docs/adr/0004-egress.md): list the "
            "TCP endpoints the step may reach, e.g. egress = [\"vault\"]"
        )
    document["name"] = name
    document["digest"] = hashlib.sha256(data).hexdigest()
    try:
        return Profile.model_validate(_freeze(document))
    except ValidationError as exc:
        raise PolicyLoadError(f"{shown}: {_first_error(exc)}") from exc


def load_profile(policy_dir: Path, name: str) -> Profile:
    """Load, validate and lint `policy_dir/profiles/<name>.toml`.

    Opens `policy_dir` as a `PolicyFolder` (the folder and `profiles/` are
    checked like the file) and calls `load_profile_from`.

    Args:
        policy_dir: the operator's policy folder.
        name: the profile name; must match ``^[a-z0-9][a-z0-9_-]{0,63}$``.

    Returns:
        The validated profile, with `name` and `digest` set.

    Raises:
        PolicyLoadError: as `load_profile_from`, or an unsafe policy folder.
        SandboxSetupError: libseccomp is not available.

    Side Effects:
        Reads one file.
    """
    if not PROFILE_NAME_RE.fullmatch(name):
        raise PolicyLoadError(f"profile name {name!r} does not match {PROFILE_NAME_RE.pattern}")
    with PolicyFolder.open(policy_dir) as folder:
        return load_profile_from(folder, name)


def load_profile_from(folder: PolicyFolder, name: str) -> Profile:
    """Load, validate and lint `profiles/<name>.toml` of an opened policy folder.

    The seccomp filter is compiled here too (and cached for the run), so
    an unknown system-call name is a load error, before any step runs.

    Args:
        folder: the opened policy folder.
        name: the profile name; must match ``^[a-z0-9][a-z0-9_-]{0,63}$``.

    Returns:
        The validated profile, with `name` and `digest` set.

    Raises:
        PolicyLoadError: bad name; `profiles/` or the file missing, a
            symlink, not a directory / regular file, writable by group or
            others, owned by another user or oversized; invalid TOML, unknown
            field, wrong type, a lint finding, or a rule libseccomp cannot
            compile.
        SandboxSetupError: libseccomp is not available.

    Side Effects:
        Reads one file.
    """
    if not PROFILE_NAME_RE.fullmatch(name):
        raise PolicyLoadError(f"profile name {name!r} does not match {PROFILE_NAME_RE.pattern}")
    shown = f"{PROFILES_DIR}/{name}.toml"
    data = folder.read(shown, max_bytes=PROFILE_MAX_BYTES, label=shown)
    profile = parse_profile(name, data)
    lint_profile(profile)
    try:
        seccomp.profile_program(profile)
    except PolicyLoadError as exc:
        raise PolicyLoadError(f"{shown}: {exc}") from exc
    if profile.unsafe_host_network:
        _log.warning("UNSAFE: profile %s shares the host's network namespace "
                     "(unsafe_host_network): its steps reach everything this host reaches", name)
    return profile
