# SPDX-License-Identifier: Apache-2.0
"""The seccomp part of a sandbox profile: rules as the operator writes them.

Validated models only (pure). `haios/sandbox/seccomp.py` compiles them;
`haios/sandbox/profile.py` holds them in a `Profile`. Kept apart so the
compiler needs nothing else of a profile.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from haios.sandbox import syscall_policy

_SYSCALL_NAME = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
COMMENT = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=2000)]
_SYMBOLIC = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]*(\|[A-Z][A-Z0-9_]*)*$")]
_U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]


class StrictProfileModel(BaseModel):
    """Base of every profile model: unknown fields, coercion and mutation are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def resolve_symbolic(value: int | str) -> int:
    """Turn an argument value (integer or ``"A|B"`` symbols) into its number.

    Raises:
        ValueError: a symbol is not in `syscall_policy.SYMBOLS`.
    """
    if isinstance(value, int):
        return value
    total = 0
    for part in value.split("|"):
        if part not in syscall_policy.SYMBOLS:
            raise ValueError(f"unknown symbol {part!r}")
        total |= syscall_policy.SYMBOLS[part]
    return total


class ArgCondition(StrictProfileModel):
    """A comparison on one system-call argument; all of a rule's conditions must hold.

    Attributes:
        index: argument position, 0 to 5 (no default).
        op: comparison: eq, ne, lt, le, gt, ge (unsigned 64-bit) or masked_eq
            (``arg & mask == value``) (no default).
        value: a non-negative integer or symbolic names joined by ``|`` from
            `syscall_policy.SYMBOLS` (no default).
        mask: for masked_eq only, same forms as `value` (default: none).
    """

    index: Annotated[int, Field(ge=0, le=5)]
    op: Literal["eq", "ne", "lt", "le", "gt", "ge", "masked_eq"]
    value: _U64 | _SYMBOLIC
    mask: _U64 | _SYMBOLIC | None = None

    @model_validator(mode="after")
    def _check(self) -> ArgCondition:
        if (self.op == "masked_eq") != (self.mask is not None):
            raise ValueError("mask is required with op masked_eq and only with it")
        resolve_symbolic(self.value)
        if self.mask is not None:
            resolve_symbolic(self.mask)
        return self

    def comparison(self) -> syscall_policy.Comparison:
        """The numeric form used by the filter compiler."""
        mask = 0 if self.mask is None else resolve_symbolic(self.mask)
        return syscall_policy.Comparison(self.index, self.op, resolve_symbolic(self.value), mask)


class AllowRule(StrictProfileModel):
    """System calls the step may make (under `args`, when given).

    Attributes:
        syscalls: x86_64 system-call names (at least one; no default).
        comment: why the step needs them (no default; required).
        args: conditions that must all hold (default: none, i.e. always).
    """

    syscalls: Annotated[tuple[_SYSCALL_NAME, ...], Field(min_length=1)]
    comment: COMMENT
    args: tuple[ArgCondition, ...] = ()


class DenyRule(StrictProfileModel):
    """System calls refused with an errno instead of the default action.

    Attributes:
        syscalls: x86_64 system-call names (at least one; no default).
        comment: why they are refused this way (no default; required).
        errno: errno name the caller sees, e.g. ``"EPERM"`` (no default).
        args: conditions that must all hold (default: none, i.e. always).
    """

    syscalls: Annotated[tuple[_SYSCALL_NAME, ...], Field(min_length=1)]
    comment: COMMENT
    errno: str
    args: tuple[ArgCondition, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> DenyRule:
        if self.errno not in syscall_policy.ERRNO_NAMES:
            raise ValueError(f"unknown errno name {self.errno!r}")
        return self


class SeccompPolicy(StrictProfileModel):
    """The seccomp allowlist.

    Attributes:
        default_action: what happens to any call no rule matches:
            ``"kill_process"`` (SIGSYS, recorded as a violation) or
            ``"errno"`` (the call fails with `default_errno`). Allowing by
            default is not expressible. Default: ``"kill_process"``.
        default_errno: errno name for ``default_action = "errno"`` (default:
            none; required with that action and forbidden otherwise).
        allow: the allowlist (at least one rule; no default).
        deny: calls refused with an errno rather than the default action
            (default: none).
    """

    default_action: Literal["kill_process", "errno"] = "kill_process"
    default_errno: str | None = None
    allow: Annotated[tuple[AllowRule, ...], Field(min_length=1)]
    deny: tuple[DenyRule, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> SeccompPolicy:
        if (self.default_action == "errno") != (self.default_errno is not None):
            raise ValueError("default_errno is required with default_action errno and only with it")
        if self.default_errno is not None and self.default_errno not in syscall_policy.ERRNO_NAMES:
            raise ValueError(f"unknown errno name {self.default_errno!r}")
        return self
