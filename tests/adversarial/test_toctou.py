# SPDX-License-Identifier: Apache-2.0
"""What a step receives is exactly what was verified (T-I08; catalog cases 48, 54).

Inputs are copied once into the engine's private store and the copy is
hashed; every step gets its own copy from the store. Swapping the inbox
file after verification, or a step editing its own materials, reaches no
other step.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.adversarial.conftest import DATA
from tests.support.world import World, plan, read_json, sh, step


def test_inbox_swapped_after_verification_never_reaches_a_step(tmp_path: Path) -> None:
    world = World(tmp_path / "w")
    root = world.os_root(plan("toctou", [
        step("wait", sh("sleep 2")),
        step("use", sh("sha256sum data.csv | cut -c1-64 > seen.txt"), needs=["wait"],
             materials=["data.csv"], products=["seen.txt"]),
    ], {"data.csv": DATA}), {"data.csv": DATA})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    engine = subprocess.Popen([sys.executable, "-m", "haios", "run", str(root), "--policy",
                               str(world.policy)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = root / "state.json"
        if state.exists() and read_json(state)["steps"]["wait"]["status"] == "running":
            break
        time.sleep(0.02)
    (root / "inbox" / "data.csv").write_bytes(b"evil,evil\n")  # after verification
    _, stderr = engine.communicate(timeout=60)
    assert engine.returncode == 0, stderr
    seen = (root / "artefacts" / "seen.txt").read_text().strip()
    assert seen == hashlib.sha256(DATA).hexdigest()


def test_a_step_editing_its_material_reaches_no_other_step(tmp_path: Path) -> None:
    world = World(tmp_path / "w")
    vandal = ("chmod u+w data.csv 2>/dev/null; echo x >> data.csv 2>/dev/null; "
              "rm -f data.csv; echo evil > data.csv; echo done > v.txt")
    root = world.os_root(plan("private", [
        step("vandal", sh(vandal), materials=["data.csv"], products=["v.txt"]),
        step("reader", sh("sha256sum data.csv | cut -c1-64 > r.txt"), needs=["vandal"],
             materials=["data.csv"], products=["r.txt"]),
    ], {"data.csv": DATA}), {"data.csv": DATA})
    result = world.run(root, "--jobs", "4")
    assert result.code == 0, result.stderr
    assert (root / "artefacts" / "r.txt").read_text().strip() == hashlib.sha256(DATA).hexdigest()
    assert (root / "inbox" / "data.csv").read_bytes() == DATA
