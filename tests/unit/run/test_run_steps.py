# SPDX-License-Identifier: Apache-2.0
"""Step records change only through the transition table; admission's value is sealed."""

from __future__ import annotations

import itertools
import types

import pytest

from haios.admission import VerifiedRun
from haios.errors import InternalError
from haios.models.state import StepState
from haios.run.steps import TRANSITIONS, StepRecord

NOW = "2026-12-02T10:00:00Z"
LATER = "2026-12-02T10:00:05Z"
STATUSES = tuple(TRANSITIONS)


def _in(status: str) -> StepRecord:
    return StepRecord("s1", status=status)  # type: ignore[arg-type]


def _end(record: StepRecord, status: str) -> None:
    record.end(status, exit_code=0, reason=None, started=NOW,  # type: ignore[arg-type]
               finished=LATER, products={"out.txt": "a" * 64})


def test_the_table_names_every_status_and_a_succeeded_step_is_final() -> None:
    assert set(STATUSES) == {"pending", "running", "succeeded", "failed", "timed_out",
                             "killed", "skipped"}
    assert TRANSITIONS["succeeded"] == frozenset()
    for targets in TRANSITIONS.values():
        assert targets <= set(STATUSES)


def test_start_then_end_records_the_attempt() -> None:
    record = StepRecord("s1")
    record.start(NOW)
    assert (record.status, record.attempts, record.started) == ("running", 1, NOW)
    _end(record, "succeeded")
    assert record.to_json() == {
        "status": "succeeded", "exit_code": 0, "attempts": 1, "started": NOW,
        "finished": LATER, "reason": None, "products": {"out.txt": "a" * 64},
        "token_accessors": [],
    }


@pytest.mark.parametrize(("source", "target"), [
    (s, t) for s, t in itertools.product(STATUSES, STATUSES) if t not in TRANSITIONS[s]
])
def test_every_move_outside_the_table_is_refused(source: str, target: str) -> None:
    record = _in(source)
    moves = {
        "running": lambda: record.start(NOW),
        "skipped": record.skip,
        "pending": record.reopen,
        **{t: (lambda t=t: _end(record, t)) for t in ("succeeded", "failed", "timed_out",
                                                     "killed")},
    }
    if source == "succeeded" and target == "pending":
        record.reopen()  # a succeeded step is never run again: reopening it is a no-op
        assert record.status == "succeeded"
        return
    with pytest.raises(InternalError, match=f"illegal transition {source} -> {target}"):
        moves[target]()
    assert record.status == source


def test_a_crash_left_running_step_reopens_clean() -> None:
    record = StepRecord("s1", status="running", attempts=2, started=NOW, exit_code=None,
                        reason="x", products={"p": "b" * 64}, token_accessors=["acc1"])
    record.reopen()
    assert (record.status, record.attempts, record.started, record.reason, record.products) == (
        "pending", 2, None, None, {})
    assert record.token_accessors == ["acc1"]  # still to be revoked by the next run


def test_abort_ends_a_running_step_killed_or_failed() -> None:
    killed, failed = _in("running"), _in("running")
    killed.abort(killed=True, reason="kill switch KILL engaged", now=LATER)
    failed.abort(killed=False, reason="Vault unavailable", now=LATER)
    assert (killed.status, failed.status) == ("killed", "failed")
    with pytest.raises(InternalError):
        _in("pending").abort(killed=True, reason="r", now=LATER)


def test_accessors_kept_are_only_those_not_revoked() -> None:
    record = StepRecord("s1")
    record.add_accessor("a1")
    record.add_accessor("a2")
    record.keep_accessors(frozenset({"a2", "other"}))
    assert record.token_accessors == ["a2"]


def test_a_record_round_trips_through_the_state_model() -> None:
    state = StepState(status="failed", exit_code=3, attempts=1, started=NOW, finished=LATER,
                      reason="exited with status 3", products={}, token_accessors=["acc"])
    record = StepRecord.from_state("s1", state)
    assert StepState.model_validate(record.to_json()) == state
    assert StepRecord.from_state("s2", None).to_json() == StepState().model_dump(mode="json")


def test_a_verified_run_cannot_be_built_outside_admission() -> None:
    with pytest.raises(TypeError, match="only by haios.admission.admit"):
        VerifiedRun(plan=None, plan_sha256="0" * 64, prior=None,  # type: ignore[arg-type]
                    store=None, artefacts=types.MappingProxyType({}),  # type: ignore[arg-type]
                    _mint=object())
