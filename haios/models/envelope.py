# SPDX-License-Identifier: Apache-2.0
"""DSSE envelopes and the in-toto Statement v1 they carry (contract section 5).

The envelope model checks shape only; signatures are checked by
`haios.verify.dsse` over the exact payload bytes, and only then is the
payload parsed into a `Statement`. No I/O.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from haios.models.common import ArtefactName, Sha256Hex, StrictModel

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://haios.dev/signature/v1"

Base64Text = Annotated[str, StringConstraints(max_length=1 << 20, pattern=r"^[A-Za-z0-9+/_=-]*$")]


class EnvelopeSignature(StrictModel):
    """One DSSE signature entry; `keyid` is required (see ADR 0002)."""

    keyid: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    sig: Base64Text


class DsseEnvelope(StrictModel):
    """A DSSE envelope as written to a `.sig` file."""

    payload: Base64Text
    payloadType: str
    signatures: list[EnvelopeSignature] = Field(min_length=1, max_length=32)


class Digest(StrictModel):
    """A subject digest: exactly one sha256."""

    sha256: Sha256Hex


class Subject(StrictModel):
    """The one file a statement is about."""

    name: ArtefactName
    digest: Digest


class EmptyPredicate(StrictModel):
    """The signature predicate carries nothing."""


class Statement(StrictModel):
    """An in-toto Statement v1 as used for haios detached signatures."""

    type_: Literal["https://in-toto.io/Statement/v1"] = Field(alias="_type")
    subject: list[Subject] = Field(min_length=1, max_length=1)
    predicateType: Literal["https://haios.dev/signature/v1"]
    predicate: EmptyPredicate
