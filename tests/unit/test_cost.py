# SPDX-License-Identifier: Apache-2.0
"""Budget ledger: exhaustion, reservations never exceed the remainder, exact money."""

from __future__ import annotations

from decimal import Decimal

from haios.cost import BudgetLedger
from haios.models.plan import Budget
from haios.models.state import CostTotals


def test_unlimited_budget_never_exhausts() -> None:
    ledger = BudgetLedger(Budget(), CostTotals())
    ledger.settle(ledger.reserve(1), cpu_seconds=1e6, wall_seconds=1e6, usd=1e6, tokens=10**9)
    assert ledger.exhausted() is None


def test_exhausted_when_consumption_reaches_budget() -> None:
    ledger = BudgetLedger(Budget(usd=0.3), CostTotals())
    for _ in range(3):
        ledger.settle(ledger.reserve(1), cpu_seconds=0, wall_seconds=0, usd=0.1, tokens=0)
    # 0.1 + 0.1 + 0.1 == 0.3 exactly as decimals (binary floats give 0.30000000000000004)
    assert ledger.exhausted() == "usd"


def test_concurrent_reservations_never_exceed_remainder() -> None:
    ledger = BudgetLedger(Budget(cpu_seconds=10, wall_seconds=8), CostTotals(cpu_seconds=2.0))
    held = [ledger.reserve(4 - i) for i in range(4)]
    assert sum((r.cpu_seconds or Decimal(0)) for r in held) <= Decimal(8)
    assert sum((r.wall_seconds or Decimal(0)) for r in held) <= Decimal(8)


def test_reservation_bounds_timeout_and_cpu_limit() -> None:
    ledger = BudgetLedger(Budget(cpu_seconds=2.5, wall_seconds=5), CostTotals())
    reservation = ledger.reserve(1)
    assert reservation.cpu_limit_seconds(60) == 3
    assert reservation.timeout_seconds(30) == 5.0
    assert reservation.bounded_by_budget(30)
    assert not reservation.bounded_by_budget(4)


def test_consumed_budget_carries_over_on_resume() -> None:
    ledger = BudgetLedger(Budget(wall_seconds=10), CostTotals(wall_seconds=10.0))
    assert ledger.exhausted() == "wall_seconds"
