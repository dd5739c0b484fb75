# SPDX-License-Identifier: Apache-2.0
"""DIR/policy.toml (contract section 11): the operator's trust and limits.

Only `schema`, `roles`, `engine` and `kill_switch` are required; every other
table has the safe default documented on its field (see policy/README.md).
Limits may be lowered below the contract's ceilings, never raised past
them. No I/O.
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from typing import Annotated, Final, Literal, Self

from pydantic import AfterValidator, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from haios._util.net import is_loopback_host
from haios.models.common import EnvName, Identifier, StrictModel

POLICY_SCHEMA = "haios/policy/v1"

# Contract section 12 ceilings.
PLAN_MAX_BYTES: Final = 1 << 20
SIG_MAX_BYTES: Final = 64 << 10
LINK_MAX_BYTES: Final = 1 << 20
COST_REPORT_MAX_BYTES: Final = 4 << 10
JSON_MAX_DEPTH: Final = 32

# Environment names a plan can never set: the contract's three families, the
# names the engine itself sets, and the shell start-up hooks /bin/sh honours.
ALWAYS_DENIED_PREFIXES: Final = ("LD_", "PYTHON", "HAIOS_")
ALWAYS_DENIED_NAMES: Final = frozenset({"PATH", "HOME", "VAULT_ADDR", "VAULT_TOKEN"})
DEFAULT_DENIED_NAMES: Final = (
    "BASH_ENV", "ENV", "PS4", "SHELLOPTS", "BASHOPTS", "CDPATH", "GLOBIGNORE", "IFS",
    "PERL5OPT", "PERL5LIB", "RUBYOPT", "NODE_OPTIONS", "GCONV_PATH", "LOCPATH", "MALLOC_CHECK_",
)


def _inside_folder(path: str) -> str:
    # The loader walks these components one directory at a time; a `..`
    # would leave the folder, and `.` or an empty component is ambiguous.
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"path {path!r} leaves the policy folder or is not normalised")
    return path


RelPath = Annotated[str, StringConstraints(min_length=1, max_length=255,
                                           pattern=r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$"),
                    AfterValidator(_inside_folder)]
AbsPath = Annotated[str, StringConstraints(min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")]
VaultPolicyName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,127}$")]

SIGNING_KEY_PATTERN: Final = r"^(file2:/|hv:)[^\x00]{1,4096}$"
# The same language, matched by Python's re. Given to pydantic as a pattern,
# the rust-regex engine builds an automaton for the 4096-fold repetition of a
# Unicode class at every start (about 20 ms); Python's re counts instead.
_SIGNING_KEY: Final = re.compile(r"(?:file2:/|hv:)[^\x00]{1,4096}")


def _signing_key_uri(value: str) -> str:
    # The errors pydantic gives for the pattern, so messages stay the same.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "string_unicode",
            "Input should be a valid string, unable to parse raw data as a unicode string",
        ) from None
    if _SIGNING_KEY.fullmatch(value) is None:
        raise PydanticCustomError("string_pattern_mismatch",
                                  "String should match pattern '{pattern}'",
                                  {"pattern": SIGNING_KEY_PATTERN})
    return value


SigningKeyUri = Annotated[str, AfterValidator(_signing_key_uri),
                          Field(json_schema_extra={"pattern": SIGNING_KEY_PATTERN})]


class Role(StrictModel):
    """A set of trusted public keys and how many distinct ones must sign."""

    keys: list[RelPath] = Field(min_length=1, max_length=64)
    threshold: int = Field(ge=1, le=64)

    @field_validator("keys")
    @classmethod
    def _distinct(cls, keys: list[str]) -> list[str]:
        if len(set(keys)) != len(keys):
            raise ValueError("the same key file is listed twice")
        return keys

    @model_validator(mode="after")
    def _reachable(self) -> Self:
        if self.threshold > len(self.keys):
            raise ValueError(f"threshold {self.threshold} exceeds {len(self.keys)} keys")
        return self


class Roles(StrictModel):
    """Who may sign the plan and who may submit artefacts."""

    planner: Role
    functionary: Role


DEFAULT_STATE_DIR: Final = "/var/lib/haios"


class EngineSection(StrictModel):
    """The engine's own key and its private state directory.

    Attributes:
        signing_key: a securesystemslib private key URI, ``file2:/abs/path``
            or ``hv:KEY/VERSION`` (required).
        public_key: the key's public half, relative to the policy folder
            (required).
        state_dir: absolute, normalised path (not ``/``, no ``..``) of the
            root-owned directory where the engine keeps its private
            per-os_root run areas: verified input copies, scratch, uid leases
            and the watchdog journal. It lies outside every client-writable
            os_root. Default ``/var/lib/haios``.
    """

    signing_key: SigningKeyUri
    public_key: RelPath
    state_dir: AbsPath = DEFAULT_STATE_DIR

    @field_validator("state_dir")
    @classmethod
    def _normalised(cls, path: str) -> str:
        # normpath keeps a leading "//" (POSIX leaves its meaning open): refuse it too.
        if posixpath.normpath(path) != path or path.startswith("//"):
            raise ValueError(f"state_dir {path!r} must be an absolute, normalised path")
        if path == "/":
            raise ValueError("state_dir must not be the root directory")
        return path


class KillSwitchSection(StrictModel):
    """Operator-wide kill flags, outside os_root (they count as global)."""

    extra_paths: list[AbsPath] = Field(default_factory=list, max_length=64)


class VaultScope(StrictModel):
    """A Vault scope a step may name: the token gets exactly these policies."""

    policies: list[VaultPolicyName] = Field(min_length=1, max_length=32)
    ttl_seconds: int = Field(default=120, ge=1, le=86_400)
    num_uses: int = Field(default=0, ge=0, le=1_000_000)

    @field_validator("policies")
    @classmethod
    def _no_privileged_policy(cls, policies: list[str]) -> list[str]:
        if "root" in policies or "default" in policies:
            raise ValueError("a scope may not grant the root or default policy")
        if len(set(policies)) != len(policies):
            raise ValueError("a Vault policy is listed twice")
        return policies


class SandboxSection(StrictModel):
    """Identity of the step processes: each running step holds its own uid/gid.

    Uids are leased host-wide, per step, from ``uid_base`` ..
    ``uid_base + uid_count - 1``: a lease is never shared by two live steps
    on the host, and is never handed out again while a process of its
    previous holder lives. The leases are kept under `EngineSection.state_dir`,
    so every engine sharing that directory draws from the same range.

    Attributes:
        uid_base: first uid (and gid) of the range; >= 1000, choose a range no
            account on the host uses. Default 600000.
        uid_count: size of the range: how many steps can run at once on the
            host across all engines sharing the state_dir (not a bound on the
            plan's length). Default 65536 (1..1000000).
    """

    uid_base: int = Field(default=600_000, ge=1000, le=4_000_000_000)
    uid_count: int = Field(default=65_536, ge=1, le=1_000_000)


class LimitsSection(StrictModel):
    """Size and time limits; unit in each name. Defaults are the contract ceilings."""

    plan_max_bytes: int = Field(default=PLAN_MAX_BYTES, ge=1024, le=PLAN_MAX_BYTES)
    sig_max_bytes: int = Field(default=SIG_MAX_BYTES, ge=256, le=SIG_MAX_BYTES)
    link_max_bytes: int = Field(default=LINK_MAX_BYTES, ge=256, le=LINK_MAX_BYTES)
    cost_report_max_bytes: int = Field(default=COST_REPORT_MAX_BYTES, ge=16,
                                       le=COST_REPORT_MAX_BYTES)
    json_max_depth: int = Field(default=JSON_MAX_DEPTH, ge=4, le=JSON_MAX_DEPTH)
    links_max_files: int = Field(default=4096, ge=1, le=65_536)
    product_max_bytes: int = Field(default=1 << 30, ge=1, le=1 << 40)
    log_max_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    timeout_max_seconds: int = Field(default=86_400, ge=1, le=7 * 86_400)
    expires_max_days: int = Field(default=366, ge=1, le=3660)


class EnvSection(StrictModel):
    """Extra environment names plans may not set (on top of the fixed denials)."""

    deny: list[EnvName] = Field(default_factory=lambda: list(DEFAULT_DENIED_NAMES))


class LedgerSection(StrictModel):
    """Optional replay ledger outside os_root (contract section 12).

    Not implemented in this version: setting `path` is refused rather than
    silently ignored, so no operator believes a ledger protects them.
    """

    path: AbsPath | None = None

    @field_validator("path")
    @classmethod
    def _not_yet(cls, path: str | None) -> str | None:
        if path is not None:
            raise ValueError("the replay ledger is not supported by this engine version")
        return path


InstanceName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]


class MetricsSection(StrictModel):
    """Where the final metrics of a run go besides os_root (docs/metrics.md).

    Metrics served on ``--metrics-addr`` vanish when the run ends; these
    settings keep them for Prometheus. Both are off by default.

    Attributes:
        pushgateway_url: base URL of a Prometheus Pushgateway, ``http://`` or
            ``https://``, no credentials, query or fragment. The run pushes
            its metrics there every ``push_interval_seconds`` while it runs
            and once at its end. Plain ``http://`` only to a loopback host
            (127.0.0.1, ::1, localhost); any other host needs ``https://``
            and ``pushgateway_allow_remote = true``. Default: unset (no push).
        pushgateway_allow_remote: explicit consent to push to a host other
            than loopback. Default false.
        push_interval_seconds: seconds between progress pushes while a run
            runs; 1..3600, default 15.
        textfile_dir: absolute, normalised directory of a node_exporter
            textfile collector. The run's final metrics are written there
            atomically as ``haios_<instance>_<os_root id>.prom`` (mode 0644).
            It must be a root-owned directory not writable by group or
            others. Default: unset (no file).
        instance: the ``engine`` label (and grouping key) naming this engine
            in the exported series. Default: the host name, when it is a
            valid label value, else ``haios``.
    """

    pushgateway_url: Annotated[str, StringConstraints(min_length=8, max_length=2048)] | None = None
    pushgateway_allow_remote: bool = False
    push_interval_seconds: float = Field(default=15.0, ge=1.0, le=3600.0)
    textfile_dir: AbsPath | None = None
    instance: InstanceName | None = None

    @field_validator("textfile_dir")
    @classmethod
    def _textfile_normalised(cls, path: str | None) -> str | None:
        if path is None:
            return path
        if posixpath.normpath(path) != path or path.startswith("//") or path == "/":
            raise ValueError(f"textfile_dir {path!r} must be an absolute, normalised path, not /")
        return path

    @model_validator(mode="after")
    def _pushgateway_safe(self) -> Self:
        url = self.pushgateway_url
        if url is None:
            return self
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("pushgateway_url must be an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.query or parts.fragment or "@" in url:
            raise ValueError("pushgateway_url must not carry credentials, a query or a fragment")
        if parts.path not in ("", "/"):
            raise ValueError("pushgateway_url must be the gateway's base URL (no path)")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError("pushgateway_url has an invalid port") from exc
        loopback = is_loopback_host(parts.hostname)
        if not loopback and not self.pushgateway_allow_remote:
            raise ValueError("pushgateway_url names a non-loopback host: set "
                             "pushgateway_allow_remote = true to allow it")
        if not loopback and parts.scheme != "https":
            raise ValueError("pushgateway_url to a non-loopback host must use https://")
        return self


class PolicyFile(StrictModel):
    """policy.toml as a whole."""

    schema_: Literal["haios/policy/v1"] = Field(alias="schema")
    roles: Roles
    engine: EngineSection
    kill_switch: KillSwitchSection = Field(default_factory=KillSwitchSection)
    vault_scopes: dict[Identifier, VaultScope] = Field(default_factory=dict)
    sandbox: SandboxSection = Field(default_factory=SandboxSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    env: EnvSection = Field(default_factory=EnvSection)
    ledger: LedgerSection = Field(default_factory=LedgerSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)


def env_name_denied(name: str, extra: frozenset[str]) -> bool:
    """True when a plan may not set the environment variable `name`."""
    return (
        name.startswith(ALWAYS_DENIED_PREFIXES)
        or name in ALWAYS_DENIED_NAMES
        or name in extra
    )
