# SPDX-License-Identifier: Apache-2.0
"""The one wall clock the engine reads (so tests and callers pass "now" around)."""

from __future__ import annotations

import datetime as dt
import time


def wall_clock() -> dt.datetime:
    """Now, in UTC."""
    return dt.datetime.fromtimestamp(time.time(), dt.UTC)
