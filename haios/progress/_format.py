# SPDX-License-Identifier: Apache-2.0
"""Numbers and free text made fit for a person. Pure: no I/O.

What it does: seconds to a sensible precision, money as the exact decimal
it is, token counts without a binary-float tail, cost totals as one short
phrase, and free text (reasons, messages) cleaned for a progress line: the
engine's private area replaced by a label, other absolute paths cut to
their last component, anything shaped like a Vault token redacted, every
control character escaped. What it does not do: decide what a person sees
(`_view`) or write it anywhere (`_display`).
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Final

from haios._util.strict_json import printable

#: longest free-text fragment (a reason, a message) kept in one progress line
TEXT_MAX_CHARS: Final = 240
#: what replaces the engine's private area (policy `state_dir`) in any line
STATE_DIR_LABEL: Final = "<state_dir>"
_REDACTED: Final = "<redacted>"
_CENT: Final = Decimal("0.01")
# Vault/OpenBao service, batch and recovery tokens (`hvs.`, `hvb.`, `hvr.`, legacy
# `s.`/`b.`). Defence in depth: publishers put accessors, never tokens, in events.
_TOKEN_RE: Final = re.compile(r"\b(?:hv[sbr]|[sb])\.[A-Za-z0-9_-]{16,}")
# An absolute path of two or more components. The look-behind keeps relative
# paths (`inbox/a.csv`) and URLs (`http://host:8200/v1/...`) as they are.
_ABS_PATH_RE: Final = re.compile(r"(?<![\w.~:/-])(?:/[^\s/:;,'\"()<>\[\]{}]+){2,}/?")
# The contract's cost units, in the contract's order.
_UNIT_ORDER: Final = ("cpu_seconds", "wall_seconds", "usd", "tokens")


def exact_decimal(value: float | int) -> Decimal:
    """The decimal a cost number stands for.

    `repr` of a float is the shortest decimal that reads back as the same
    float: the number a JSON document or a step's report wrote. The cost
    ledger compares money the same way (`haios.cost`).
    """
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def format_seconds(seconds: float) -> str:
    """A duration at a precision a person can read: `0.4 ms`, `136 ms`, `1.23 s`,
    `12.3 s`, `2 min 05 s`, `1 h 02 min`."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds <= 0:
        return "0 s"
    millis = seconds * 1000
    if millis < 0.05:  # below what one decimal of a millisecond shows
        return "<0.1 ms"
    if round(millis, 1) < 10:
        return f"{millis:.1f} ms"
    if round(millis) < 1000:
        return f"{millis:.0f} ms"
    if round(seconds, 2) < 10:
        return f"{seconds:.2f} s"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(whole, 3600)
    return f"{hours} h {rest // 60:02d} min"


def format_clock(seconds: float) -> str:
    """Elapsed time as a clock reads it: `0:04`, `12:03`, `1:02:03`."""
    whole = int(seconds) if math.isfinite(seconds) and seconds > 0 else 0
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_usd(value: float | int | Decimal) -> str:
    """Money as the exact decimal it is, never a binary-float tail.

    At least two decimals (`$0.30`, `$2.00`), more when the amount has them
    (`$0.125`, `$0.0000001`); nothing is rounded away.
    """
    amount = value if isinstance(value, Decimal) else exact_decimal(value)
    if not amount.is_finite():
        return f"${amount}"
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        # Adding zeros is exact; the context only needs room for every digit.
        room = decimal.Context(prec=max(28, amount.adjusted() + 4))
        amount = amount.quantize(_CENT, context=room)
    return f"${amount:f}"


def format_amount(value: float | int | Decimal) -> str:
    """A count that may be a float (tokens): `10`, `10.5`, never `10.0`."""
    if isinstance(value, int):
        return str(value)
    amount = value if isinstance(value, Decimal) else exact_decimal(value)
    if not amount.is_finite():
        return str(value)
    if amount == amount.to_integral_value():
        return str(int(amount))
    return f"{amount.normalize():f}"


def _number(value: object) -> float | int | Decimal | None:
    """`value` if it is a real number (bools are not), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    return value


def format_cost(totals: Mapping[str, object], *, skip_zero: bool = False) -> str:
    """Cost totals as one phrase: `cpu 41 ms, wall 136 ms, $0.30, 10 tokens`.

    Args:
        totals: unit name to amount (the contract's units, any extra shown as
            `name=value`, escaped).
        skip_zero: leave out units whose amount is zero.
    """
    parts: list[str] = []
    known = [unit for unit in _UNIT_ORDER if unit in totals]
    extra = sorted(str(key) for key in totals if key not in _UNIT_ORDER)
    for unit in known:
        value = _number(totals[unit])
        if value is None:
            parts.append(f"{unit}={printable(str(totals[unit]))}")
            continue
        if skip_zero and value == 0:
            continue
        if unit == "cpu_seconds":
            parts.append(f"cpu {format_seconds(float(value))}")
        elif unit == "wall_seconds":
            parts.append(f"wall {format_seconds(float(value))}")
        elif unit == "usd":
            parts.append(format_usd(value))
        else:
            parts.append(f"{format_amount(value)} tokens")
    parts.extend(f"{printable(key)}={printable(str(totals[key]))}" for key in extra)
    return ", ".join(parts)


def plural(count: int, noun: str) -> str:
    """`1 input`, `2 inputs`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def clean_text(text: str, *, state_dir: str | None = None) -> str:
    """Free text (a reason, a message) fit for one progress line.

    Args:
        text: the text, as an engine event carries it.
        state_dir: the engine's private area; every occurrence becomes
            `<state_dir>`, whatever characters the path holds.

    Returns:
        The text with the private area labelled, other absolute paths cut
        to their last component (a kill flag shows as `KILL`), token-shaped
        words redacted, control characters escaped, and at most
        `TEXT_MAX_CHARS` characters.
    """
    if state_dir and state_dir != "/":
        text = text.replace(state_dir.rstrip("/"), STATE_DIR_LABEL)
    text = _TOKEN_RE.sub(_REDACTED, text)
    text = _ABS_PATH_RE.sub(lambda match: PurePosixPath(match.group(0)).name, text)
    text = printable(text)
    if len(text) > TEXT_MAX_CHARS:
        text = text[: TEXT_MAX_CHARS - 3] + "..."
    return text


def base_name(flag: str) -> str:
    """A kill flag's base name only (`KILL`, `KILL.step`), escaped."""
    return printable(PurePosixPath(flag).name or flag)
