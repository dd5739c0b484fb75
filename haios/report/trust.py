# SPDX-License-Identifier: Apache-2.0
"""The report's trust root: the operator's public policy folder, read only.

The report trusts nothing in os_root (contract section 1). It reads
`policy.toml`, the role keys, the engine's public key and the sandbox
profiles from the policy folder through `PolicyFolder` (no symlink
followed, owner root or the caller, not writable by group or others, size
capped). Keys become securesystemslib keys (Ed25519 or ECDSA P-256 only).
Profiles are hashed, not compiled: the report runs on an auditor's machine
that may have no libseccomp, and it only compares the digest each engine
link records with the policy's file. Anything wrong is a `PolicyLoadError`
(exit 6). Does I/O on the policy folder only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import ValidationError

from haios._util.signer_api import SSlibKey
from haios.errors import PolicyLoadError
from haios.load.parse import describe_validation_error
from haios.load.policy_folder import PolicyFolder
from haios.models.policy import LimitsSection, PolicyFile, Role

POLICY_FILE: Final = "policy.toml"
POLICY_MAX_BYTES: Final = 256 << 10
KEY_MAX_BYTES: Final = 16 << 10
PROFILE_MAX_BYTES: Final = 256 << 10
PROFILES_DIR: Final = "profiles"


@dataclasses.dataclass(frozen=True)
class TrustedKeys:
    """A role: its keys (distinct key material) and threshold."""

    keys: tuple[SSlibKey, ...]
    threshold: int

    @property
    def keyids(self) -> list[str]:
        """The key ids, in policy order."""
        return [key.keyid for key in self.keys]


@dataclasses.dataclass(frozen=True)
class Trust:
    """What the report verifies against."""

    directory: Path
    planner: TrustedKeys
    functionary: TrustedKeys
    engine_key: SSlibKey
    #: profile name -> SHA-256 of `profiles/<name>.toml`
    profiles: dict[str, str]
    limits: LimitsSection
    vault_scopes: frozenset[str]


def parse_public_pem(pem: bytes, *, label: str) -> SSlibKey:
    """A PEM SubjectPublicKeyInfo as a securesystemslib key (Ed25519 or P-256).

    Raises:
        PolicyLoadError: not PEM, or another key type.
    """
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise PolicyLoadError(f"{label}: not a PEM public key") from exc
    if isinstance(key, ed25519.Ed25519PublicKey):
        return SSlibKey.from_crypto(key)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return SSlibKey.from_crypto(key, scheme="ecdsa-sha2-nistp256")
    raise PolicyLoadError(f"{label}: only Ed25519 and ECDSA P-256 keys are accepted")


def _role(folder: PolicyFolder, name: str, role: Role) -> TrustedKeys:
    """Load a role's keys; refuse the same key twice."""
    keys: list[SSlibKey] = []
    for relative in role.keys:
        label = f"policy role {name}: {relative}"
        key = parse_public_pem(folder.read(relative, max_bytes=KEY_MAX_BYTES, label=label),
                               label=label)
        if any(known.keyid == key.keyid for known in keys):
            raise PolicyLoadError(f"policy role {name}: {relative} repeats a key")
        keys.append(key)
    return TrustedKeys(tuple(keys), role.threshold)


def load_trust(directory: Path) -> Trust:
    """Read the policy folder the report verifies against.

    Raises:
        PolicyLoadError: the folder, policy.toml, a key or a profile is
            missing, unsafe or invalid (exit 6).

    Side Effects:
        Reads files under `directory`.
    """
    with PolicyFolder.open(directory) as folder:
        raw = folder.read(POLICY_FILE, max_bytes=POLICY_MAX_BYTES)
        try:
            model = PolicyFile.model_validate(tomllib.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyLoadError(f"policy {POLICY_FILE}: not valid TOML") from exc
        except ValidationError as exc:
            raise PolicyLoadError(f"policy {POLICY_FILE}: "
                                  f"{describe_validation_error(exc)}") from exc
        planner = _role(folder, "planner", model.roles.planner)
        functionary = _role(folder, "functionary", model.roles.functionary)
        label = f"policy engine.public_key: {model.engine.public_key}"
        engine_key = parse_public_pem(
            folder.read(model.engine.public_key, max_bytes=KEY_MAX_BYTES, label=label),
            label=label)
        profiles = {
            entry[: -len(".toml")]: hashlib.sha256(folder.read(
                f"{PROFILES_DIR}/{entry}", max_bytes=PROFILE_MAX_BYTES)).hexdigest()
            for entry in folder.names(PROFILES_DIR) if entry.endswith(".toml")
        }
    return Trust(directory, planner, functionary, engine_key, profiles, model.limits,
                 frozenset(model.vault_scopes))
