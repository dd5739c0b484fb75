# SPDX-License-Identifier: Apache-2.0
"""Progress of `haios run` for a person, drawn from the engine's event stream.

`open_progress` returns the display the CLI subscribes to the engine's bus:
plain timestamped lines when the stream is not a terminal, a live block on
a terminal. The number formatters are shared with the CLI's summary.
I/O only in `_display` (writing to the stream it is given).
"""

from haios.progress._display import (
    LiveProgress,
    PlainProgress,
    ProgressDisplay,
    open_progress,
    render_snapshot,
    status_text,
)
from haios.progress._format import (
    clean_text,
    exact_decimal,
    format_amount,
    format_clock,
    format_cost,
    format_seconds,
    format_usd,
)
from haios.progress._view import Line, RunningStep, RunView, Snapshot

__all__ = [
    "Line",
    "LiveProgress",
    "PlainProgress",
    "ProgressDisplay",
    "RunView",
    "RunningStep",
    "Snapshot",
    "clean_text",
    "exact_decimal",
    "format_amount",
    "format_clock",
    "format_cost",
    "format_seconds",
    "format_usd",
    "open_progress",
    "render_snapshot",
    "status_text",
]
