# SPDX-License-Identifier: Apache-2.0
"""Embedded engine signatures: a `signatures` list over RFC 8785 canonical JSON.

Files the engine replaces during a run (state.json, registry_map.json)
carry their signature inside, so one atomic rename publishes content and
signature together (contract section 5). Pure, no I/O.
"""

from __future__ import annotations

from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError

from haios._util.canonical import canonical_bytes
from haios._util.signer_api import Signature, SSlibKey
from haios.errors import TamperedError


def signed_bytes(document: dict[str, Any]) -> bytes:
    """The bytes an embedded signature covers: JCS of the object minus `signatures`."""
    body = {key: value for key, value in document.items() if key != "signatures"}
    return canonical_bytes(body)


def verify_embedded(document: dict[str, Any], key: SSlibKey, *, label: str) -> None:
    """Raise TamperedError unless `key` signed `document` (entries for other keys ignored).

    Raises:
        TamperedError: no entry with `key`'s id verifies over the canonical bytes.
    """
    entries = document.get("signatures")
    if not isinstance(entries, list):
        raise TamperedError(f"{label}: no embedded signatures")
    payload = signed_bytes(document)
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("keyid") != key.keyid:
            continue
        sig = entry.get("sig")
        if not isinstance(sig, str):
            continue
        try:
            key.verify_signature(Signature(key.keyid, sig), payload)
        except (UnverifiedSignatureError, VerificationError, ValueError):
            continue
        return
    raise TamperedError(f"{label}: engine signature does not verify")
