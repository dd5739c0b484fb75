# SPDX-License-Identifier: Apache-2.0
"""Typed engine events for tests of their consumers (metrics, progress, audit).

`event(kind, **fields)` builds the typed event of an audit kind. Fields a
test does not care about get neutral placeholders (empty text, zero, None,
empty containers) so each test names only what the consumer reads; a field
the type does not declare is a TypeError, as it is for a publisher. An
unknown kind gives an event of a type no consumer knows.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

from haios.events import EVENT_TYPES, Event


def _placeholder(hint: Any) -> Any:
    if hint is None or type(None) in typing.get_args(hint):
        return None
    origin = typing.get_origin(hint) or hint
    if origin in (types.UnionType, typing.Union):
        return _placeholder(typing.get_args(hint)[0])
    return {str: "", int: 0, float: 0.0, bool: False, list: [], dict: {}}[origin]


def _unknown(kind: str) -> type[Event]:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Unknown(Event):
        KIND: ClassVar[str] = kind
    return Unknown


def event(kind: str, /, **fields: Any) -> Event:
    """The typed event of `kind` with `fields`, placeholders for the rest."""
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        unknown = _unknown(kind)
        return unknown()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name not in fields and field.default is dataclasses.MISSING:
            fields[field.name] = _placeholder(hints[field.name])
    return cls(**fields)
