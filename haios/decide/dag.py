# SPDX-License-Identifier: Apache-2.0
"""The step graph: cycle check, transitive needs, deterministic order.

Order is topological with ties broken by step id (contract section 4), so
`--jobs 1` and `--jobs N` start steps in the same priority order. Pure, no
I/O; iterative (no recursion), so a 4,096-step chain cannot overflow.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

Graph = Mapping[str, Sequence[str]]  # step id -> ids it needs


def check_acyclic(graph: Graph) -> None:
    """Raise ValueError naming a step on a cycle, if there is one."""
    order = topological_order(graph)
    if len(order) != len(graph):
        stuck = sorted(set(graph) - set(order))
        raise ValueError(f"dependency cycle through step {stuck[0]!r}")


def topological_order(graph: Graph) -> list[str]:
    """Kahn's algorithm; among ready steps the smallest id goes first.

    Steps on a cycle are left out (the caller compares lengths).
    """
    waiting = {step: len(set(needs)) for step, needs in graph.items()}
    dependents: dict[str, list[str]] = {step: [] for step in graph}
    for step, needs in graph.items():
        for need in set(needs):
            dependents[need].append(step)
    ready = [step for step, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        step = heapq.heappop(ready)
        order.append(step)
        for dependent in dependents[step]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(ready, dependent)
    return order


def transitive_needs(graph: Graph, step: str) -> set[str]:
    """Every step `step` needs, directly or through others."""
    seen: set[str] = set()
    stack = list(graph[step])
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(graph[current])
    return seen


def dependents_closure(graph: Graph, roots: set[str]) -> set[str]:
    """Every step that (transitively) needs one of `roots`."""
    reverse: dict[str, list[str]] = {step: [] for step in graph}
    for step, needs in graph.items():
        for need in needs:
            reverse[need].append(step)
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        for dependent in reverse[stack.pop()]:
            if dependent not in seen:
                seen.add(dependent)
                stack.append(dependent)
    return seen
