# SPDX-License-Identifier: Apache-2.0
"""The confinement record that goes into each step's in-toto link.

Threat T-S12 (evidence that overstates the confinement): the record must be
derived from what the child executes and be plain JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from haios.errors import SandboxSetupError
from haios.sandbox import _plan
from haios.sandbox.evidence import confinement_record
from tests.sandbox_helpers import make_spec


def test_record_describes_the_applied_confinement(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, ("/bin/true",), cpu_seconds_limit=7)
    record = confinement_record(spec)
    assert json.loads(json.dumps(record)) == record
    assert record["profile"] == {"name": "default", "digest": {"sha256": spec.profile.digest}}
    assert record["namespaces"] == ["pid", "mount", "ipc", "uts", "cgroup", "network"]
    assert record["network"] == "none"
    assert record["identity"] == {"uid": spec.uid, "gid": spec.gid, "supplementary_groups": []}
    assert record["no_new_privs"] is True
    assert all(value == [] for value in record["capabilities"].values())
    assert record["rlimits"]["cpu_seconds"] == 7
    assert record["rlimits"]["core_bytes"] == 0
    assert record["seccomp"]["default_action"] == "kill_process"
    assert record["seccomp"]["architectures"] == ["x86_64"]
    compiled = _plan.compiled_profile(spec.profile)
    hashes = [item["sha256"] for item in record["seccomp"]["filters"]]
    assert hashes == [compiled.floor.sha256, compiled.program.sha256]
    assert record["filesystem"]["secret_dir"] is None


def test_network_profile_record_says_host_network(tmp_path: Path) -> None:
    record = confinement_record(make_spec(tmp_path, ("/bin/true",), profile="network"))
    assert record["network"] == "host"
    assert "network" not in record["namespaces"]


def test_secret_dir_is_recorded_read_only(tmp_path: Path) -> None:
    record = confinement_record(make_spec(tmp_path, ("/bin/true",), with_secret=True))
    assert record["filesystem"]["secret_dir"] == {"path": "/haios/secret", "access": "read-only"}


def test_record_refuses_a_root_step(tmp_path: Path) -> None:
    spec = dataclasses.replace(make_spec(tmp_path, ("/bin/true",)), uid=0)
    with pytest.raises(SandboxSetupError, match="unprivileged"):
        confinement_record(spec)
