# SPDX-License-Identifier: Apache-2.0
"""`--jobs 1` and `--jobs 4` give the same results over random DAGs (contract section 4).

Plans here succeed: when a step fails, steps already running in parallel
finish and are recorded, so which independent steps ran can differ with
concurrency (ADR 0002, item 11); everything they produce is still identical.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.world import World, plan, read_json, sh, step


@st.composite
def random_plans(draw: st.DrawFn) -> dict[str, object]:
    count = draw(st.integers(2, 6))
    steps = []
    for index in range(count):
        needs = sorted(set(draw(st.lists(st.integers(0, index - 1), max_size=3)))) if index else []
        materials = [f"p{n}.txt" for n in needs]
        script = " ".join(["cat", *materials, "/dev/null", ">", f"p{index}.txt;",
                           f"echo s{index} >> p{index}.txt"])
        steps.append(step(f"s{index}", sh(script), needs=[f"s{n}" for n in needs],
                          materials=materials, products=[f"p{index}.txt"]))
    return plan("jobs", steps)


def _outcome(root: Path) -> dict[str, object]:
    state = read_json(root / "state.json")
    files = {}
    for sub in ("artefacts", "links"):
        for path in sorted((root / sub).glob("*")):
            files[f"{sub}/{path.name}"] = path.read_bytes()
    return {"status": state["status"],
            "steps": {k: (v["status"], v["exit_code"], v["products"])
                      for k, v in state["steps"].items()},
            "registry": read_json(root / "registry_map.json")["artefacts"],
            "files": files}


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=random_plans())
def test_jobs_1_and_4_agree(document: dict[str, object]) -> None:
    base = Path(__import__("tempfile").mkdtemp(prefix="haios-jobs-"))
    try:
        world = World(base / "world")
        outcomes = []
        for jobs in ("1", "4"):
            root = world.os_root(document, name=f"root-{jobs}")
            result = world.run(root, "--jobs", jobs)
            assert result.code == 0, result.stderr
            outcomes.append((result.code, _outcome(root)))
        assert outcomes[0] == outcomes[1]
    finally:
        shutil.rmtree(base, ignore_errors=True)
