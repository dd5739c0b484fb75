# SPDX-License-Identifier: Apache-2.0
"""Bytes -> strict JSON -> pydantic model, with one-line reasons. Pure, no I/O."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from haios._util.strict_json import StrictJSONError, parse_strict_json, printable
from haios.errors import InputError, SchemaError

M = TypeVar("M", bound=BaseModel)


def parse_json_bytes(data: bytes, *, label: str, max_depth: int) -> Any:
    """Strict JSON, or InputError naming `label` and the reason."""
    try:
        return parse_strict_json(data, max_depth=max_depth)
    except StrictJSONError as exc:
        raise InputError(f"{label}: {exc}") from exc


def validate_model(model: type[M], value: Any, *, label: str) -> M:
    """Validate `value` into `model`; SchemaError names the first bad field."""
    if not isinstance(value, dict):
        raise SchemaError(f"{label}: a JSON object is required")
    try:
        return model.model_validate(value, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise SchemaError(f"{label}: {describe_validation_error(exc)}") from exc


def parse_model(model: type[M], data: bytes, *, label: str, max_depth: int) -> M:
    """Strict JSON bytes into `model`."""
    return validate_model(model, parse_json_bytes(data, label=label, max_depth=max_depth),
                          label=label)


def describe_validation_error(exc: ValidationError) -> str:
    """The first error as `field.path: message`, without echoing the input value.

    Field names come from the input (an unknown key, a dict key), so they
    and the message are escaped: a NUL or an escape sequence in a key never
    reaches stderr, the audit log or the signed `rejected` state verbatim.
    """
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{printable(where[:200])}: {printable(message)}{extra}"
