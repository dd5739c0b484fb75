# SPDX-License-Identifier: Apache-2.0
"""ReadySteps agrees with a full scan of the order, turn after turn."""

from __future__ import annotations

import random

import pytest

from haios.decide.dag import topological_order
from haios.run.ready import ReadySteps


def _scan(order: list[str], graph: dict[str, tuple[str, ...]],
          status: dict[str, str]) -> str | None:
    """What the scheduler used to compute every turn: the first ready step in order."""
    for step_id in order:
        if status[step_id] == "pending" and all(status[n] == "succeeded" for n in graph[step_id]):
            return step_id
    return None


def _random_plan(rng: random.Random, size: int) -> dict[str, tuple[str, ...]]:
    ids = [f"s{i:03d}" for i in range(size)]
    return {sid: tuple(sorted(rng.sample(ids[:i], k=min(i, rng.randint(0, 3)))))
            for i, sid in enumerate(ids)}


@pytest.mark.parametrize("seed", range(40))
def test_first_is_always_the_first_ready_step_of_a_full_scan(seed: int) -> None:
    rng = random.Random(seed)
    graph = _random_plan(rng, rng.randint(1, 40))
    order = topological_order(graph)
    # A resumed run: some steps already succeeded.
    status = {sid: "pending" for sid in order}
    for sid in order:
        if rng.random() < 0.3 and all(status[n] == "succeeded" for n in graph[sid]):
            status[sid] = "succeeded"
    ready = ReadySteps(order, graph, status.__getitem__)
    running: list[str] = []
    while True:
        assert ready.first() == _scan(order, graph, status)
        step_id = ready.first()
        if step_id is not None and (not running or (len(running) < 3 and rng.random() < 0.6)):
            status[step_id] = "running"
            ready.started(step_id)
            running.append(step_id)
            continue
        if not running:
            break
        done = running.pop(rng.randrange(len(running)))
        status[done] = "succeeded" if rng.random() < 0.9 else "failed"
        if status[done] == "succeeded":
            ready.succeeded(done)
    assert _scan(order, graph, status) is None


def test_a_step_skipped_meanwhile_is_not_offered() -> None:
    graph: dict[str, tuple[str, ...]] = {"a": (), "b": ()}
    status = {"a": "pending", "b": "pending"}
    ready = ReadySteps(["a", "b"], graph, status.__getitem__)
    status["a"] = "skipped"
    assert ready.first() == "b"


def test_only_the_first_ready_step_can_be_started() -> None:
    status = {"a": "pending", "b": "pending"}
    ready = ReadySteps(["a", "b"], {"a": (), "b": ()}, status.__getitem__)
    with pytest.raises(ValueError, match="not the first ready step"):
        ready.started("b")
