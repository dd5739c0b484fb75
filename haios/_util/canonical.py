# SPDX-License-Identifier: Apache-2.0
"""RFC 8785 (JCS) canonical JSON bytes, with a fast path for plain documents.

The `rfc8785` package is the reference. It is pure Python, and the engine
canonicalises its whole state on every write, which made the cost of a
plan quadratic in its length. For documents whose keys are ASCII and whose
numbers are integers within +/-2**53 or floats whose shortest repr has no
exponent, the standard library's C encoder (sorted keys, compact
separators, no ASCII escaping) produces exactly the JCS bytes once whole
floats are written as integers (ECMAScript prints 2.0 as `2`): ASCII keys
sort the same by UTF-16 code unit and by code point, and such numbers print
the same in both languages. Anything else goes to `rfc8785`. A property
test checks that both paths agree. Pure, no I/O.
"""

from __future__ import annotations

import json
from typing import Any, Final

import rfc8785

_MAX_SAFE_INT: Final = 2**53 - 1  # the reference refuses larger integers


class _NotPlain(Exception):
    """The document needs the reference encoder."""


def _normalise(value: Any, depth: int = 0) -> Any:
    if depth > 64:
        raise _NotPlain
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > _MAX_SAFE_INT:
            raise _NotPlain
        return value
    if isinstance(value, float):
        text = repr(value)
        if "e" in text or "n" in text or text == "-0.0":
            raise _NotPlain
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        if not all(isinstance(key, str) and key.isascii() for key in value):
            raise _NotPlain
        return {key: _normalise(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(item, depth + 1) for item in value]
    raise _NotPlain


def canonical_bytes(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON-compatible value."""
    try:
        plain = _normalise(value)
    except _NotPlain:
        return bytes(rfc8785.dumps(value))
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
