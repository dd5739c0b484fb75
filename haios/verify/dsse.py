# SPDX-License-Identifier: Apache-2.0
"""DSSE envelopes signed by a role: threshold of distinct trusted keys.

The threshold is counted by walking the role's *trusted* keys (distinct key
material, enforced when the policy loads), and a signature counts for a key
only when its `keyid` equals that key's id and it verifies with that key
over the PAE of the exact payload bytes. Other entries are ignored, never
an error that could hide a valid threshold (contract section 12). Only
after that is the payload parsed. Pure, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError

from haios._util.signer_api import Envelope, Signature, SSlibKey
from haios.errors import DigestError, SignatureError, ThresholdError
from haios.load.keys import TrustedRole
from haios.load.parse import parse_model
from haios.models.envelope import PAYLOAD_TYPE, DsseEnvelope, Statement

_STANDARD_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_URLSAFE_B64 = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


def decode_b64(text: str, *, label: str) -> bytes:
    """Decode standard or URL-safe base64 (DSSE accepts both); padding required.

    Raises:
        SignatureError: anything else (mixed alphabets, bad padding).
    """
    if len(text) % 4:
        raise SignatureError(f"{label}: base64 without padding")
    try:
        if _STANDARD_B64.fullmatch(text):
            return base64.b64decode(text, validate=True)
        if _URLSAFE_B64.fullmatch(text):
            return base64.urlsafe_b64decode(text)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{label}: invalid base64") from exc
    raise SignatureError(f"{label}: invalid base64")


def _verifies(key: SSlibKey, keyid: str, sig: bytes, pae: bytes) -> bool:
    try:
        key.verify_signature(Signature(keyid, sig.hex()), pae)
    except (UnverifiedSignatureError, VerificationError, ValueError):
        return False
    return True


@dataclasses.dataclass(frozen=True)
class VerifiedPayload:
    """An authenticated payload and the trusted key ids whose signatures verified."""

    payload: bytes
    signers: frozenset[str]


def verify_envelope(data: bytes, role: TrustedRole, *, label: str, max_depth: int
                    ) -> VerifiedPayload:
    """Verify a DSSE envelope against a role; return the authenticated payload.

    Args:
        data: the envelope file's exact bytes.
        role: trusted keys and threshold.
        label: file name for messages.
        max_depth: JSON nesting bound.

    Raises:
        InputError/SchemaError: the envelope is not well formed.
        SignatureError: wrong payloadType or no valid signature.
        ThresholdError: fewer distinct trusted keys signed than required.
    """
    envelope = parse_model(DsseEnvelope, data, label=label, max_depth=max_depth)
    if envelope.payloadType != PAYLOAD_TYPE:
        raise SignatureError(f"{label}: payloadType must be {PAYLOAD_TYPE}")
    payload = decode_b64(envelope.payload, label=f"{label} payload")
    pae = Envelope(payload, envelope.payloadType, {}).pae()
    signatures = [(entry.keyid, decode_b64(entry.sig, label=f"{label} signature"))
                  for entry in envelope.signatures]
    signed_by = {
        key.keyid for key in role.keys
        if any(keyid == key.keyid and _verifies(key, keyid, sig, pae)
               for keyid, sig in signatures)
    }
    if not signed_by:
        raise SignatureError(f"{label}: no valid signature by a trusted {role.name} key")
    if len(signed_by) < role.threshold:
        raise ThresholdError(f"{label}: {len(signed_by)} of {role.threshold} required "
                             f"{role.name} signatures")
    return VerifiedPayload(payload, frozenset(signed_by))


@dataclasses.dataclass(frozen=True)
class VerifiedStatement:
    """A detached signature's statement and who signed it."""

    statement: Statement
    signers: frozenset[str]


def verify_detached(
    sig_data: bytes, role: TrustedRole, *, name: str, sha256: str, max_depth: int,
) -> VerifiedStatement:
    """Verify `<name>.sig` binds `name` with digest `sha256` (the bytes we read).

    Raises:
        SignatureError, ThresholdError: as `verify_envelope`.
        SchemaError: the payload is not the contract's Statement.
        DigestError: the subject's name or digest differs from the file.
    """
    label = f"{name}.sig"
    verified = verify_envelope(sig_data, role, label=label, max_depth=max_depth)
    statement = parse_model(Statement, verified.payload, label=f"{label} statement",
                            max_depth=max_depth)
    subject = statement.subject[0]
    if subject.name != name:
        raise DigestError(f"{label}: signs {subject.name!r}, not {name!r}")
    if subject.digest.sha256 != sha256:
        raise DigestError(f"{label}: digest does not match {name} as read")
    return VerifiedStatement(statement, verified.signers)
