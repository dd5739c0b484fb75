# SPDX-License-Identifier: Apache-2.0
"""Deterministic topological order; property checks over random DAGs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from haios.decide.dag import (
    check_acyclic,
    dependents_closure,
    topological_order,
    transitive_needs,
)


@st.composite
def dags(draw: st.DrawFn) -> dict[str, tuple[str, ...]]:
    n = draw(st.integers(1, 25))
    ids = [f"s{i:02d}" for i in range(n)]
    return {
        step: tuple(sorted(set(draw(st.lists(st.sampled_from(ids[:i]), max_size=4)))))
        if i else ()
        for i, step in enumerate(ids)
    }


@given(dags())
@settings(max_examples=200, deadline=None)
def test_order_respects_needs_and_is_deterministic(graph: dict[str, tuple[str, ...]]) -> None:
    order = topological_order(graph)
    assert sorted(order) == sorted(graph)
    position = {step: i for i, step in enumerate(order)}
    for step, needs in graph.items():
        assert all(position[need] < position[step] for need in needs)
    assert topological_order(dict(reversed(list(graph.items())))) == order


def test_ties_are_broken_by_id() -> None:
    assert topological_order({"b": (), "a": (), "c": ("a",)}) == ["a", "b", "c"]


def test_cycle_is_reported() -> None:
    try:
        check_acyclic({"a": ("b",), "b": ("a",), "c": ()})
    except ValueError as exc:
        assert "cycle" in str(exc)
    else:
        raise AssertionError("cycle accepted")


def test_closures() -> None:
    graph = {"a": (), "b": ("a",), "c": ("b",), "d": ()}
    assert transitive_needs(graph, "c") == {"a", "b"}
    assert dependents_closure(graph, {"a"}) == {"b", "c"}
