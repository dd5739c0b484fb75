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
from haios.sandbox.profile import load_profile
from haios.sandbox.spec import EgressRoute, StepEgress
from tests.support.sandbox import MINIMAL_PROFILE, make_spec, write_profile


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


def test_egress_record_names_the_allowlist_applied(tmp_path: Path) -> None:
    routes = (EgressRoute("vault", "vault.example", "127.200.0.1", 8200, ("192.0.2.10",)),
              EgressRoute("198.51.100.7:5432", None, "198.51.100.7", 5432, ("198.51.100.7",)))
    spec = make_spec(tmp_path, ("/bin/true",), profile="network",
                     egress=StepEgress(routes, channel_fd=99))
    record = confinement_record(spec)
    assert json.loads(json.dumps(record)) == record
    assert record["network"] == "egress"
    assert "network" in record["namespaces"]
    assert record["egress"]["endpoints"] == [
        {"endpoint": "vault", "dial": "vault.example", "listen": "127.200.0.1", "port": 8200,
         "destinations": ["192.0.2.10"]},
        {"endpoint": "198.51.100.7:5432", "dial": "198.51.100.7", "listen": "198.51.100.7",
         "port": 5432, "destinations": ["198.51.100.7"]},
    ]
    assert record["egress"]["limits"]["connections_max"] == 16
    assert record["filesystem"]["hosts"] == ["127.0.0.1 localhost", "127.200.0.1 vault.example"]


def test_network_profile_without_resolved_endpoints_records_none(tmp_path: Path) -> None:
    record = confinement_record(make_spec(tmp_path, ("/bin/true",), profile="network"))
    assert record["network"] == "none"
    assert record["egress"] is None
    assert record["filesystem"]["hosts"] == ["127.0.0.1 localhost"]


def test_unsafe_host_network_record_says_host(tmp_path: Path) -> None:
    text = MINIMAL_PROFILE.replace("egress = []", "unsafe_host_network = true")
    profile = load_profile(write_profile(tmp_path, text), "test")
    record = confinement_record(make_spec(tmp_path, ("/bin/true",), profile=profile))
    assert record["network"] == "host"
    assert "network" not in record["namespaces"]


def test_secret_dir_is_recorded_read_only(tmp_path: Path) -> None:
    record = confinement_record(make_spec(tmp_path, ("/bin/true",), with_secret=True))
    assert record["filesystem"]["secret_dir"] == {"path": "/haios/secret", "access": "read-only"}


def test_record_refuses_a_root_step(tmp_path: Path) -> None:
    spec = dataclasses.replace(make_spec(tmp_path, ("/bin/true",)), uid=0)
    with pytest.raises(SandboxSetupError, match="unprivileged"):
        confinement_record(spec)
