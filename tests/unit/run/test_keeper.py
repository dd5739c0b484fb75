# SPDX-License-Identifier: Apache-2.0
"""The state keeper's assembled bytes equal the plain encoding, and verify."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from haios._util.strict_json import dump_json
from haios.load.policy import load_policy
from haios.models.state import RunState
from haios.osroot import OsRoot
from haios.run.keeper import StateKeeper
from haios.signing import EngineSigner
from haios.verify.embedded import verify_embedded
from tests.support.world import World, plan, sh, step

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def keeper(tmp_path: Path) -> StateKeeper:
    world = World(tmp_path / "world")
    steps = [step(f"s{i:03d}", sh("true"), needs=[f"s{i - 1:03d}"] if i else [])
             for i in (5, 3, 0, 1, 2, 4, 10)]
    for entry in steps:  # a chain in a shuffled declaration order
        entry["needs"] = [n for n in entry["needs"] if n in {s["id"] for s in steps}]
    document = plan("keeper", steps)
    root = world.os_root(document)
    policy = load_policy(world.policy)
    signer = EngineSigner.load(policy.file.engine.signing_key, policy.engine_key)
    from haios.models.plan import ExecPlan

    parsed = ExecPlan.model_validate(document)
    return StateKeeper(OsRoot(root), signer, parsed, "ab" * 32, None,
                       audit_head=lambda: {"sha256": "cd" * 32, "records": 7},
                       written=lambda: None, clock=lambda: NOW)


def _plain(keeper: StateKeeper, written: dict[str, Any]) -> bytes:
    body = {key: value for key, value in written.items() if key != "signatures"}
    return dump_json({**body, "signatures": written["signatures"]})


def test_assembled_state_bytes_equal_the_plain_encoding_at_every_commit(
        keeper: StateKeeper) -> None:
    path = Path(keeper.osr.path) / "state.json"
    key = keeper.signer.public_key
    for turn, step_id in enumerate(["s000", "s001", "s002", "s003"]):
        record = keeper.steps[step_id]
        record.start("2026-12-02T12:00:00Z")
        if turn % 2 == 0:  # a change that leaves other entries cached
            keeper.steps["s010"].add_accessor(f"accessor-{turn}")
        written = keeper.commit()
        data = path.read_bytes()
        assert data == _plain(keeper, written)
        reread = json.loads(data)
        verify_embedded(reread, key, label="state.json")
        assert RunState.model_validate(reread).steps[step_id].status == "running"
        record.end("succeeded", exit_code=0, reason=None, started="2026-12-02T12:00:00Z",
                   finished="2026-12-02T12:00:01Z", products={})
    keeper.reason = 'a reason quoting "steps":{} from hostile input'
    written = keeper.commit()
    data = path.read_bytes()
    assert data == _plain(keeper, written)
    verify_embedded(json.loads(data), key, label="state.json")
    assert json.loads(data)["reason"] == keeper.reason
