# SPDX-License-Identifier: Apache-2.0
"""Engine decisions, in-process: `run_plan` with a scripted runner and guard.

Everything the engine verifies and records is real (keys, signed plan and
inputs, signed state, audit chain, published outputs); only what surrounds
a step is scripted (tests/support/engine_fakes.py): how it ends, whether the
watchdog killed it, whether the environment broke, and the clock. Each
test asserts exit codes, final state and the event/audit record.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from haios import events as ev
from haios._util.safedir import copy_chunk as real_copy_chunk
from haios.errors import (
    EXIT_BUDGET,
    EXIT_ENVIRONMENT,
    EXIT_KILLED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_STEP_FAILED,
    ExpiredError,
    InputError,
    KilledError,
    SandboxSetupError,
    StepFailedError,
    VaultUnavailableError,
    WatchdogLostError,
)
from tests.support.engine_fakes import (
    FAKE_UID,
    FIXED_NOW,
    STAMP,
    EngineRig,
    FakeUids,
    Preflight,
    Run,
    Scripted,
    ScriptedGuard,
    ScriptedRunner,
    expires_in,
    fixed_clock,
    product_of,
)
from tests.support.world import plan, sh, step

DATA = b"a,b\n1,2\n"
#: long enough for any scripted hand-off between two worker threads
HANDOFF_SECONDS = 5.0


@pytest.fixture
def rig(tmp_path: Path) -> EngineRig:
    return EngineRig(tmp_path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def node(step_id: str, needs: tuple[str, ...] = (), **fields: Any) -> dict[str, Any]:
    """A step producing `<id>.txt` from its needs' products."""
    return step(step_id, sh(f"make {step_id}"), needs=list(needs),
                materials=[f"{n}.txt" for n in needs], products=[f"{step_id}.txt"], **fields)


def document(plan_id: str, steps: list[dict[str, Any]], inputs: dict[str, bytes] | None = None,
             **fields: Any) -> dict[str, Any]:
    fields.setdefault("expires", expires_in(24))
    return plan(plan_id, steps, inputs, **fields)


def chain(*ids: str, **fields: Any) -> dict[str, Any]:
    """ids[0] -> ids[1] -> ... (each needs the one before)."""
    steps = [node(s, (ids[i - 1],) if i else ()) for i, s in enumerate(ids)]
    return document("flow", steps, **fields)


def after_finished(step_id: str) -> tuple[threading.Event, ev.Subscriber]:
    """An event set once the engine has recorded `step_id` as finished."""
    seen = threading.Event()

    def subscriber(event: ev.Event) -> None:
        if isinstance(event, ev.StepFinished) and event.step_id == step_id:
            seen.set()

    return seen, subscriber


def waits_for(seen: threading.Event) -> Callable[[Any], None]:
    def during(spec: Any) -> None:
        assert seen.wait(HANDOFF_SECONDS), "the other step never finished"
    return during


def assert_nothing_ran(run: Run) -> None:
    assert run.runner.calls == []
    assert not run.runner_made
    assert run.guard.request is None
    for sub in ("artefacts", "cost", "logs"):
        assert not (run.root / sub).exists(), sub


# -- the baseline ------------------------------------------------------------------


def test_chain_runs_in_order_through_the_seams(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b"))
    run = rig.run(root)
    assert run.code == EXIT_OK and run.error is None
    assert run.outcome is not None and run.outcome.message == "plan succeeded"
    assert run.runner.calls == ["a", "b"]
    assert run.runner.materials == {"a": {}, "b": {"a.txt": product_of("a")}}
    state = run.state
    assert run.outcome.state == state
    assert (state["status"], state["reason"], state["updated"]) == ("succeeded", None, STAMP)
    for step_id in ("a", "b"):
        entry = state["steps"][step_id]
        assert entry == {"status": "succeeded", "exit_code": 0, "attempts": 1,
                         "started": STAMP, "finished": STAMP, "reason": None,
                         "products": {f"{step_id}.txt": sha(product_of(step_id))},
                         "token_accessors": []}
        assert (root / "artefacts" / f"{step_id}.txt").read_bytes() == product_of(step_id)
    assert state["cost"]["totals"] == {"cpu_seconds": 1.0, "wall_seconds": 2.0, "usd": 0.0,
                                       "tokens": 0}
    # The guard wraps each step: before, after, then the kill check, one step at a time.
    assert run.guard.calls == [("before", "a"), ("after", "a"), ("was_killed", "a"),
                               ("before", "b"), ("after", "b"), ("was_killed", "b")]
    assert run.guard.request is not None
    assert run.guard.request.run_id == state["plan_sha256"][:12]
    assert run.guard.request.leftover_accessors == ()
    assert run.runner.closed and run.guard.closed and run.finished
    assert run.uids.leased == [FAKE_UID, FAKE_UID] and run.uids.returned == run.uids.leased
    assert run.runner.specs["b"].env["HAIOS_STEP_ID"] == "b"
    assert run.runner.specs["b"].uid == FAKE_UID
    # The audit log subscribed first and recorded every published event, in order.
    assert [r["kind"] for r in run.audit] == run.kinds()
    assert run.kinds()[0] == ev.Verification.KIND and run.kinds()[-1] == ev.RunFinished.KIND
    assert run.audited(ev.StepFinished.KIND) == [
        {"step_id": s, "status": "succeeded", "uid": FAKE_UID, "exit_code": 0,
         "profile": "default", "wall_seconds": 1.0, "reason": None} for s in ("a", "b")]
    assert state["audit"]["records"] == len(run.audit)


# -- halts -----------------------------------------------------------------------


def test_failed_step_halts_the_plan_and_skips_the_rest(rig: EngineRig) -> None:
    steps = [node("a"), node("b", ("a",)), node("c", ("b",)), node("d", ("a",))]
    root = rig.root(document("halt", steps))
    runner = ScriptedRunner({"b": Scripted(exit_code=3, report={"usd": 0.5})})
    run = rig.run(root, runner=runner)
    assert run.code == EXIT_STEP_FAILED and run.error is None
    assert runner.calls == ["a", "b"]
    state = run.state
    assert state["status"] == "failed"
    assert state["reason"] == "step b failed: exited with status 3"
    assert run.statuses() == {"a": "succeeded", "b": "failed", "c": "skipped", "d": "skipped"}
    failed = state["steps"]["b"]
    assert (failed["exit_code"], failed["reason"], failed["products"]) == (
        3, "exited with status 3", {})
    for skipped in ("c", "d"):
        assert state["steps"][skipped]["started"] is None
        assert state["steps"][skipped]["attempts"] == 0
    # A failed step's cost still counts; its products are never published.
    assert state["cost"]["totals"]["usd"] == 0.5
    assert not (root / "artefacts" / "b.txt").exists()
    assert (root / "cost" / "b.json").is_file() and (root / "logs" / "b.out").is_file()
    assert run.audited(ev.RunFinished.KIND) == [
        {"status": "failed", "reason": "step b failed: exited with status 3"}]


@pytest.mark.parametrize(("scripted", "status", "reason"), [
    (Scripted(exit_code=None, signal=9), "failed", "killed by signal 9"),
    (Scripted(violation="seccomp"), "failed", "sandbox violation: seccomp"),
    (Scripted(products={}), "failed", "product a.txt was not produced"),
    (Scripted(report=b"{not json"), "failed", "malformed cost report"),
    (Scripted(exit_code=None, signal=9, timed_out=True), "timed_out", "timed out after 30s"),
], ids=["signal", "violation", "no-product", "bad-report", "timeout"])
def test_how_a_step_ends_decides_its_status(rig: EngineRig, scripted: Scripted, status: str,
                                            reason: str) -> None:
    root = rig.root(chain("a", "b"))
    run = rig.run(root, runner=ScriptedRunner({"a": scripted}))
    assert run.code == EXIT_STEP_FAILED
    entry = run.state["steps"]["a"]
    assert entry["status"] == status
    assert entry["reason"].startswith(reason), entry["reason"]
    assert run.statuses()["b"] == "skipped"
    assert run.state["reason"].startswith(f"step a {status}: {reason}")
    violations = run.audited(ev.SandboxViolation.KIND)
    assert violations == ([{"step_id": "a", "kind": "seccomp"}]
                          if scripted.violation else [])


def test_step_failure_raised_by_the_runner_is_exit_1(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b"))
    runner = ScriptedRunner({"a": Scripted(raises=StepFailedError("step a: cannot start"))})
    run = rig.run(root, runner=runner)
    assert run.code == EXIT_STEP_FAILED and run.error is None
    assert run.statuses() == {"a": "failed", "b": "skipped"}
    assert run.state["steps"]["a"]["reason"] == "step a: cannot start"
    assert run.state["steps"]["a"]["finished"] == STAMP
    assert run.uids.returned == [FAKE_UID]  # the lease goes back whatever happened
    assert run.guard.steps("after") == ["a"]


@pytest.mark.parametrize("where", ["runner", "uids", "guard"])
def test_environment_lost_mid_run_is_exit_6(rig: EngineRig, where: str) -> None:
    root = rig.root(chain("a", "b", "c"))
    lost = SandboxSetupError("cannot create the step's namespaces")
    runner = ScriptedRunner({"b": Scripted(raises=lost)} if where == "runner" else {})
    guard = ScriptedGuard(refuse={"b": VaultUnavailableError("vault sealed")}
                          if where == "guard" else {})
    uids = FakeUids()
    if where == "uids":
        runner.script["a"] = Scripted(during=lambda spec: setattr(uids, "exhausted", True))
    run = rig.run(root, runner=runner, guard=guard, uids=uids)
    assert run.code == EXIT_ENVIRONMENT and run.outcome is None
    expected = {"runner": lost, "guard": guard.refuse.get("b")}.get(where)
    if expected is not None:
        assert run.error is expected
    else:
        assert isinstance(run.error, SandboxSetupError)
        assert str(run.error) == "no free step uid in the pool"
    assert runner.calls == (["a", "b"] if where == "runner" else ["a"])
    assert run.statuses() == {"a": "succeeded", "b": "failed", "c": "skipped"}
    assert run.state["status"] == "failed"
    assert run.state["steps"]["b"]["reason"] == str(run.error)
    assert run.runner.closed and run.guard.closed and run.finished
    finished = run.audited(ev.StepFinished.KIND)[-1]
    assert (finished["step_id"], finished["status"], finished["exit_code"]) == (
        "b", "failed", None)


# -- budget ----------------------------------------------------------------------


def test_usd_budget_reached_mid_plan_halts_with_exit_5(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b", "c", budget={"usd": 1.0}))
    runner = ScriptedRunner({"a": Scripted(report={"usd": 0.6, "tokens": 5}),
                             "b": Scripted(report={"usd": 0.4})})
    run = rig.run(root, runner=runner)
    assert run.code == EXIT_BUDGET and run.error is None
    assert runner.calls == ["a", "b"]
    # Reported cost cannot cut a step short: b succeeds, c never starts.
    assert run.statuses() == {"a": "succeeded", "b": "succeeded", "c": "skipped"}
    state = run.state
    assert (state["status"], state["reason"]) == ("budget_exhausted", "budget exhausted: usd")
    assert state["cost"]["totals"]["usd"] == 1.0 and state["cost"]["totals"]["tokens"] == 5
    assert run.audited(ev.BudgetHalt.KIND) == [{"reason": "budget exhausted: usd"}]
    remaining = [r["value"] for r in run.audited(ev.BudgetRemaining.KIND) if r["unit"] == "usd"]
    assert remaining == [0.4, 0.0]


def test_budget_reached_by_the_last_step_still_succeeds(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b", budget={"usd": 1.0}))
    runner = ScriptedRunner({"a": Scripted(report={"usd": 0.5}),
                             "b": Scripted(report={"usd": 0.5})})
    run = rig.run(root, runner=runner)
    assert run.code == EXIT_OK
    assert run.state["status"] == "succeeded" and run.state["cost"]["totals"]["usd"] == 1.0
    assert run.audited(ev.BudgetHalt.KIND) == []


def test_wall_reservation_cut_is_a_budget_failure(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b", budget={"wall_seconds": 10}))
    runner = ScriptedRunner({"a": Scripted(exit_code=None, signal=9, timed_out=True,
                                           wall_seconds=10.0)})
    run = rig.run(root, runner=runner)
    assert runner.specs["a"].timeout_seconds == 10.0  # the budget, not the step's 30 s
    assert run.code == EXIT_BUDGET
    assert run.statuses() == {"a": "failed", "b": "skipped"}
    assert run.state["steps"]["a"]["reason"] == "budget: wall_seconds reservation"
    assert (run.state["status"], run.state["reason"]) == (
        "budget_exhausted", "budget: wall_seconds reservation")
    assert run.audited(ev.BudgetHalt.KIND) == [{"reason": "budget: wall_seconds reservation"}]


def test_cpu_reservation_cut_is_a_budget_failure(rig: EngineRig) -> None:
    root = rig.root(chain("a", budget={"cpu_seconds": 2.5}))
    runner = ScriptedRunner({"a": Scripted(exit_code=None, signal=9, violation="cpu_limit",
                                           cpu_seconds=3.0)})
    run = rig.run(root, runner=runner)
    assert runner.specs["a"].cpu_seconds_limit == 3  # whole seconds, rounded up
    assert run.code == EXIT_BUDGET
    assert run.state["steps"]["a"]["reason"] == "budget: cpu_seconds reservation"
    assert run.state["status"] == "budget_exhausted"
    assert run.audited(ev.SandboxViolation.KIND) == []


# -- kill --------------------------------------------------------------------------


@pytest.mark.parametrize("operator_flag", [False, True], ids=["control", "extra-path"])
def test_global_kill_flag_refuses_before_any_input_is_read(tmp_path: Path,
                                                          operator_flag: bool) -> None:
    extra = tmp_path / "run" / "KILL"
    rig = EngineRig(tmp_path, extra_kill_paths=[str(extra)])
    root = rig.root(document("k", [node("a")], {"data.csv": DATA}))
    flag = extra if operator_flag else root / "control" / "KILL"
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_bytes(b"")
    # An unparsable plan and a failing preflight lose to the kill flag.
    (root / "exec_plan.json").write_bytes(b"{}")
    preflight = Preflight(SandboxSetupError("no namespaces"))
    run = rig.run(root, preflight=preflight)
    assert run.code == EXIT_KILLED and isinstance(run.error, KilledError)
    assert str(run.error) == f"kill switch {flag} is set; refusing to start"
    assert_nothing_ran(run)
    assert preflight.plans == []
    assert not (root / "state.json").exists()
    assert run.kinds() == [ev.KillSwitch.KIND]
    assert run.audited(ev.KillSwitch.KIND) == [{"engaged": True, "flag": "KILL", "scope": "global"}]


def test_step_killed_mid_run_halts_with_exit_4(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b", "c"))
    runner = ScriptedRunner({"b": Scripted(exit_code=None, signal=9, report={"usd": 7})})
    guard = ScriptedGuard(killed={"b": "KILL.b"})
    run = rig.run(root, runner=runner, guard=guard)
    assert run.code == EXIT_KILLED and run.error is None
    assert runner.calls == ["a", "b"]
    assert run.statuses() == {"a": "succeeded", "b": "killed", "c": "skipped"}
    assert run.state["steps"]["b"]["reason"] == "kill switch KILL.b"
    assert (run.state["status"], run.state["reason"]) == ("killed", "kill switch KILL.b")
    assert run.state["cost"]["totals"]["usd"] == 0.0  # a killed step's report is not read
    assert not (root / "artefacts" / "b.txt").exists()
    assert not list((root / "links").glob("b.*.link"))
    assert guard.steps("after") == ["a", "b"]  # released even though killed
    assert run.audited(ev.RunFinished.KIND) == [
        {"status": "killed", "reason": "kill switch KILL.b"}]


@pytest.mark.parametrize("flag", ["KILL", "KILL.b"])
def test_kill_flag_set_while_a_step_runs_stops_the_next_start(rig: EngineRig,
                                                              flag: str) -> None:
    root = rig.root(chain("a", "b", "c"))
    control = root / "control"
    runner = ScriptedRunner({"a": Scripted(during=lambda spec: (control / flag).touch())})
    run = rig.run(root, runner=runner)
    assert run.code == EXIT_KILLED and run.error is None
    assert runner.calls == ["a"]
    assert run.statuses() == {"a": "succeeded", "b": "skipped", "c": "skipped"}
    assert run.state["reason"] == f"kill switch {control / flag} engaged"
    assert run.state["status"] == "killed"
    assert (root / "artefacts" / "a.txt").read_bytes() == product_of("a")


# -- resume ------------------------------------------------------------------------


def test_resume_reruns_only_what_did_not_succeed_and_keeps_the_cost(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b", "c"))
    first = rig.run(root, runner=ScriptedRunner({
        "a": Scripted(report={"usd": 0.25}, cpu_seconds=1.0, wall_seconds=2.0),
        "b": Scripted(exit_code=2, report={"usd": 0.5, "tokens": 3}, cpu_seconds=0.5,
                      wall_seconds=1.5)}))
    assert first.code == EXIT_STEP_FAILED
    assert first.statuses() == {"a": "succeeded", "b": "failed", "c": "skipped"}
    before = first.state
    assert before["cost"]["totals"] == {"cpu_seconds": 1.5, "wall_seconds": 3.5, "usd": 0.75,
                                        "tokens": 3}
    a_digest = before["steps"]["a"]["products"]
    first_records = first.audit

    second = rig.run(root, runner=ScriptedRunner({"b": Scripted(report={"usd": 0.25})}))
    assert second.code == EXIT_OK and second.error is None
    assert second.runner.calls == ["b", "c"]
    assert second.runner.materials["b"] == {"a.txt": product_of("a")}  # from the first run
    after = second.state
    assert after["status"] == "succeeded"
    assert {k: v["attempts"] for k, v in after["steps"].items()} == {"a": 1, "b": 2, "c": 1}
    assert after["steps"]["a"]["products"] == a_digest
    assert after["cost"]["totals"] == {"cpu_seconds": 2.5, "wall_seconds": 5.5, "usd": 1.0,
                                       "tokens": 3}
    for unit, value in before["cost"]["totals"].items():
        assert after["cost"]["totals"][unit] >= value, unit
    assert after["seq"] > before["seq"]
    started = second.audited(ev.RunStarted.KIND)
    assert [(s["steps"], s["steps_done"]) for s in started] == [(3, 1)]
    # The same chain, continued: the first run's records untouched, then linked to.
    assert second.audit_before == len(first_records)
    assert second.chain[: len(first_records)] == first_records
    last_line = (root / "audit.jsonl").read_bytes().splitlines(keepends=True)[
        len(first_records) - 1]
    assert second.audit[0]["prev"] == hashlib.sha256(last_line).hexdigest()


def test_succeeded_plan_runs_nothing_and_exits_0(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b"))
    assert rig.run(root).code == EXIT_OK
    state = (root / "state.json").read_bytes()
    again = rig.run(root)
    assert again.code == EXIT_OK and again.error is None
    assert again.outcome is not None
    assert again.outcome.message == "plan already succeeded; nothing to run"
    assert again.outcome.state == json.loads(state)
    assert (again.runner.calls, again.runner_made, again.guard.request) == ([], False, None)
    assert (root / "state.json").read_bytes() == state
    assert again.preflight.plans == ["flow"]  # the environment is still checked first
    assert again.audited(ev.RunFinished.KIND) == [{"status": "succeeded",
                                               "reason": "already succeeded"}]
    assert ev.StepStarted.KIND not in again.kinds()


def test_resume_after_the_budget_is_spent_runs_nothing_more(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b", budget={"usd": 1.0}))
    first = rig.run(root, runner=ScriptedRunner({"a": Scripted(report={"usd": 1.0})}))
    assert first.code == EXIT_BUDGET
    assert first.statuses() == {"a": "succeeded", "b": "skipped"}
    second = rig.run(root)
    assert second.code == EXIT_BUDGET
    assert second.runner.calls == []  # a budget never resets on resume
    assert second.statuses() == {"a": "succeeded", "b": "skipped"}
    assert second.state["cost"]["totals"] == first.state["cost"]["totals"]
    assert (second.state["status"], second.state["reason"]) == (
        "budget_exhausted", "budget exhausted: usd")


def test_token_accessors_are_durable_first_and_kept_until_revoked(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b"))
    # a's token could not be revoked, b's was; b fails so the plan can resume.
    guard = ScriptedGuard(issue={"a": "acc-a", "b": "acc-b"}, unrevoked=frozenset({"acc-a"}))
    first = rig.run(root, runner=ScriptedRunner({"b": Scripted(exit_code=1)}), guard=guard)
    assert first.code == EXIT_STEP_FAILED
    assert guard.durable == {"a": ["acc-a"], "b": ["acc-b"]}  # in state before the token
    steps = first.state["steps"]
    assert (steps["a"]["token_accessors"], steps["b"]["token_accessors"]) == (["acc-a"], [])
    second = rig.run(root)
    assert second.guard.request is not None
    assert second.guard.request.leftover_accessors == ("acc-a",)  # retried by the next run
    assert second.runner.calls == ["b"] and second.code == EXIT_OK


# -- exit-code precedence ------------------------------------------------------------


@pytest.mark.parametrize("first", ["failure", "kill"])
def test_kill_outranks_a_failure_whichever_ends_first(rig: EngineRig, first: str) -> None:
    root = rig.root(document("both", [node("a"), node("b"), node("c", ("a", "b"))]))
    # a fails, b is killed; the later one waits until the engine recorded the earlier.
    earlier, later = ("a", "b") if first == "failure" else ("b", "a")
    seen, subscriber = after_finished(earlier)
    runner = ScriptedRunner({"a": Scripted(exit_code=1), "b": Scripted(exit_code=None,
                                                                       signal=9)})
    runner.script[later].during = waits_for(seen)
    guard = ScriptedGuard(killed={"b": "KILL.b"})
    run = rig.run(root, jobs=2, runner=runner, guard=guard, subscribers=[subscriber])
    assert [f["step_id"] for f in run.audited(ev.StepFinished.KIND)] == [earlier, later]
    assert run.code == EXIT_KILLED and run.error is None
    assert run.statuses() == {"a": "failed", "b": "killed", "c": "skipped"}
    assert (run.state["status"], run.state["reason"]) == ("killed", "kill switch KILL.b")


def test_environment_failure_outranks_a_step_failure(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b"))
    guard = ScriptedGuard()
    lost = WatchdogLostError("watchdog exited")

    def break_guard(spec: Any) -> None:
        guard.broken = lost

    runner = ScriptedRunner({"a": Scripted(exit_code=1, during=break_guard)})
    run = rig.run(root, runner=runner, guard=guard)
    assert run.code == EXIT_ENVIRONMENT and run.error is lost
    assert run.statuses() == {"a": "failed", "b": "skipped"}
    # The state keeps the first halt (the step's failure); the exit names the environment.
    assert (run.state["status"], run.state["reason"]) == (
        "failed", "step a failed: exited with status 1")
    assert run.guard.closed


def test_environment_failure_after_a_success_stops_the_run(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b"))
    guard = ScriptedGuard()
    lost = WatchdogLostError("watchdog exited")
    runner = ScriptedRunner({"a": Scripted(during=lambda spec: setattr(guard, "broken", lost))})
    run = rig.run(root, runner=runner, guard=guard)
    assert run.code == EXIT_ENVIRONMENT and run.error is lost
    assert runner.calls == ["a"]
    assert run.statuses() == {"a": "succeeded", "b": "skipped"}
    assert (run.state["status"], run.state["reason"]) == ("failed", "watchdog exited")


def test_environment_failure_outranks_a_kill_in_the_exit_code(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b"))
    lost = WatchdogLostError("watchdog exited")
    guard = ScriptedGuard(killed={"a": "KILL.a"})
    runner = ScriptedRunner({"a": Scripted(exit_code=None, signal=9,
                                           during=lambda spec: setattr(guard, "broken", lost))})
    run = rig.run(root, runner=runner, guard=guard)
    assert run.code == EXIT_ENVIRONMENT and run.error is lost
    assert (run.state["status"], run.state["reason"]) == ("killed", "kill switch KILL.a")


def test_environment_broken_before_the_first_step_runs_nothing(rig: EngineRig) -> None:
    root = rig.root(chain("a", "b"))
    lost = WatchdogLostError("watchdog never answered")
    run = rig.run(root, guard=ScriptedGuard(broken=lost))
    assert run.code == EXIT_ENVIRONMENT and run.error is lost
    assert run.runner.calls == [] and run.guard.calls == []
    assert run.statuses() == {"a": "skipped", "b": "skipped"}
    assert (run.state["status"], run.state["reason"]) == ("failed", "watchdog never answered")


def test_contract_violation_outranks_the_preflight(rig: EngineRig) -> None:
    root = rig.root(chain("a", expires=expires_in(-1)))
    preflight = Preflight(SandboxSetupError("no namespaces"))
    run = rig.run(root, preflight=preflight)
    assert run.code == EXIT_REJECTED and isinstance(run.error, ExpiredError)
    assert preflight.plans == []


def test_preflight_refusal_runs_nothing(rig: EngineRig) -> None:
    root = rig.root(chain("a"))
    refusal = SandboxSetupError("user namespaces are disabled")
    run = rig.run(root, preflight=Preflight(refusal))
    assert run.code == EXIT_ENVIRONMENT and run.error is refusal
    assert_nothing_ran(run)
    assert run.preflight.plans == ["flow"]
    assert not (root / "state.json").exists()
    assert [r["kind"] for r in run.audit] == [ev.Verification.KIND]


# -- expiry against the fixed clock --------------------------------------------------


@pytest.mark.parametrize("hours", [-1.0, 0.0])
def test_plan_expired_by_the_engine_clock_is_refused(rig: EngineRig, hours: float) -> None:
    # Still in the future for the real wall clock: only the engine's clock expires it.
    expires = expires_in(hours)
    root = rig.root(chain("a", expires=expires))
    run = rig.run(root)
    assert run.code == EXIT_REJECTED and isinstance(run.error, ExpiredError)
    assert str(run.error) == f"exec_plan.json: expired at {expires}"
    assert_nothing_ran(run)
    assert run.preflight.plans == []
    state = run.state
    assert (state["status"], state["reason"]) == ("rejected", str(run.error))
    assert state["steps"] == {"a": {"status": "pending", "exit_code": None, "attempts": 0,
                                    "started": None, "finished": None, "reason": None,
                                    "products": {}, "token_accessors": []}}
    rejection = run.audited(ev.Rejection.KIND)
    assert len(rejection) == 1 and rejection[0]["message"] == str(run.error)


def test_plan_runs_until_the_engine_clock_reaches_expiry(rig: EngineRig) -> None:
    root = rig.root(chain("a", expires=expires_in(1)))
    late = rig.run(root, clock=fixed_clock(FIXED_NOW.replace(hour=13)))
    assert late.code == EXIT_REJECTED and isinstance(late.error, ExpiredError)
    fresh = rig.root(chain("a", expires=expires_in(1)), name="fresh")
    in_time = rig.run(fresh, clock=fixed_clock(FIXED_NOW.replace(hour=12, minute=59)))
    assert in_time.code == EXIT_OK
    assert in_time.state["steps"]["a"]["started"] == "2031-03-01T12:59:00.000000Z"


def test_expiry_window_is_measured_from_the_engine_clock(rig: EngineRig) -> None:
    rig.configure("\n[limits]\nexpires_max_days = 1\n")
    far = rig.root(chain("a", expires=expires_in(25)), name="far")
    run = rig.run(far)
    assert run.code == EXIT_REJECTED and isinstance(run.error, InputError)
    assert str(run.error) == "exec_plan.json: expires more than 1 days ahead"
    assert run.runner.calls == []
    near = rig.root(chain("a", expires=expires_in(24)), name="near")
    assert rig.run(near).code == EXIT_OK


# -- --jobs ------------------------------------------------------------------------


def _fan() -> dict[str, Any]:
    """Three independent steps (declared out of order) and one joining them."""
    return document("fan", [node("c"), node("b"), node("a"), node("d", ("a", "b", "c"))])


def test_jobs_2_starts_ready_steps_in_id_order_two_at_a_time(rig: EngineRig) -> None:
    root = rig.root(_fan())
    both = threading.Barrier(2, timeout=HANDOFF_SECONDS)  # a and b must overlap
    runner = ScriptedRunner({"a": Scripted(during=lambda spec: both.wait()),
                             "b": Scripted(during=lambda spec: both.wait())})
    run = rig.run(root, jobs=2, runner=runner)
    assert run.code == EXIT_OK
    assert [s["step_id"] for s in run.audited(ev.StepStarted.KIND)] == ["a", "b", "c", "d"]
    assert runner.max_running == 2  # a and b ran at once, never c with them
    assert run.runner.materials["d"] == {f"{s}.txt": product_of(s) for s in "abc"}
    assert run.audited(ev.RunStarted.KIND)[0]["jobs"] == 2


def test_jobs_2_reservations_split_the_budget(rig: EngineRig) -> None:
    root = rig.root(document("split", [node("a"), node("b")], budget={"wall_seconds": 20}))
    run = rig.run(root, jobs=2)
    assert run.code == EXIT_OK
    assert [run.runner.specs[s].timeout_seconds for s in ("a", "b")] == [10.0, 10.0]


def _outcome(run: Run) -> dict[str, Any]:
    state = run.state
    files = {f"{sub}/{p.name}": p.read_bytes()
             for sub in ("artefacts", "links", "cost") for p in sorted((run.root / sub).glob("*"))}
    registry = json.loads((run.root / "registry_map.json").read_text())
    return {"code": run.code, "status": state["status"], "steps": state["steps"],
            "cost": state["cost"], "registry": registry["artefacts"], "files": files}


def test_jobs_2_records_the_same_results_as_jobs_1_whatever_finishes_first(
        rig: EngineRig) -> None:
    def runner(seen: threading.Event | None) -> ScriptedRunner:
        script = {s: Scripted(report={"usd": 0.125}, wall_seconds=2.0) for s in "abcd"}
        if seen is not None:  # a ends only after the engine recorded c: reverse order
            script["a"].during = waits_for(seen)
        return ScriptedRunner(script)

    serial = rig.run(rig.root(_fan(), name="serial"), jobs=1, runner=runner(None))
    seen, subscriber = after_finished("c")
    parallel = rig.run(rig.root(_fan(), name="parallel"), jobs=2, runner=runner(seen),
                       subscribers=[subscriber])
    assert [f["step_id"] for f in serial.audited(ev.StepFinished.KIND)] == ["a", "b", "c", "d"]
    finish_order = [f["step_id"] for f in parallel.audited(ev.StepFinished.KIND)]
    assert finish_order.index("c") < finish_order.index("a")
    assert serial.code == parallel.code == EXIT_OK
    assert _outcome(serial) == _outcome(parallel)


# -- limits the adversarial suite reaches only through a subprocess ---------------------


def test_more_steps_at_once_than_uids_run_one_uid_at_a_time(rig: EngineRig) -> None:
    """A plan needing more concurrent uids than the range waits for leases, never shares."""
    base = 3_960_000 + (os.getpid() % 1000) * 10
    rig.configure(f"\n[sandbox]\nuid_base = {base}\nuid_count = 1\n")
    root = rig.root(document("wide", [node("a"), node("b"), node("c")]))
    run = rig.run(root, jobs=3, real_uid_pool=True)
    assert run.code == EXIT_OK
    assert run.statuses() == {"a": "succeeded", "b": "succeeded", "c": "succeeded"}
    assert run.runner.max_running == 1
    assert {spec.uid for spec in run.runner.specs.values()} == {base}
    assert [f["uid"] for f in run.audited(ev.StepFinished.KIND)] == [base, base, base]


def test_input_growing_while_copied_is_refused_before_anything_runs(
        rig: EngineRig, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = [step("a", sh("make"), materials=["data.csv"], products=["a.txt"])]
    root = rig.root(document("grow", steps, {"data.csv": DATA}), {"data.csv": DATA})
    grown: list[bool] = []

    def copy_chunk(src: int, dst: int, count: int, *, offset_src: int | None = None) -> int:
        copied = real_copy_chunk(src, dst, count, offset_src=offset_src)
        if not grown:
            grown.append(True)
            with open(root / "inbox" / "data.csv", "ab") as handle:
                handle.write(b"3,4\n")
        return copied

    monkeypatch.setattr("haios.intake.copy_chunk", copy_chunk)
    run = rig.run(root)
    assert grown == [True]
    assert run.code == EXIT_REJECTED and isinstance(run.error, InputError)
    assert "grew while being copied" in str(run.error)
    assert_nothing_ran(run)
    assert run.state["status"] == "rejected"
    assert run.audited(ev.Rejection.KIND)[0]["message"] == str(run.error)
