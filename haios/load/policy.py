# SPDX-License-Identifier: Apache-2.0
"""Load the operator's policy folder: policy.toml, its keys and profiles.

The policy is the only source of trust (contract section 1). Anything
wrong with it (missing, unreadable, writable by others, a bad field, a
weak or duplicated key, an invalid profile) is a `PolicyLoadError` (exit 6):
the engine refuses to run on a policy it cannot fully understand. Every
file is read through one `PolicyFolder`, so policy.toml, keys and profiles
meet the same ownership, permission, no-symlink and size rules. Does I/O
on the policy folder only.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from pydantic import ValidationError

from haios._util.signer_api import SSlibKey
from haios.errors import PolicyLoadError
from haios.load.keys import TrustedRole, parse_public_key
from haios.load.parse import describe_validation_error
from haios.load.policy_folder import PolicyFolder
from haios.models.policy import PolicyFile, Role
from haios.sandbox.profile import PROFILES_DIR, Profile, load_profile_from

POLICY_FILE = "policy.toml"
POLICY_MAX_BYTES = 256 << 10
KEY_MAX_BYTES = 16 << 10
DEFAULT_POLICY_DIR = "/etc/haios/policy"


@dataclasses.dataclass(frozen=True)
class Policy:
    """A loaded, validated policy folder."""

    directory: Path
    file: PolicyFile
    planner: TrustedRole
    functionary: TrustedRole
    engine_key: SSlibKey
    profiles: dict[str, Profile]

    @property
    def engine_role(self) -> TrustedRole:
        """The engine key as a one-key role, for verifying the engine's own outputs."""
        return TrustedRole("engine", (self.engine_key,), 1)

    @property
    def kill_paths(self) -> list[Path]:
        """The operator-wide kill flags (each counts as global)."""
        return [Path(p) for p in self.file.kill_switch.extra_paths]


def resolve_policy_dir(option: str | None, environ: dict[str, str]) -> Path:
    """`--policy`, then `$HAIOS_POLICY`, then /etc/haios/policy (contract section 2)."""
    return Path(option or environ.get("HAIOS_POLICY") or DEFAULT_POLICY_DIR)


def _load_role(folder: PolicyFolder, name: str, role: Role) -> TrustedRole:
    keys: list[SSlibKey] = []
    seen: dict[str, str] = {}
    for relative in role.keys:
        label = f"policy role {name}: {relative}"
        pem = folder.read(relative, max_bytes=KEY_MAX_BYTES, label=label)
        try:
            key = parse_public_key(pem, label=label)
        except ValueError as exc:
            raise PolicyLoadError(str(exc)) from exc
        # Distinct means distinct key material: the key id is a hash of it,
        # so a re-encoded copy of the same key collides here (go-tuf #733).
        if key.keyid in seen:
            raise PolicyLoadError(f"policy role {name}: {relative} is the same key as "
                                  f"{seen[key.keyid]}")
        seen[key.keyid] = relative
        keys.append(key)
    return TrustedRole(name, tuple(keys), role.threshold)


def _load_profiles(folder: PolicyFolder) -> dict[str, Profile]:
    names = sorted(entry[: -len(".toml")] for entry in folder.names(PROFILES_DIR)
                   if entry.endswith(".toml"))
    if "default" not in names:
        raise PolicyLoadError(f"policy {PROFILES_DIR}/: the `default` profile is missing")
    return {name: load_profile_from(folder, name) for name in names}


def load_policy(directory: Path) -> Policy:
    """Load and validate the whole policy folder.

    Raises:
        PolicyLoadError: anything missing, unsafe or invalid (exit 6).

    Side Effects:
        Reads files under `directory`.
    """
    with PolicyFolder.open(directory) as folder:
        return _load(folder)


def _load(folder: PolicyFolder) -> Policy:
    raw = folder.read(POLICY_FILE, max_bytes=POLICY_MAX_BYTES)
    shown = f"policy {POLICY_FILE}"
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyLoadError(f"{shown}: not valid TOML ({exc})") from exc
    try:
        model = PolicyFile.model_validate(document)
    except ValidationError as exc:
        raise PolicyLoadError(f"{shown}: {describe_validation_error(exc)}") from exc
    planner = _load_role(folder, "planner", model.roles.planner)
    functionary = _load_role(folder, "functionary", model.roles.functionary)
    engine_label = f"policy engine.public_key: {model.engine.public_key}"
    pem = folder.read(model.engine.public_key, max_bytes=KEY_MAX_BYTES, label=engine_label)
    try:
        engine_key = parse_public_key(pem, label=engine_label)
    except ValueError as exc:
        raise PolicyLoadError(str(exc)) from exc
    return Policy(folder.path, model, planner, functionary, engine_key, _load_profiles(folder))
