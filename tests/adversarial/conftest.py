# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures for adversarial tests: a world and a valid baseline os_root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.world import World, plan, sh, step

DATA = b"a,b\n1,2\n"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "world")


def baseline_plan(**fields: object) -> dict[str, object]:
    return plan("t", [step("s1", sh("cat data.csv > out.txt"), materials=["data.csv"],
                           products=["out.txt"])], {"data.csv": DATA}, **fields)


@pytest.fixture
def baseline(world: World) -> Path:
    return world.os_root(baseline_plan(), {"data.csv": DATA})
