# SPDX-License-Identifier: Apache-2.0
"""Every Prometheus metric of contract section 10 (and ADR 0004), in one package.

`MetricsRecorder` owns a private `CollectorRegistry` (never the global one,
so runs and tests stay isolated), subscribes to the engine's events
(`haios.events`) and turns them into metric updates. It serves the registry
over HTTP during a run (`serve`) and writes `metrics.prom` at its end
(`write_textfile`). `parse_metrics_addr` validates `--metrics-addr`.

Label values come only from fixed lists: the contract's enumerations, a
fixed list of rejection reasons, sandbox violation kinds and egress
outcomes and refusal reasons (anything else becomes `other`), and profile
names that look like names (at most `PROFILE_LABELS_MAX` of them). A step
id, endpoint, address, path, plan id, accessor or message
never becomes a label, so neither cardinality nor an attacker's string can
reach the exposition.

What this module does not do: decide anything, or record history (metrics
are per process; `audit.jsonl` and `state.json` are the record).

- `families`: the families and the fixed label values;
- `recorder`: `MetricsRecorder`, events in, metric updates out;
- `server`: `MetricsServer` for `--metrics-addr`, `parse_metrics_addr`;
- `textfile`: `write_atomically` for `metrics.prom`.
"""

from __future__ import annotations

from haios._util.net import is_loopback_host
from haios.metrics.families import (
    METRICS_FILE_NAME,
    PROFILE_LABELS_MAX,
    REJECTION_REASONS,
)
from haios.metrics.recorder import MetricsRecorder
from haios.metrics.server import MetricsServer, parse_metrics_addr
from haios.metrics.textfile import write_atomically

__all__ = [
    "METRICS_FILE_NAME",
    "PROFILE_LABELS_MAX",
    "REJECTION_REASONS",
    "MetricsRecorder",
    "MetricsServer",
    "is_loopback_host",
    "parse_metrics_addr",
    "write_atomically",
]
