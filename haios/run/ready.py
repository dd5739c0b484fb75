# SPDX-License-Identifier: Apache-2.0
"""Which pending steps may start: every need succeeded, in the plan's order.

Kept incrementally, so a scheduler turn costs the same at the tenth step
and the ten-thousandth: for each step the number of its needs not yet
succeeded, and a heap of the pending steps with none left, keyed by their
place in the plan's topological order. `first` is therefore exactly the
first step of that order that is pending with every need succeeded, the
step a full scan of the order would find. No I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping


class ReadySteps:
    """The pending steps whose needs have all succeeded, first in order first."""

    def __init__(self, order: list[str], graph: Mapping[str, tuple[str, ...]],
                 status: Callable[[str], str]) -> None:
        """Start from the steps' current statuses (a resumed run has some succeeded).

        Args:
            order: every step, in the plan's deterministic topological order.
            graph: each step's needs.
            status: a step's current status ("pending", "succeeded", ...).
        """
        self._status = status
        self._rank = {step_id: rank for rank, step_id in enumerate(order)}
        self._dependents: dict[str, list[str]] = {step_id: [] for step_id in order}
        self._unmet: dict[str, int] = {}
        for step_id in order:
            needs = graph[step_id]
            for need in needs:
                self._dependents[need].append(step_id)
            self._unmet[step_id] = sum(status(need) != "succeeded" for need in needs)
        self._heap = [(self._rank[s], s) for s in order
                      if self._unmet[s] == 0 and status(s) == "pending"]
        heapq.heapify(self._heap)

    def rank(self, step_id: str) -> int:
        """The step's place in the order."""
        return self._rank[step_id]

    def first(self) -> str | None:
        """The first ready step in order, or None; it stays until `started`."""
        # A step that left "pending" some other way (skipped) is dropped here.
        while self._heap and self._status(self._heap[0][1]) != "pending":
            heapq.heappop(self._heap)
        return self._heap[0][1] if self._heap else None

    def started(self, step_id: str) -> None:
        """`step_id`, the current `first`, has started."""
        if not self._heap or self._heap[0][1] != step_id:
            raise ValueError(f"{step_id} is not the first ready step")
        heapq.heappop(self._heap)

    def succeeded(self, step_id: str) -> None:
        """`step_id` succeeded: the steps that needed it may now be ready."""
        for dependent in self._dependents[step_id]:
            self._unmet[dependent] -= 1
            if self._unmet[dependent] == 0 and self._status(dependent) == "pending":
                heapq.heappush(self._heap, (self._rank[dependent], dependent))
