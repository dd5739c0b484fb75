# SPDX-License-Identifier: Apache-2.0
"""cost/<step_id>.json (contract section 8) and the step's own cost report.

No I/O.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from haios.models.common import Identifier, NonNegativeFloat, NonNegativeInt, StrictModel

COST_SCHEMA = "haios/cost_record/v1"


class Measured(StrictModel):
    """What the kernel measured for the whole step tree."""

    cpu_seconds: NonNegativeFloat
    wall_seconds: NonNegativeFloat
    max_rss_bytes: NonNegativeInt


class Reported(StrictModel):
    """What the step reported through `$HAIOS_COST_REPORT` (zero if nothing)."""

    usd: NonNegativeFloat | NonNegativeInt = 0
    tokens: NonNegativeFloat | NonNegativeInt = 0


class CostReport(StrictModel):
    """The JSON object a step may write to `$HAIOS_COST_REPORT`; both keys optional."""

    usd: NonNegativeFloat | NonNegativeInt = Field(default=0, le=1e12)
    tokens: NonNegativeFloat | NonNegativeInt = Field(default=0, le=1e15)


class CostRecord(StrictModel):
    """cost/<step_id>.json."""

    schema_: Literal["haios/cost_record/v1"] = Field(alias="schema")
    plan_id: Identifier
    step_id: Identifier
    measured: Measured
    reported: Reported
