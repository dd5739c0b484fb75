# SPDX-License-Identifier: Apache-2.0
"""Signature checks of the report, through the stock libraries only.

The report re-verifies without the engine's own verification code:

- detached DSSE envelopes (`*.sig`) with `securesystemslib.dsse.Envelope`
  (threshold of distinct trusted keys), then the in-toto Statement v1 they
  carry, field by field (contract section 5);
- embedded signatures (`state.json`, `registry_map.json`) over the
  `rfc8785` canonical JSON of the object without `signatures`, with
  securesystemslib keys;
- in-toto links with `in_toto.models.metadata` (classic Metablock or DSSE).

Each `verify_*` raises a `VerificationError` subclass naming the file, or
returns what verified. Inputs are bytes already read with a cap; JSON is
parsed strictly (no duplicate keys, no NaN) before any library sees it.
Pure: no I/O.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import rfc8785
from securesystemslib.exceptions import (
    FormatError,
    UnverifiedSignatureError,
)
from securesystemslib.exceptions import (
    VerificationError as SslibVerificationError,
)

from haios._util.signer_api import Envelope, Signature, SSlibKey
from haios._util.strict_json import StrictJSONError, parse_strict_json, printable
from haios.errors import DigestError, InputError, SignatureError, ThresholdError
from haios.models.envelope import PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE

_STATEMENT_KEYS = frozenset({"_type", "subject", "predicateType", "predicate"})
_ENVELOPE_KEYS = frozenset({"payload", "payloadType", "signatures"})


def parse_json_object(data: bytes, *, label: str, max_depth: int) -> dict[str, Any]:
    """Strict JSON bytes that must hold one object.

    Raises:
        InputError: not strict JSON, or not an object.
    """
    try:
        document = parse_strict_json(data, max_depth=max_depth)
    except StrictJSONError as exc:
        raise InputError(f"{label}: {exc}") from exc
    if not isinstance(document, dict):
        raise InputError(f"{label}: not a JSON object")
    return document


def key_dict(key: SSlibKey) -> dict[str, Any]:
    """The public key in in-toto's dictionary form (with its key id)."""
    return {**key.to_dict(), "keyid": key.keyid}


@dataclasses.dataclass(frozen=True)
class SignedFile:
    """A detached signature that verified: who signed which digest."""

    name: str
    sha256: str
    signers: tuple[str, ...]


def verify_detached(sig_data: bytes, keys: Sequence[SSlibKey], threshold: int, *, name: str,
                    data_sha256: str, label: str, max_depth: int) -> SignedFile:
    """Verify `<name>.sig` binds `name` with `data_sha256` under a threshold of `keys`.

    Args:
        sig_data: the envelope file's bytes.
        keys: the trusted keys of the role.
        threshold: how many distinct keys must have signed.
        name: the subject name the statement must carry.
        data_sha256: SHA-256 of the signed file as read by the report.
        label: the envelope's os_root path, for messages.
        max_depth: JSON nesting bound.

    Returns:
        The subject and the key ids whose signatures verified.

    Raises:
        InputError: the envelope or statement is not well-formed JSON.
        SignatureError: wrong payloadType, malformed signatures, or a
            statement that is not the contract's.
        ThresholdError: fewer distinct trusted keys verified than required.
        DigestError: the subject's name or digest differs from the file.
    """
    document = parse_json_object(sig_data, label=label, max_depth=max_depth)
    if set(document) != _ENVELOPE_KEYS:
        raise SignatureError(f"{label}: a DSSE envelope has exactly {sorted(_ENVELOPE_KEYS)}")
    if document["payloadType"] != PAYLOAD_TYPE:
        raise SignatureError(f"{label}: payloadType is not {PAYLOAD_TYPE}")
    try:
        envelope = Envelope.from_dict(copy.deepcopy(document))
    except (KeyError, TypeError, ValueError, FormatError, AttributeError) as exc:
        raise SignatureError(f"{label}: malformed DSSE envelope ({type(exc).__name__})") from exc
    try:
        accepted = envelope.verify(list(keys), threshold)
    except SslibVerificationError as exc:
        raise ThresholdError(f"{label}: {printable(str(exc))}") from exc
    except ValueError as exc:
        raise ThresholdError(f"{label}: {printable(str(exc))}") from exc
    subject_name, digest = _statement_subject(envelope.payload, label, max_depth)
    if subject_name != name:
        raise DigestError(f"{label}: signs {printable(subject_name)!r}, not {name!r}")
    if digest != data_sha256:
        raise DigestError(f"{label}: signed digest differs from {name} as read")
    return SignedFile(name, digest, tuple(sorted(accepted)))


def _statement_subject(payload: bytes, label: str, max_depth: int) -> tuple[str, str]:
    """The single subject (name, sha256) of a haios signature Statement."""
    statement = parse_json_object(payload, label=f"{label} statement", max_depth=max_depth)
    if set(statement) != _STATEMENT_KEYS:
        raise SignatureError(f"{label}: the statement does not have exactly "
                             f"{sorted(_STATEMENT_KEYS)}")
    if statement["_type"] != STATEMENT_TYPE or statement["predicateType"] != PREDICATE_TYPE:
        raise SignatureError(f"{label}: not a haios signature statement")
    if statement["predicate"] != {}:
        raise SignatureError(f"{label}: the predicate must be empty")
    subjects = statement["subject"]
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise SignatureError(f"{label}: the statement needs exactly one subject")
    subject = subjects[0]
    if not isinstance(subject, dict) or set(subject) != {"name", "digest"}:
        raise SignatureError(f"{label}: malformed subject")
    digest = subject["digest"]
    if (not isinstance(subject["name"], str) or not isinstance(digest, dict)
            or set(digest) != {"sha256"} or not isinstance(digest["sha256"], str)):
        raise SignatureError(f"{label}: malformed subject")
    return subject["name"], digest["sha256"]


def verify_embedded(document: dict[str, Any], key: SSlibKey, *, label: str) -> None:
    """Verify an embedded engine signature (contract section 5).

    The signed bytes are the RFC 8785 canonical JSON of `document` without
    its `signatures` key. Entries for other key ids are ignored.

    Raises:
        SignatureError: no entry for `key` verifies, or the object cannot be
            canonicalised.
    """
    entries = document.get("signatures")
    if not isinstance(entries, list):
        raise SignatureError(f"{label}: no embedded signatures")
    body = {name: value for name, value in document.items() if name != "signatures"}
    try:
        payload = rfc8785.dumps(body)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise SignatureError(f"{label}: not canonicalisable ({type(exc).__name__})") from exc
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("keyid") != key.keyid:
            continue
        sig = entry.get("sig")
        if not isinstance(sig, str):
            continue
        try:
            key.verify_signature(Signature(key.keyid, sig), payload)
        except (UnverifiedSignatureError, SslibVerificationError, ValueError):
            continue
        return
    raise SignatureError(f"{label}: no valid engine signature")


_LINK_FIELDS = frozenset({"_type", "name", "command", "materials", "products", "byproducts",
                          "environment"})


def verify_classic_link(data: bytes, key: SSlibKey, *, label: str, max_depth: int
                        ) -> dict[str, Any]:
    """Verify a classic in-toto link signed by `key`; return its `signed` object.

    The signature is checked with securesystemslib over the link's signable
    bytes as in-toto defines them: the OLPC canonical JSON of `signed`
    (`securesystemslib.formats.encode_canonical`). Parsing once and
    checking here keeps one in-toto model round trip per link for the
    layout verification, which checks every link again with in-toto itself.

    Raises:
        InputError: not strict JSON, or not a classic link of the seven fields.
        SignatureError: no signature entry for `key` verifies.
    """
    from securesystemslib.formats import encode_canonical

    document = parse_json_object(data, label=label, max_depth=max_depth)
    signed = document.get("signed")
    if (set(document) != {"signatures", "signed"} or not isinstance(signed, dict)
            or set(signed) != _LINK_FIELDS or signed["_type"] != "link"
            or not isinstance(document["signatures"], list)):
        raise InputError(f"{label}: not a classic in-toto link")
    try:
        text = encode_canonical(signed)
    except FormatError as exc:
        raise InputError(f"{label}: not canonical JSON (a float?)") from exc
    if not isinstance(text, str):
        raise InputError(f"{label}: not canonical JSON")
    payload = text.encode("utf-8")
    for entry in document["signatures"]:
        if not isinstance(entry, dict) or entry.get("keyid") != key.keyid:
            continue
        try:
            key.verify_signature(Signature.from_dict(copy.deepcopy(entry)), payload)
        except (UnverifiedSignatureError, SslibVerificationError, KeyError, TypeError,
                ValueError):
            continue
        return signed
    raise SignatureError(f"{label}: not signed by the engine key")


def load_link(data: bytes, *, label: str, max_depth: int) -> Any:
    """Parse an in-toto link file (classic or DSSE) into in-toto's Metadata.

    Raises:
        InputError: not strict JSON, or not in-toto link metadata.
    """
    from in_toto.models.metadata import Metadata  # lazy: in-toto's cost is its imports

    document = parse_json_object(data, label=label, max_depth=max_depth)
    try:
        metadata = Metadata.from_dict(document)
        payload = metadata.get_payload()
    except Exception as exc:  # in-toto raises many types for bad input; all mean "not a link"
        raise InputError(f"{label}: not valid in-toto metadata ({type(exc).__name__})") from exc
    if getattr(payload, "_type", None) != "link":
        raise InputError(f"{label}: not an in-toto link")
    return metadata


def link_signers(metadata: Any, keys: Sequence[SSlibKey]) -> tuple[str, ...]:
    """Key ids among `keys` whose signature on the link verifies (in-toto's check)."""
    from in_toto.exceptions import SignatureVerificationError

    signers = []
    for key in keys:
        try:
            metadata.verify_signature(key_dict(key))
        except (SignatureVerificationError, FormatError, KeyError, TypeError, ValueError):
            continue
        signers.append(key.keyid)
    return tuple(signers)


def link_digests(items: Any) -> dict[str, str]:
    """`{name: {"sha256": hex}}` of a link as `{name: hex}`; other shapes are dropped."""
    found: dict[str, str] = {}
    if not isinstance(items, dict):
        return found
    for name, digest in items.items():
        if isinstance(name, str) and isinstance(digest, dict) and set(digest) == {"sha256"}:
            value = digest["sha256"]
            if isinstance(value, str):
                found[name] = value
    return found


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()
