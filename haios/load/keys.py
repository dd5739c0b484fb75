# SPDX-License-Identifier: Apache-2.0
"""PEM public keys -> securesystemslib keys (contract section 5).

Only Ed25519 and ECDSA P-256 are accepted; anything else (RSA, other
curves, malformed PEM) is refused, so a weak key cannot enter a role.
Pure: takes bytes.
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from haios._util.signer_api import SSlibKey


def parse_public_key(pem: bytes, *, label: str) -> SSlibKey:
    """Parse a SubjectPublicKeyInfo PEM into an SSlibKey.

    Raises:
        ValueError: not PEM, or not an Ed25519 / P-256 key.
    """
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{label}: not a PEM public key") from exc
    if isinstance(key, ed25519.Ed25519PublicKey):
        return SSlibKey.from_crypto(key)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return SSlibKey.from_crypto(key, scheme="ecdsa-sha2-nistp256")
    raise ValueError(f"{label}: only Ed25519 and ECDSA P-256 keys are accepted")


@dataclasses.dataclass(frozen=True)
class TrustedRole:
    """A role with its parsed keys (distinct key material) and threshold."""

    name: str
    keys: tuple[SSlibKey, ...]
    threshold: int

    @property
    def keyids(self) -> frozenset[str]:
        """Key ids of the role's keys."""
        return frozenset(key.keyid for key in self.keys)
