# SPDX-License-Identifier: Apache-2.0
"""Shows a run's progress on a stream (stderr): plain lines, or a live display.

`open_progress` picks the form from the stream: not a terminal (CI, a pipe,
a log file) gives one timestamped line per event and no escape code at all;
a terminal gives the same lines (less step starts and Vault tokens, which
the block shows or needs not) above a small live block drawn with `rich`
(steps done, running and pending, elapsed time, cost used, budget left).
Both subscribe to the engine's `EventBus` through `on_event` and read
nothing else (see `_view`).

A display never breaks a run: a stream that fails (a closed pipe, a full
disk) silences it, and `close` always restores the terminal (cursor shown,
live block erased, the lines printed above it kept). Does I/O: writes to
the stream it is given, and on a terminal runs rich's refresh thread.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, Protocol, TextIO

from haios._util.clock import wall_clock
from haios.events import Event
from haios.progress._format import format_clock, plural
from haios.progress._view import Line, RunView, Snapshot, Tone

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

#: how often a terminal's live block is redrawn
LIVE_REFRESH_PER_SECOND: Final = 4
#: running steps listed under the live status line; more are counted
LIVE_RUNNING_SHOWN: Final = 6
_TONE_STYLE: Final[Mapping[Tone, str]] = {
    "info": "", "ok": "green", "warn": "yellow", "fail": "red",
}


class ProgressDisplay(Protocol):
    """What the CLI subscribes to the engine's bus and closes at the end."""

    def on_event(self, event: Event) -> None:
        """Take one engine event (pass this to `EventBus.subscribe`)."""

    def close(self) -> None:
        """End the display; idempotent."""


def _timestamp(when: dt.datetime) -> str:
    """RFC 3339 in UTC with milliseconds: `2025-06-01T10:00:00.123Z`."""
    utc = when.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


class PlainProgress:
    """One timestamped line per event: for CI, pipes and log files."""

    def __init__(self, stream: TextIO, view: RunView, *,
                 wall: Callable[[], dt.datetime] = wall_clock) -> None:
        """Write to `stream` what `view` makes of each event, stamped by `wall`."""
        self._stream, self._view, self._wall = stream, view, wall
        self._silent = False

    def on_event(self, event: Event) -> None:
        """Write the event's lines, if any.

        Side Effects:
            Writes to and flushes the stream; after a write fails, writes nothing more.
        """
        lines = self._view.apply(event)
        if not lines or self._silent:
            return
        stamp = _timestamp(self._wall())
        text = "".join(f"{stamp} {line.text}\n" for line in lines)
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # closed pipe or stream: the run goes on, silently
            self._silent = True

    def close(self) -> None:
        """Nothing to restore for plain lines."""
        self._silent = True


class LiveProgress:
    """A live block on a terminal, with the run's log lines printed above it."""

    def __init__(self, stream: TextIO, view: RunView, *,
                 refresh_per_second: float = LIVE_REFRESH_PER_SECOND) -> None:
        """Draw on `stream` (a terminal); nothing is drawn before the first event."""
        from rich.console import Console

        # No markup, emoji or highlighting: names and reasons come from os_root
        # and must show as the text they are, never as styles or symbols.
        self._console: Console = Console(file=stream, force_terminal=True, markup=False,
                                         emoji=False, highlight=False)
        self._view = view
        self._refresh = refresh_per_second
        # Guards the view: events arrive on the engine's threads while rich's
        # refresh thread draws. Never held while calling into rich.
        self._lock = threading.Lock()
        # Orders starting, drawing and stopping the block, so no event can
        # start it again after `close` (rich's refresh thread never takes it).
        self._life = threading.Lock()
        self._live: Live | None = None
        self._spinner: RenderableType | None = None
        self._closed = False

    def on_event(self, event: Event) -> None:
        """Print the event's log lines above the live block (starting it if needed).

        Side Effects:
            Writes to the terminal; the first call starts rich's refresh
            thread. After a write fails, the display stops.
        """
        with self._lock:
            lines = self._view.apply(event)
        with self._life:
            if self._closed:
                return
            try:
                live = self._ensure_live()
                if lines:
                    live.refresh()  # the block below the new lines shows this event too
                for line in lines:
                    if not line.detail:
                        self._console.print(_styled(line))
            except (OSError, ValueError):  # the terminal went away: the run goes on
                self._closed = True
                self._stop()

    def close(self) -> None:
        """Stop the live block: erase it, show the cursor; the log lines stay.

        Side Effects:
            Stops rich's refresh thread and writes the terminal's restore codes.
        """
        with self._life:
            self._closed = True
            self._stop()

    def _stop(self) -> None:
        live, self._live = self._live, None
        if live is None:
            return
        try:
            live.stop()
        except (OSError, ValueError):  # nothing left to restore on a dead terminal
            return

    def _ensure_live(self) -> Live:
        if self._live is not None:
            return self._live
        from rich.live import Live
        from rich.spinner import Spinner

        self._spinner = Spinner("dots", style="cyan")
        # The CLI's stdout (the summary or the JSON document) is never
        # redirected through the live display: it stays exactly as it is.
        self._live = Live(get_renderable=self._render, console=self._console,
                          refresh_per_second=self._refresh, transient=True,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start(refresh=True)
        return self._live

    def _render(self) -> RenderableType:
        with self._lock:
            snapshot = self._view.snapshot()
        return render_snapshot(snapshot, self._spinner)


def _styled(line: Line) -> RenderableType:
    from rich.text import Text

    return Text(line.text, style=_TONE_STYLE[line.tone])


def status_text(snapshot: Snapshot) -> str:
    """The live block's first line, as plain text."""
    elapsed = format_clock(snapshot.elapsed_seconds)
    if snapshot.phase == "verifying":
        return f"verifying · {elapsed} · {plural(snapshot.checks, 'check')} passed"
    parts = [f"plan {snapshot.plan_id}", elapsed]
    done = sum(snapshot.finished.values())
    failed = done - snapshot.finished.get("succeeded", 0)
    steps = f"{done} done" + (f" ({failed} not succeeded)" if failed else "")
    steps += f" · {len(snapshot.running)} running"
    if snapshot.pending is not None:
        steps += f" · {snapshot.pending} pending"
    parts.append(steps)
    if snapshot.used:
        parts.append(f"used {snapshot.used}")
    if snapshot.left:
        parts.append(f"left {snapshot.left}")
    if snapshot.notice:
        parts.append(snapshot.notice)
    return " · ".join(parts)


def render_snapshot(snapshot: Snapshot, spinner: RenderableType | None = None
                    ) -> RenderableType:
    """The live block: a spinner and the status line, then one line per running step.

    Every line is cut to the terminal's width (never wrapped), so the block
    keeps its height and redraws in place.

    Args:
        snapshot: the run now.
        spinner: the animation to show (keep one across redraws so it turns).
    """
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True, overflow="ellipsis")
    grid.add_row(spinner if spinner is not None else "*", Text(status_text(snapshot)))
    for step in snapshot.running[:LIVE_RUNNING_SHOWN]:
        grid.add_row("", Text(f"▸ {step.step_id} · attempt {step.attempt} · "
                              f"{format_clock(step.elapsed_seconds)}", style="dim"))
    hidden = len(snapshot.running) - LIVE_RUNNING_SHOWN
    if hidden > 0:
        grid.add_row("", Text(f"+ {hidden} more running", style="dim"))
    return grid


def _is_terminal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    try:
        tty = stream.isatty()
    except (OSError, ValueError):
        return False
    # A dumb terminal cannot move the cursor: it gets the plain lines.
    return tty and environ.get("TERM", "") != "dumb"


def open_progress(stream: TextIO, *, environ: Mapping[str, str] | None = None,
                  state_dir: str | None = None,
                  monotonic: Callable[[], float] = time.monotonic) -> ProgressDisplay:
    """The progress display for `stream`: live on a terminal, plain lines otherwise.

    Args:
        stream: where progress goes (the CLI passes stderr; stdout carries
            only the result).
        environ: the environment (`TERM=dumb` means plain lines).
        state_dir: the engine's private area; never shown in any line.
        monotonic: the clock for elapsed times.

    Returns:
        A display; subscribe its `on_event` and call `close` when the run ends.
    """
    view = RunView(now=monotonic, state_dir=state_dir)
    if _is_terminal(stream, environ or {}):
        return LiveProgress(stream, view)
    return PlainProgress(stream, view)
