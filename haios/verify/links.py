# SPDX-License-Identifier: Apache-2.0
"""Functionary in-toto links vouching for plan inputs (contract section 5 (c)).

A link counts only when a trusted functionary key signed it (classic
Metablock over in-toto's canonical JSON, or a DSSE envelope whose payload
is a link). Its file name is a hint and never decides anything. Product
names must equal the artefact name exactly: `./data.csv` or `DATA.csv` vouch
for nothing (in-toto-golang CVE-2021-41087). Pure: bytes in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from securesystemslib.exceptions import (
    FormatError,
    UnverifiedSignatureError,
    VerificationError,
)

from haios._util.signer_api import Signature
from haios.errors import InputError, LinkError, SignatureError
from haios.load.keys import TrustedRole
from haios.load.parse import parse_json_bytes
from haios.verify.dsse import verify_envelope


@dataclasses.dataclass(frozen=True)
class VouchedProducts:
    """Artefact name -> sha256 digests that verified functionary links list."""

    digests: Mapping[str, frozenset[str]]

    def vouches(self, name: str, sha256: str) -> bool:
        """True when some verified link lists `name` with exactly `sha256`."""
        return sha256 in self.digests.get(name, frozenset())


def _products(link: Any, label: str) -> dict[str, str]:
    products: dict[str, str] = {}
    raw = link.products
    if not isinstance(raw, dict):
        raise InputError(f"{label}: products is not an object")
    for name, digest in raw.items():
        if isinstance(name, str) and isinstance(digest, dict):
            value = digest.get("sha256")
            if isinstance(value, str):
                products[name] = value
    return products


def _classic_signers(document: dict[str, Any], role: TrustedRole, label: str) -> Any:
    from in_toto.models.metadata import Metablock  # lazy: in-toto's cost is its imports

    try:
        metablock = Metablock.from_dict(document)
        payload = metablock.signed.signable_bytes
    except (FormatError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(f"{label}: not a valid in-toto link") from exc
    if metablock.type_ != "link":
        raise InputError(f"{label}: not a link")
    signatures = document.get("signatures")
    entries = signatures if isinstance(signatures, list) else []
    for key in role.keys:
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("keyid") != key.keyid:
                continue
            try:
                key.verify_signature(Signature.from_dict(dict(entry)), payload)
            except (UnverifiedSignatureError, VerificationError, FormatError,
                    ValueError, KeyError, TypeError):
                continue
            return metablock.signed
    return None


def _dsse_link(data: bytes, role: TrustedRole, label: str, max_depth: int) -> Any:
    from in_toto.models.link import Link  # lazy

    one_key = TrustedRole(role.name, role.keys, 1)
    try:
        payload = verify_envelope(data, one_key, label=label, max_depth=max_depth).payload
    except SignatureError:
        return None  # not signed by a functionary: vouches for nothing
    document = parse_json_bytes(payload, label=f"{label} payload", max_depth=max_depth)
    if not isinstance(document, dict) or document.get("_type") != "link":
        raise InputError(f"{label}: DSSE payload is not an in-toto link")
    try:
        return Link.read(document)
    except (FormatError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{label}: not a valid in-toto link") from exc


def verify_link(data: bytes, role: TrustedRole, *, label: str, max_depth: int
                ) -> dict[str, str] | None:
    """Products of one link file if a key of `role` signed it, else None.

    Raises:
        InputError: the file is not a well-formed link (hostile input).
    """
    document = parse_json_bytes(data, label=label, max_depth=max_depth)
    if not isinstance(document, dict):
        raise InputError(f"{label}: not a JSON object")
    if "payload" in document:
        link = _dsse_link(data, role, label, max_depth)
    elif "signed" in document:
        link = _classic_signers(document, role, label)
    else:
        raise InputError(f"{label}: neither a classic nor a DSSE in-toto link")
    return None if link is None else _products(link, label)


def collect_vouched(links: Iterable[tuple[str, bytes]], role: TrustedRole, *, max_depth: int
                    ) -> VouchedProducts:
    """Verify every link once and index what trusted functionaries vouch for."""
    digests: dict[str, set[str]] = {}
    for label, data in links:
        products = verify_link(data, role, label=label, max_depth=max_depth)
        for name, digest in (products or {}).items():
            digests.setdefault(name, set()).add(digest)
    return VouchedProducts({name: frozenset(v) for name, v in digests.items()})


def require_vouched(vouched: VouchedProducts, name: str, sha256: str) -> None:
    """Raise LinkError unless a trusted link lists `name` with `sha256`."""
    if not vouched.vouches(name, sha256):
        raise LinkError(f"inbox/{name}: no functionary-signed in-toto link lists it "
                        "with the plan's digest")
