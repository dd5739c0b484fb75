# SPDX-License-Identifier: Apache-2.0
"""One step's record in the run, changed only through named transitions.

The state document (contract section 6) stores each step's status as a
string. In the engine a status changes only through the methods of
`StepRecord`, and each method checks `TRANSITIONS` first: an illegal move
(say, a succeeded step started again) is an `InternalError` at the point
it is attempted, never a silently wrong state.

    pending --start--> running --end--> succeeded | failed | timed_out | killed
    pending --skip---> skipped          running --abort--> failed | killed
    any but succeeded --reopen--> pending   (a resumed plan; a crash leaves `running`)

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Final

from haios.errors import InternalError
from haios.models.state import EndStatus, StepState, StepStatus

_ENDED: Final[frozenset[StepStatus]] = frozenset(typing.get_args(EndStatus))

#: status -> the statuses it may move to; everything else is refused
TRANSITIONS: Final[Mapping[StepStatus, frozenset[StepStatus]]] = {
    "pending": frozenset({"pending", "running", "skipped"}),
    "running": frozenset({"pending", *_ENDED}),
    "succeeded": frozenset(),
    "failed": frozenset({"pending"}),
    "timed_out": frozenset({"pending"}),
    "killed": frozenset({"pending"}),
    "skipped": frozenset({"pending"}),
}


@dataclasses.dataclass
class StepRecord:
    """The mutable record of one step; mirrors `StepState` field for field."""

    step_id: str
    status: StepStatus = "pending"
    exit_code: int | None = None
    attempts: int = 0
    started: str | None = None
    finished: str | None = None
    reason: str | None = None
    products: dict[str, str] = dataclasses.field(default_factory=dict)
    token_accessors: list[str] = dataclasses.field(default_factory=list)
    #: changed since the keeper last validated it (every mutator sets it)
    changed: bool = dataclasses.field(default=True, compare=False, repr=False)

    @classmethod
    def from_state(cls, step_id: str, state: StepState | None) -> StepRecord:
        """The record a previous run left, or a fresh one."""
        if state is None:
            return cls(step_id)
        return cls(step_id, state.status, state.exit_code, state.attempts, state.started,
                   state.finished, state.reason, dict(state.products),
                   list(state.token_accessors))

    def _move(self, to: StepStatus) -> None:
        if to not in TRANSITIONS[self.status]:
            raise InternalError(f"step {self.step_id}: illegal transition {self.status} -> {to}")
        self.status = to
        self.changed = True

    def reopen(self) -> None:
        """A resumed plan runs this step again (no-op for a succeeded step)."""
        if self.status == "succeeded":
            return
        self._move("pending")
        self.started = self.finished = None
        self.exit_code = None
        self.reason = None
        self.products = {}

    def start(self, now: str) -> None:
        """Admitted: one more attempt begins."""
        self._move("running")
        self.attempts += 1
        self.started, self.finished, self.reason = now, None, None

    def end(self, status: EndStatus, *, exit_code: int | None, reason: str | None,
            started: str, finished: str, products: Mapping[str, str]) -> None:
        """The attempt ended with a result."""
        self._move(status)
        self.exit_code, self.reason = exit_code, reason
        self.started, self.finished = started, finished
        self.products = dict(products)

    def abort(self, *, killed: bool, reason: str, now: str) -> None:
        """The attempt raised instead of ending (killed at registration, environment lost)."""
        self._move("killed" if killed else "failed")
        self.finished, self.reason = now, reason

    def skip(self) -> None:
        """A step that will not run because a step it needs did not succeed."""
        self._move("skipped")
        self.started = self.finished = None

    def add_accessor(self, accessor: str) -> None:
        """A Vault token accessor, durable before the token exists."""
        self.token_accessors.append(accessor)
        self.changed = True

    def keep_accessors(self, unrevoked: Iterable[str]) -> None:
        """Forget the accessors revoked; keep those still outstanding."""
        outstanding = set(unrevoked)
        self.token_accessors = [a for a in self.token_accessors if a in outstanding]
        self.changed = True

    def to_json(self) -> dict[str, Any]:
        """The record as the state document's `steps.<id>` object."""
        return {
            "status": self.status, "exit_code": self.exit_code, "attempts": self.attempts,
            "started": self.started, "finished": self.finished, "reason": self.reason,
            "products": dict(self.products), "token_accessors": list(self.token_accessors),
        }

