# SPDX-License-Identifier: Apache-2.0
"""Shared constrained types and the strict base model. No I/O."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

# Contract section 3: flat names, so no traversal is expressible.
ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,63}$"
ARTEFACT_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ENV_NAME_PATTERN: Final = r"^[A-Z][A-Z0-9_]{0,63}$"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)


class StrictModel(BaseModel):
    """Base of every haios model: unknown fields refused, no coercion, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              regex_engine="rust-regex")


def _artefact_name(value: str) -> str:
    if value.endswith(".sig"):
        raise ValueError("artefact names must not end in .sig")
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL character is not allowed")
    return value


def parse_rfc3339(value: str) -> dt.datetime:
    """Parse a strict RFC 3339 timestamp with a zone; return it in UTC.

    Raises:
        ValueError: not RFC 3339, no zone, or not a real date/time.
    """
    if not _RFC3339.fullmatch(value):
        raise ValueError(f"{value[:40]!r} is not an RFC 3339 timestamp with a zone")
    parsed = dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return parsed.astimezone(dt.UTC)


def format_rfc3339(when: dt.datetime) -> str:
    """RFC 3339 in UTC with microseconds and a `Z`."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rfc3339(value: str) -> str:
    parse_rfc3339(value)
    return value


Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ArtefactName = Annotated[
    str, StringConstraints(pattern=ARTEFACT_PATTERN), AfterValidator(_artefact_name)
]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)]
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
SafeText = Annotated[str, StringConstraints(max_length=4096), AfterValidator(_no_nul)]
Timestamp = Annotated[str, StringConstraints(max_length=64), AfterValidator(_rfc3339)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class EmbeddedSignature(StrictModel):
    """One entry of an embedded `signatures` list (contract section 5)."""

    keyid: Sha256Hex
    sig: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,1024}$")]
