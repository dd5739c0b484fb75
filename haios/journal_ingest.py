# SPDX-License-Identifier: Apache-2.0
"""Carry what the watchdog did while the engine was dead into the audit trail.

When the engine dies, the watchdog kills every step tree and writes an
`engine_lost` record to its journal (`watchdog.jsonl` in the engine's run
area under state_dir, outside os_root; see area.py). The next `haios run`
publishes each tree it killed as a `kill` event with scope `engine_lost`
(audit log and metrics), then removes the journal. Does I/O in the private area only.
"""

from __future__ import annotations

from typing import Any

from haios import events as ev
from haios._util.strict_json import StrictJSONError, parse_strict_json
from haios.area import RunArea
from haios.errors import HaiosError

JOURNAL = "watchdog.jsonl"
JOURNAL_MAX_BYTES = 4 << 20


def ingest_watchdog_journal(area: RunArea, bus: ev.EventBus) -> int:
    """Publish the engine-lost kills a previous run's watchdog recorded.

    Returns:
        How many killed step trees were recorded.

    Side Effects:
        Publishes events; removes the journal after reading it.
    """
    private = area.dir
    if private.lstat(JOURNAL) is None:
        return 0
    try:
        data = private.read_bytes(JOURNAL, max_bytes=JOURNAL_MAX_BYTES)
    except HaiosError as exc:
        bus.publish(ev.Rejection(reason="watchdog_journal", message=str(exc)))
        return 0
    killed = 0
    for line in data.splitlines():
        record = _parse(line)
        if record is None or record.get("event") != "engine_lost":
            continue
        for entry in record.get("steps") or []:
            if isinstance(entry, dict) and isinstance(entry.get("step_id"), str):
                bus.publish(ev.Kill(scope="engine_lost", flag="engine_lost",
                            step_id=entry["step_id"],
                            latency_seconds=float(entry.get("latency_seconds") or 0.0),
                            complete=bool(entry.get("complete"))))
                killed += 1
    private.unlink(JOURNAL)
    return killed


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = parse_strict_json(line)
    except StrictJSONError:
        return None  # a torn last line from a crash mid-append
    return record if isinstance(record, dict) else None
