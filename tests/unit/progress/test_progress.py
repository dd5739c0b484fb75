# SPDX-License-Identifier: Apache-2.0
"""The progress display: numbers for people, lines from events, plain and live output."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haios import events as ev
from haios.cli.render import render_human
from haios.events import Event
from haios.progress import (
    LiveProgress,
    PlainProgress,
    RunView,
    clean_text,
    format_amount,
    format_clock,
    format_cost,
    format_seconds,
    format_usd,
    open_progress,
    status_text,
)
from tests.support.events import event as make_event

STATE_DIR = "/var/lib/haios"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class BrokenPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def e(event_kind: str, /, **fields: Any) -> Event:
    return make_event(event_kind, **fields)


def texts(view: RunView, *events: Event) -> list[str]:
    return [line.text for event in events for line in view.apply(event)]


# -- numbers ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0 s"), (0.00001, "<0.1 ms"), (0.0004, "0.4 ms"), (0.0031, "3.1 ms"),
    (0.13641877199984265, "136 ms"), (0.9996, "1.00 s"), (1.234, "1.23 s"), (9.996, "10.0 s"),
    (12.34, "12.3 s"), (59.96, "1 min 00 s"), (125, "2 min 05 s"), (3725, "1 h 02 min"),
    (float("inf"), "inf"),
], ids=str)
def test_seconds_are_shown_at_a_sensible_precision(seconds: float, shown: str) -> None:
    assert format_seconds(seconds) == shown


@pytest.mark.parametrize(("value", "shown"), [
    (0, "$0.00"), (0.0, "$0.00"), (2, "$2.00"), (0.1, "$0.10"), (0.3, "$0.30"),
    (0.125, "$0.125"), (1e-07, "$0.0000001"), (Decimal("0.1") + Decimal("0.2"), "$0.30"),
    (1e20, "$100000000000000000000.00"), (0.30000000000000004, "$0.30000000000000004"),
], ids=str)
def test_money_is_its_exact_decimal(value: float | Decimal, shown: str) -> None:
    assert format_usd(value) == shown


@pytest.mark.parametrize(("value", "shown"), [
    (10, "10"), (10.0, "10"), (10.5, "10.5"), (1e21, "1000000000000000000000"),
    (Decimal("1510"), "1510"),
])
def test_counts_have_no_float_tail(value: float, shown: str) -> None:
    assert format_amount(value) == shown


def test_clock() -> None:
    assert [format_clock(s) for s in (0, 4.9, 723, 3723)] == ["0:00", "0:04", "12:03", "1:02:03"]


def test_summary_cost_line_is_for_people() -> None:
    document = {"plan_id": "p", "status": "succeeded", "steps": {},
                "cost": {"totals": {"cpu_seconds": 0.4, "wall_seconds": 0.13641877199984265,
                                    "usd": 0.3, "tokens": 10}}}
    assert render_human(document).splitlines()[-1] == (
        "  cost: cpu 400 ms, wall 136 ms, $0.30, 10 tokens")


def test_cost_phrase_skips_zero_and_keeps_unknown_units_escaped() -> None:
    phrase = format_cost({"usd": 0.0, "tokens": 0, "cpu_seconds": 1.5}, skip_zero=True)
    assert phrase == "cpu 1.50 s"
    assert format_cost({"odd\x1b": "x"}) == "odd\\x1b=x"


# -- free text --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "shown"), [
    (f"{STATE_DIR}/runs/abc/store/data.csv: unreadable", "<state_dir>/runs/abc/store/data.csv: "
                                                         "unreadable"),
    ("kill switch /tmp/w/os_root/control/KILL engaged", "kill switch KILL engaged"),
    ("operator flag /run/haios/KILL seen", "operator flag KILL seen"),
    ("inbox/data.csv: SHA-256 differs", "inbox/data.csv: SHA-256 differs"),
    ("vault at http://127.0.0.1:8200/v1/sys said no",
     "vault at http://127.0.0.1:8200/v1/sys said no"),
    ("token hvs.CAESIJ4bS3cr3tT0k3nV4lu3xyz leaked", "token <redacted> leaked"),
    ("\x1b]0;owned\x07red\nsecond", "\\x1b]0;owned\\x07red\\x0asecond"),
], ids=["state_dir", "os_root_flag", "operator_flag", "relative", "url", "token", "controls"])
def test_free_text_is_cleaned(text: str, shown: str) -> None:
    cleaned = clean_text(text, state_dir=STATE_DIR)
    if shown.startswith("<state_dir>"):
        assert STATE_DIR not in cleaned and cleaned.startswith("<state_dir>")
    else:
        assert cleaned == shown
    assert cleaned.isprintable()


def test_long_text_is_cut() -> None:
    cleaned = clean_text("x" * 1000)
    assert len(cleaned) == 240 and cleaned.endswith("...")


# -- the view ---------------------------------------------------------------------------------

def run_events(*, usd: tuple[float, float] = (0.1, 0.2)) -> list[Event]:
    """A two-step run as the engine publishes it."""
    return [
        e(ev.Verification.KIND, kind="plan", result="ok", subject="exec_plan.json"),
        e(ev.Verification.KIND, kind="digest", result="ok", subject="data.csv"),
        e(ev.Verification.KIND, kind="artefact", result="ok", subject="data.csv"),
        e(ev.Verification.KIND, kind="link", result="ok", subject="data.csv"),
        e(ev.RunStarted.KIND, plan_id="nightly", plan_sha256="ab" * 32, jobs=1, steps=2,
          steps_done=0),
        e(ev.StepStarted.KIND, step_id="count", profile="default", attempt=1),
        e(ev.ProductRecorded.KIND, step_id="count", name="count.txt", sha256="00" * 32, size=1),
        e(ev.CostRecorded.KIND, step_id="count", cpu_seconds=0.0084, wall_seconds=0.03,
          usd=usd[0], tokens=10),
        e(ev.BudgetRemaining.KIND, unit="usd", value=0.9),
        e(ev.BudgetRemaining.KIND, unit="tokens", value=None),
        e(ev.StepFinished.KIND, step_id="count", status="succeeded", uid=61234, exit_code=0,
          profile="default", wall_seconds=0.03, reason=None),
        e(ev.StepStarted.KIND, step_id="report", profile="default", attempt=2),
        e(ev.CostRecorded.KIND, step_id="report", cpu_seconds=0.02, wall_seconds=1.5,
          usd=usd[1], tokens=1500),
        e(ev.BudgetRemaining.KIND, unit="usd", value=0.7),
        e(ev.StepFinished.KIND, step_id="report", status="succeeded", uid=61235, exit_code=0,
          profile="default", wall_seconds=1.5, reason=None),
        e(ev.RunFinished.KIND, status="succeeded", reason=None),
    ]


def test_a_run_reads_in_order_with_exact_money() -> None:
    clock = Clock()
    view = RunView(now=clock, state_dir=STATE_DIR)
    lines: list[str] = []
    for event in run_events():
        clock.now += 0.01
        lines += texts(view, event)
    assert lines == [
        "verified in 40 ms: plan signature, 1 input (1 digest, 1 signature, 1 link)",
        "run started: plan nightly (sha256 abababababab), 2 steps, jobs 1",
        "step count: started (attempt 1, profile default)",
        "step count: succeeded in 30 ms (attempt 1, exit 0; cpu 8.4 ms, $0.10, 10 tokens)",
        "step report: started (attempt 2, profile default)",
        "step report: succeeded in 1.50 s (attempt 2, exit 0; cpu 20 ms, $0.20, 1500 tokens)",
        # 0.1 + 0.2 summed as the decimals they are: $0.30, not 0.30000000000000004
        "plan nightly: succeeded in 110 ms; steps: 2 succeeded; used cpu 28 ms, wall 1.53 s, "
        "$0.30, 1510 tokens; budget left $0.70",
    ]


def test_detail_lines_are_marked_for_plain_logs_only() -> None:
    view = RunView(now=Clock())
    details = [line.text for event in run_events() for line in view.apply(event) if line.detail]
    assert details == ["step count: started (attempt 1, profile default)",
                       "step report: started (attempt 2, profile default)"]


def test_a_refusal_shows_nothing() -> None:
    """Before the run starts lines are held; a refusal stays one diagnostic line."""
    view = RunView(now=Clock())
    assert texts(view,
                 e(ev.Kill.KIND, scope="engine_lost", flag="engine_lost", step_id="old",
                   latency_seconds=0.0, complete=True),
                 e(ev.Verification.KIND, kind="plan", result="ok", subject="exec_plan.json"),
                 e(ev.Verification.KIND, kind="digest", result="fail", subject="data.csv"),
                 e(ev.Rejection.KIND, reason="digest", message=f"{STATE_DIR}/x: differs")) == []


def test_held_lines_come_with_the_start() -> None:
    view = RunView(now=Clock())
    assert texts(view, e(ev.Kill.KIND, scope="engine_lost", flag="engine_lost", step_id="old",
                         latency_seconds=0.0, complete=True)) == []
    lines = texts(view, e(ev.RunStarted.KIND, plan_id="p", plan_sha256="cd" * 32, jobs=2))
    assert lines[0] == ("step old: process tree killed by the watchdog while no engine was "
                        "running (engine_lost)")
    assert lines[1].startswith("verified in ") and lines[2].startswith("run started: plan p")


def test_idempotent_rerun_says_nothing_to_run() -> None:
    view = RunView(now=Clock())
    lines = texts(view, e(ev.Verification.KIND, kind="plan", result="ok", subject="exec_plan.json"),
                  e(ev.RunFinished.KIND, status="succeeded", reason="already succeeded"))
    assert lines == ["verified in 0 s: plan signature, 0 inputs",
                     "plan already succeeded: nothing to run"]


def test_kill_lines_name_flags_by_base_name_and_never_a_path() -> None:
    view = RunView(now=Clock(), state_dir=STATE_DIR)
    texts(view, e(ev.RunStarted.KIND, plan_id="k", plan_sha256="ef" * 32, jobs=1),
          e(ev.StepStarted.KIND, step_id="tree", profile="default", attempt=1))
    lines = texts(
        view,
        e(ev.KillSwitch.KIND, engaged=True, flag="/run/haios/KILL", scope="global"),
        e(ev.KillSwitch.KIND, engaged=True, flag="/run/haios/KILL", scope="global"),  # latched
        e(ev.Kill.KIND, scope="global", flag="/run/haios/KILL", step_id="tree",
          latency_seconds=0.0031, complete=False),
        e(ev.StepFinished.KIND, step_id="tree", status="killed", uid=61000, exit_code=None,
          profile="default", wall_seconds=2.5, reason="kill switch /run/haios/KILL engaged"),
        e(ev.RunFinished.KIND, status="killed", reason="kill switch /run/haios/KILL engaged"),
    )
    assert lines == [
        "kill switch engaged: KILL (global)",
        "step tree: process tree killed by KILL, 3.1 ms after the flag was seen "
        "(not every process confirmed gone)",
        "step tree: killed in 2.50 s (attempt 1): kill switch KILL engaged",
        "plan k: killed in 0 s (kill switch KILL engaged); steps: 1 killed",
    ]
    assert not any("/run/haios" in line or "61000" in line for line in lines)


def test_budget_halt_is_shown_once() -> None:
    view = RunView(now=Clock())
    texts(view, e(ev.RunStarted.KIND, plan_id="b", plan_sha256="00" * 32, jobs=1))
    halt = e(ev.BudgetHalt.KIND, reason="budget exhausted: usd")
    assert texts(view, halt, halt) == ["budget halt: budget exhausted: usd; no further step starts"]
    assert view.snapshot().notice == "budget exhausted"


def test_vault_lines_never_show_accessors() -> None:
    view = RunView(now=Clock())
    texts(view, e(ev.RunStarted.KIND, plan_id="v", plan_sha256="00" * 32, jobs=1))
    accessor = "acc-0123456789abcdef"
    lines = texts(view,
                  e(ev.VaultTokenIssued.KIND, step_id="s", accessor=accessor, ttl_seconds=120),
                  e(ev.VaultTokenRevoked.KIND, step_id="s", accessor=accessor),
                  e(ev.VaultRevokeFailed.KIND, step_id="s", accessor=accessor,
                    message="vault_unavailable"))
    assert lines == ["Vault token issued for s (ttl 2 min 00 s)", "Vault token for s revoked",
                     "Vault token for s not revoked (vault_unavailable); it will be retried"]
    assert not any(accessor in line for line in lines)


def test_known_step_count_gives_pending_and_skipped() -> None:
    """When run.started says how many steps the run has, pending and skipped show."""
    clock = Clock()
    view = RunView(now=clock)
    texts(view, e(ev.RunStarted.KIND, plan_id="p", plan_sha256="00" * 32, jobs=1, steps=4,
                  steps_done=1),
          e(ev.StepStarted.KIND, step_id="a", profile="default", attempt=1))
    clock.now += 3
    snap = view.snapshot()
    assert (snap.pending, [s.step_id for s in snap.running]) == (2, ["a"])
    assert snap.running[0].elapsed_seconds == 3
    assert status_text(snap) == "plan p · 0:03 · 0 done · 1 running · 2 pending"
    lines = texts(view, e(ev.StepFinished.KIND, step_id="a", status="failed", exit_code=1,
                          profile="default", wall_seconds=3.0, reason="exited with status 1"),
                  e(ev.RunFinished.KIND, status="failed", reason="step a failed"))
    assert lines[-1] == ("plan p: failed in 3.00 s (step a failed); steps: 1 failed, 2 skipped")


def test_snapshot_counts_what_is_still_pending() -> None:
    view = RunView(now=Clock())
    texts(view, *run_events()[:11])
    snap = view.snapshot()
    assert snap.pending == 1 and snap.used == "cpu 8.4 ms, $0.10, 10 tokens"


def test_unknown_kinds_are_ignored() -> None:
    assert texts(RunView(now=Clock()), e("some.future_event", x=1)) == []


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=5)
KINDS = [ev.Verification.KIND, ev.Rejection.KIND, ev.RunStarted.KIND, ev.StepStarted.KIND,
         ev.StepFinished.KIND, ev.SandboxViolation.KIND, ev.CostRecorded.KIND,
         ev.BudgetRemaining.KIND, ev.BudgetHalt.KIND,
         ev.KillSwitch.KIND, ev.Kill.KIND, ev.VaultTokenIssued.KIND, ev.VaultTokenRevoked.KIND,
         ev.VaultRevokeFailed.KIND, ev.ProductRecorded.KIND, ev.RunFinished.KIND]
FIELDS = ["kind", "result", "subject", "reason", "message", "plan_id", "plan_sha256", "jobs",
          "steps", "steps_done", "step_id", "profile", "attempt", "status", "uid", "exit_code",
          "wall_seconds", "cpu_seconds", "usd", "tokens", "unit", "value", "engaged", "flag",
          "scope", "latency_seconds", "complete", "accessor", "ttl_seconds"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KINDS),
                          st.dictionaries(st.sampled_from(FIELDS), JSONISH, max_size=8)),
                max_size=12))
def test_any_field_values_never_break_the_view(events: list[tuple[str, dict[str, Any]]]) -> None:
    """A display must never break a run: odd values are shown escaped, never raised on."""
    view = RunView(now=Clock(), state_dir=STATE_DIR)
    for kind, fields in [(ev.RunStarted.KIND, {}), *events]:
        declared = {f.name for f in dataclasses.fields(ev.EVENT_TYPES[kind])}
        odd = {name: value for name, value in fields.items() if name in declared}
        for line in view.apply(make_event(kind, **odd)):
            assert line.text.isprintable() and "\n" not in line.text
    status_text(view.snapshot())


# -- plain and live output --------------------------------------------------------------------

def test_plain_lines_are_timestamped_and_escape_free() -> None:
    stream = io.StringIO()
    wall = dt.datetime(2025, 6, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
    display = PlainProgress(stream, RunView(now=Clock()), wall=lambda: wall)
    for event in run_events():
        display.on_event(event)
    display.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 7
    assert all(line.startswith("2025-06-01T10:00:00.123Z ") for line in lines)
    assert "\x1b" not in stream.getvalue()


def test_a_broken_stream_silences_the_display_not_the_run() -> None:
    display = PlainProgress(BrokenPipe(), RunView(now=Clock()))
    for event in run_events():
        display.on_event(event)  # no exception reaches the engine's publish
    display.close()


def test_open_progress_picks_plain_unless_a_real_terminal() -> None:
    assert isinstance(open_progress(io.StringIO()), PlainProgress)
    assert isinstance(open_progress(Terminal(), environ={"TERM": "dumb"}), PlainProgress)
    assert isinstance(open_progress(Terminal(), environ={"TERM": "xterm"}), LiveProgress)


def test_live_display_restores_the_terminal_and_shows_no_markup_from_input() -> None:
    stream = Terminal()
    display = LiveProgress(stream, RunView(now=Clock()), refresh_per_second=20)
    hostile = e(ev.StepFinished.KIND, step_id="[bold red]x", status="failed", exit_code=1,
                profile="default", wall_seconds=0.5, reason="\x1b]0;owned\x07 :smile:")
    for event in [*run_events()[:5], hostile, run_events()[-1]]:
        display.on_event(event)
    display.close()
    display.close()  # idempotent
    out = stream.getvalue()
    assert out.startswith("\x1b[?25l")
    assert out.rfind("\x1b[?25h") > out.rfind("\x1b[?25l")
    assert "[bold red]x" in out and ":smile:" in out  # text as it is, no markup, no emoji
    assert "\x1b]0;owned" not in out
    plain = re.sub(r"\x1b\[[0-9;?]*[@-~]", "", out)
    assert "step [bold red]x: failed in 500 ms (exit 1): \\x1b]0;owned\\x07 :smile:" in plain
    assert "step count: started" not in plain  # a detail: the live block shows it instead


def test_live_display_that_never_started_writes_nothing() -> None:
    stream = Terminal()
    display = LiveProgress(stream, RunView(now=Clock()))
    display.close()
    assert stream.getvalue() == ""


class DeadTerminal(Terminal):
    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")


def test_a_dead_terminal_stops_the_live_display_not_the_run() -> None:
    display = LiveProgress(DeadTerminal(), RunView(now=Clock()))
    for event in run_events():
        display.on_event(event)  # no exception reaches the engine's publish
    display.close()
