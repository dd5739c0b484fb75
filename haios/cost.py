# SPDX-License-Identifier: Apache-2.0
"""Budget accounting and reservations (contract section 8). Pure, no I/O.

Rules, in one place:

- A dimension (cpu_seconds, wall_seconds, usd, tokens) with no budget is
  unlimited. It is exhausted when what was consumed reaches the budget.
- Before a step starts the engine reserves a share of what remains and is
  not already reserved by running steps: `unreserved / free_slots`, where
  `free_slots` is the number of steps that may still start concurrently. So
  with `--jobs N` the running steps together never hold more than remains.
- The step's CPU limit and wall timeout are bounded by its reservation. CPU
  limits are whole seconds (RLIMIT_CPU), rounded up: a step may overshoot
  its reservation by less than one CPU-second, which is documented.
- `usd` and `tokens` are reported by the step after it ends; they cannot cut
  a step short. When they reach the budget, no further step starts.
- Money is compared as an exact decimal (`Decimal(repr(value))`), never as a
  binary float sum.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from decimal import Decimal
from typing import Final

from haios.models.plan import Budget
from haios.models.state import CostTotals

UNITS: Final = ("cpu_seconds", "wall_seconds", "usd", "tokens")


def _dec(value: float | int) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


@dataclasses.dataclass(frozen=True)
class Reservation:
    """The budget share held by one running step (None: unlimited)."""

    cpu_seconds: Decimal | None
    wall_seconds: Decimal | None

    def cpu_limit_seconds(self, profile_limit: int | None) -> int | None:
        """Whole-second RLIMIT_CPU: the smaller of the profile's and the reservation."""
        limits = [profile_limit] if profile_limit is not None else []
        if self.cpu_seconds is not None:
            limits.append(max(1, math.ceil(self.cpu_seconds)))
        return min(limits) if limits else None

    def timeout_seconds(self, step_timeout: int) -> float:
        """The wall timeout: the step's own, bounded by the reservation."""
        if self.wall_seconds is None:
            return float(step_timeout)
        return float(min(Decimal(step_timeout), self.wall_seconds))

    def bounded_by_budget(self, step_timeout: int) -> bool:
        """True when the reservation, not the step, sets the wall timeout."""
        return self.wall_seconds is not None and self.wall_seconds < step_timeout


class BudgetLedger:
    """Consumption and reservations of one run. Thread-safe."""

    def __init__(self, budget: Budget, consumed: CostTotals) -> None:
        self._limits = {unit: getattr(budget, unit) for unit in UNITS}
        self._consumed = {unit: _dec(getattr(consumed, unit)) for unit in UNITS}
        self._reserved = {"cpu_seconds": Decimal(0), "wall_seconds": Decimal(0)}
        self._lock = threading.Lock()

    def exhausted(self) -> str | None:
        """The first exhausted dimension, or None."""
        with self._lock:
            return self._exhausted_locked()

    def _exhausted_locked(self) -> str | None:
        for unit in UNITS:
            limit = self._limits[unit]
            if limit is not None and self._consumed[unit] >= _dec(limit):
                return unit
        return None

    def reserve(self, free_slots: int) -> Reservation:
        """Reserve a share of the unreserved remainder for one step."""
        slots = Decimal(max(1, free_slots))
        with self._lock:
            shares: dict[str, Decimal | None] = {}
            for unit in ("cpu_seconds", "wall_seconds"):
                limit = self._limits[unit]
                if limit is None:
                    shares[unit] = None
                    continue
                left = _dec(limit) - self._consumed[unit] - self._reserved[unit]
                shares[unit] = max(Decimal(0), left) / slots
                self._reserved[unit] += shares[unit] or Decimal(0)
            return Reservation(shares["cpu_seconds"], shares["wall_seconds"])

    def settle(self, reservation: Reservation, *, cpu_seconds: float, wall_seconds: float,
               usd: float | int, tokens: float | int) -> None:
        """Release a reservation and add what the step actually consumed."""
        with self._lock:
            for unit, held in (("cpu_seconds", reservation.cpu_seconds),
                               ("wall_seconds", reservation.wall_seconds)):
                if held is not None:
                    self._reserved[unit] -= held
            self._consumed["cpu_seconds"] += _dec(cpu_seconds)
            self._consumed["wall_seconds"] += _dec(wall_seconds)
            self._consumed["usd"] += _dec(usd)
            self._consumed["tokens"] += _dec(tokens)

    def totals(self) -> CostTotals:
        """Consumption so far, as the state records it."""
        with self._lock:
            tokens = self._consumed["tokens"]
            return CostTotals(
                cpu_seconds=float(self._consumed["cpu_seconds"]),
                wall_seconds=float(self._consumed["wall_seconds"]),
                usd=float(self._consumed["usd"]),
                tokens=int(tokens) if tokens == tokens.to_integral_value() else float(tokens),
            )

    def remaining(self) -> dict[str, float | None]:
        """Remaining budget per unit (None when unlimited), never negative."""
        with self._lock:
            return {
                unit: None if self._limits[unit] is None
                else float(max(Decimal(0), _dec(self._limits[unit]) - self._consumed[unit]))
                for unit in UNITS
            }
