# SPDX-License-Identifier: Apache-2.0
"""Per-step forwarding bounds (threat T-E04, forwarder exhaustion): exact, thread-safe."""

from __future__ import annotations

import threading

import pytest

from haios.egress.limits import ForwardLimits, StepBudget


def limits(**overrides: float) -> ForwardLimits:
    values: dict[str, float] = {"connections_max": 2, "connections_total_max": 3,
                                "bytes_max": 100, "connect_timeout_seconds": 1.0}
    values.update(overrides)
    return ForwardLimits(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [{"connections_max": 0}, {"connections_total_max": 0},
                                 {"bytes_max": 0}, {"connect_timeout_seconds": 0}])
def test_limits_that_bound_nothing_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="egress limits|timeout"):
        limits(**bad)


def test_concurrency_and_total() -> None:
    budget = StepBudget(limits())
    assert budget.admit() and not budget.at_capacity
    assert budget.admit() and budget.at_capacity
    budget.release()
    assert not budget.at_capacity and not budget.total_reached
    assert budget.admit() and budget.total_reached
    assert budget.admit() is False
    assert budget.connections == 3


def test_bytes_are_granted_up_to_the_limit_and_never_past_it() -> None:
    budget = StepBudget(limits())
    assert budget.take(60) == 60
    assert budget.take(60) == 40
    assert budget.bytes_exhausted
    assert budget.take(1) == 0


def test_byte_limit_holds_under_concurrent_takers() -> None:
    budget = StepBudget(limits(bytes_max=100_000))
    granted: list[int] = []
    lock = threading.Lock()

    def taker() -> None:
        for _ in range(1000):
            got = budget.take(7)
            with lock:
                granted.append(got)

    threads = [threading.Thread(target=taker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 56_000
    many = StepBudget(limits(bytes_max=1000))
    results: list[int] = []

    def greedy() -> None:
        got = many.take(300)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=greedy) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 1000
