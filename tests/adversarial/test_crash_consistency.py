# SPDX-License-Identifier: Apache-2.0
"""A crash at any instant leaves the previous or the next valid state (T-R04).

A child process publishes signed states with a rising `seq` as fast as it can
through the engine's own writer; the test SIGKILLs it at many different
moments and checks, after every kill, that state.json parses, verifies
against the engine key and never goes backwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from haios._util.safedir import SafeDir
from haios.models.state import RunState
from haios.state.store import read_signed
from tests.support.keys import KeyFile

WRITER = r"""
import sys
from pathlib import Path
from securesystemslib.signer import SSlibKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from haios._util.safedir import SafeDir
from haios.models.state import RunState
from haios.signing import EngineSigner
from haios.state.store import write_signed

root, key, pub = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
public = SSlibKey.from_crypto(load_pem_public_key(pub.read_bytes()))
signer = EngineSigner.load("file2:" + key, public)
directory = SafeDir.open(root)
seq = int(sys.argv[4])
print("ready", flush=True)
while True:
    seq += 1
    state = RunState.model_validate({
        "schema": "haios/state/v1", "plan_id": "crash", "plan_sha256": "a" * 64,
        "status": "running", "steps": {"s": {"attempts": seq, "reason": "x" * (seq % 4096)}},
        "updated": "2026-01-01T00:00:00Z", "seq": seq})
    write_signed(directory, "state.json", state, signer)
"""


def test_state_is_always_old_or_new_under_sigkill(tmp_path: Path) -> None:
    engine = KeyFile(tmp_path / "keys", "engine")
    root = tmp_path / "os_root"
    root.mkdir()
    rng = random.Random(20261123)
    last_seq = 0
    for _trial in range(30):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(engine.private_path),
             str(engine.public_path), str(last_seq)], stdout=subprocess.PIPE)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        with SafeDir.open(root) as directory:
            state = read_signed(directory, "state.json", RunState, engine.public)
        if state is None:  # killed before the first publication
            continue
        assert state.seq >= last_seq, (state.seq, last_seq)
        last_seq = state.seq
        json.loads((root / "state.json").read_text())  # never torn
    assert last_seq > 0
