# SPDX-License-Identifier: Apache-2.0
"""Strict JSON parsing for hostile bytes: exactly one UTF-8 JSON document.

Refuses what the standard library accepts by default: duplicate object keys
(a parser differential: Python keeps the last one), NaN and +/-Infinity,
numbers that overflow to infinity, a byte-order mark, UTF-16/32, invalid
UTF-8, lone surrogates, and nesting deeper than a fixed bound (checked
before parsing, without recursion, so a deep document cannot exhaust the
stack). Also escapes hostile text for diagnostics (`printable`). Pure:
bytes in, Python values out; no I/O.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32


class StrictJSONError(ValueError):
    """The bytes are not exactly one strict JSON document; message says why."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise StrictJSONError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"number {text[:32]!r} is out of range")
    return value


def _bounded_int(text: str) -> int:
    # CPython refuses >4300 digits anyway; refuse far earlier, cheaply.
    if len(text.lstrip("-")) > 20:
        raise StrictJSONError(f"integer with {len(text)} digits is out of range")
    return int(text)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise if brackets nest deeper than `max_depth` (brackets in strings do not count)."""
    if text.count("[") + text.count("{") <= max_depth:
        return  # cannot nest deeper than the number of openers
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            if depth > max_depth:
                raise StrictJSONError(f"nesting deeper than {max_depth}")
        else:
            depth -= 1


def _no_surrogates(value: Any) -> None:
    # Decoded UTF-8 holds no surrogates; only a `\\u` escape can introduce one.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise StrictJSONError("string holds a lone surrogate") from exc
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# One decoder for every call: building it costs as much as decoding a small document.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_object,
    parse_constant=_reject_constant,
    parse_float=_finite_float,
    parse_int=_bounded_int,
)


def parse_strict_json(data: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `data` as exactly one strict JSON document.

    Args:
        data: the raw bytes, as read.
        max_depth: the deepest nesting of arrays and objects allowed.

    Returns:
        The parsed value (dict, list, str, int, float, bool or None).

    Raises:
        StrictJSONError: with a one-line reason for any deviation.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        raise StrictJSONError("byte-order mark is not allowed")
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8 at byte {exc.start}") from exc
    check_depth(text, max_depth)
    try:
        value = _DECODER.decode(text)
    except StrictJSONError:
        raise
    except (ValueError, RecursionError) as exc:
        raise StrictJSONError(f"not JSON: {str(exc).splitlines()[0][:120]}") from exc
    if "\\u" in text:
        _no_surrogates(value)
    return value


def printable(text: str) -> str:
    """`text` fit for a one-line diagnostic: every non-printable character escaped.

    Hostile input reaches error messages as field names, keys and file
    names; a NUL, an escape sequence or a line separator in them must not
    reach a terminal, a log line or a signed state verbatim. Control, format,
    separator (other than the space), surrogate and unassigned code points
    become ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``. Backslashes are left alone,
    so escaping twice changes nothing.
    """
    if text.isprintable():
        return text
    out: list[str] = []
    for char in text:
        if char.isprintable():
            out.append(char)
            continue
        code = ord(char)
        if code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def dump_json(value: Any) -> bytes:
    """Serialise engine-written JSON: sorted keys, compact, one trailing newline.

    Compact on purpose: the C encoder only serves documents without indent,
    and the engine rewrites its state on every step.
    """
    return (json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                       allow_nan=False) + "\n").encode("utf-8")
