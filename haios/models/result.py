# SPDX-License-Identifier: Apache-2.0
"""The `--json` object of a refused or failed command (ADR 0005).

`haios run --json` and `haios state --json` print exactly one JSON object on
every exit code. When the command produced a state for this invocation (a
run that reached a plan status, or `haios state` that verified one) that
object is the state itself, as contract sections 2 and 6 say. Every other
outcome (usage error, rejection, kill flag at start, environment, busy,
internal error) prints a `CommandResult`: the exit code, a status, a stable
reason, the one-line message also written to stderr, and the os_root's
verified state when one could be read (else null). No I/O.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, Self

from pydantic import Field, StringConstraints, model_validator

from haios.errors import (
    EXIT_BUDGET,
    EXIT_BUSY,
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_KILLED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_STEP_FAILED,
    EXIT_USAGE,
)
from haios.models.common import StrictModel
from haios.models.state import RunState

COMMAND_RESULT_SCHEMA: Final = "haios/command_result/v1"

ExitCode = Literal[0, 1, 2, 3, 4, 5, 6, 7, 70]
#: This invocation's outcome: a plan status (contract section 6) where one
#: fits, else what the exit code means.
ResultStatus = Literal[
    "succeeded",
    "failed",
    "rejected",
    "killed",
    "budget_exhausted",
    "usage_error",
    "environment_unavailable",
    "busy",
    "internal_error",
]
#: exit code -> status (contract section 2)
STATUS_BY_EXIT: Final[dict[int, ResultStatus]] = {
    EXIT_OK: "succeeded",
    EXIT_STEP_FAILED: "failed",
    EXIT_USAGE: "usage_error",
    EXIT_REJECTED: "rejected",
    EXIT_KILLED: "killed",
    EXIT_BUDGET: "budget_exhausted",
    EXIT_ENVIRONMENT: "environment_unavailable",
    EXIT_BUSY: "busy",
    EXIT_INTERNAL: "internal_error",
}
ReasonLabel = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
ErrorClass = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,127}$")]
MESSAGE_MAX_CHARS: Final = 4096


class CommandResult(StrictModel):
    """One refused or failed `haios run` / `haios state` invocation.

    Attributes:
        schema_: always ``haios/command_result/v1`` (``schema`` in JSON); a
            client tells this object from a state (``haios/state/v1``) by it.
        command: ``run`` or ``state``; null when the arguments did not name one.
        ok: true only for exit code 0.
        exit_code: the process's exit code (contract section 2).
        status: this invocation's outcome (`STATUS_BY_EXIT`), never the
            status of an older run recorded in ``state``.
        reason: a stable, low-cardinality label: the ``reason`` of the
            `haios.errors` class (the value ``haios_rejections_total`` uses),
            ``usage`` for bad arguments.
        error_class: the exception class name, e.g. ``SignatureError``.
        message: the one diagnostic line also written to stderr (control
            characters escaped, never a secret; an internal error gives only
            its class).
        state: the os_root's ``state.json`` object when it verified against
            the engine key after the refusal (for a first rejection, the
            ``rejected`` state this run wrote); null otherwise.
    """

    schema_: Literal["haios/command_result/v1"] = Field(alias="schema")
    command: Literal["run", "state"] | None
    ok: bool
    exit_code: ExitCode
    status: ResultStatus
    reason: ReasonLabel
    error_class: ErrorClass | None
    message: Annotated[str, StringConstraints(max_length=MESSAGE_MAX_CHARS)]
    state: RunState | None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.ok != (self.exit_code == EXIT_OK):
            raise ValueError("ok must be true exactly when exit_code is 0")
        if self.status != STATUS_BY_EXIT[self.exit_code]:
            raise ValueError(f"status {self.status!r} does not match exit code {self.exit_code}")
        return self
