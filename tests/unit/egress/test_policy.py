# SPDX-License-Identifier: Apache-2.0
"""Egress in the operator's policy: profile fields, the Vault rule, metrics.

Threats T-E07 (an ambiguous or widened allowlist) and T-E09 (host
networking by mistake) of threat_model/egress.md, and the contract reading
of ADR 0004: a Vault scope needs a profile whose egress names `vault`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from haios import events
from haios.decide.plan_policy import decide_plan
from haios.errors import PolicyDeniedError, PolicyLoadError
from haios.load.policy import load_policy
from haios.metrics import MetricsRecorder
from haios.models.plan import ExecPlan
from haios.sandbox.profile import lint_profile_result, load_profile
from tests.support.events import event
from tests.support.sandbox import MINIMAL_PROFILE, POLICY_DIR, write_profile
from tests.support.world import World, plan, sh, step


def with_network(text: str) -> str:
    return MINIMAL_PROFILE.replace("egress = []", text)


def test_shipped_network_profile_reaches_vault_only() -> None:
    profile = load_profile(POLICY_DIR, "network")
    assert profile.egress == ("vault",)
    assert profile.unsafe_host_network is False
    limits = profile.egress_limits
    assert (limits.connections_max, limits.connections_total_max, limits.bytes_max,
            limits.connect_timeout_seconds) == (16, 1024, 1 << 30, 10)
    paths = {entry.path for entry in profile.filesystem.read_only}
    assert "/etc/resolv.conf" not in paths and "/etc/hosts" not in paths
    assert load_profile(POLICY_DIR, "default").egress == ()


def test_no_shipped_profile_uses_the_host_network() -> None:
    for path in sorted((POLICY_DIR / "profiles").glob("*.toml")):
        assert load_profile(POLICY_DIR, path.stem).unsafe_host_network is False
        assert "unsafe_host_network = true" not in path.read_text()


def test_egress_and_limits_load(tmp_path: Path) -> None:
    text = with_network('egress = ["vault", "pypi.org:443", "[2001:db8::1]:443"]\n'
                        "[egress_limits]\nconnections_max = 2\nbytes_max = 2048\n")
    profile = load_profile(write_profile(tmp_path, text), "test")
    assert profile.egress == ("vault", "pypi.org:443", "[2001:db8::1]:443")
    assert profile.egress_limits.connections_max == 2
    assert profile.egress_limits.bytes_max == 2048
    assert profile.egress_limits.connections_total_max == 1024


REFUSED = {
    "legacy_network_true": ("network = true", "'network' was replaced by 'egress'"),
    "legacy_network_false": ("network = false", "'network' was replaced by 'egress'"),
    "bad_entry": ('egress = ["*.example.org:443"]', "not a lowercase host name"),
    "duplicate": ('egress = ["pypi.org:443", "pypi.org:443"]', "twice"),
    "same_listener": ('egress = ["localhost:8443", "127.0.0.1:8443"]', "duplicates"),
    "not_a_list": ('egress = "vault"', "egress"),
    "too_many": ("egress = [" + ", ".join(f'"h{n}.example:1"' for n in range(65)) + "]",
                 "egress"),
    "host_and_egress": ('egress = ["vault"]\nunsafe_host_network = true', "cannot be combined"),
    "limit_zero": ('egress = ["vault"]\n[egress_limits]\nconnections_max = 0', "connections_max"),
    "limit_unknown": ('egress = ["vault"]\n[egress_limits]\nudp = true', "udp"),
    "bind_over_hosts": ('egress = []\n[[filesystem.read_only]]\npath = "/etc/hosts"\n'
                        'comment = "The host names."', "built by the sandbox"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_ambiguous_or_unsafe_egress_is_refused(tmp_path: Path, case: str) -> None:
    text, message = REFUSED[case]
    if case == "bind_over_hosts":
        document = MINIMAL_PROFILE.replace("[seccomp]", text.split("\n", 1)[1] + "\n\n[seccomp]")
    else:
        document = with_network(text)
    with pytest.raises(PolicyLoadError, match=message):
        load_profile(write_profile(tmp_path, document), "test")


def test_unsafe_host_network_is_loud_and_needs_af_unix_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = with_network("unsafe_host_network = true")
    with caplog.at_level(logging.WARNING):
        profile = load_profile(write_profile(tmp_path, text), "test")
    assert "UNSAFE" in caplog.text
    assert profile.unsafe_host_network
    allowing_unix = text.replace("[[seccomp.deny]]", (
        '[[seccomp.allow]]\ncomment = "socket for the test: any family."\n'
        'syscalls = ["socket"]\n\n[[seccomp.deny]]'))
    with pytest.raises(PolicyLoadError, match="AF_UNIX"):
        load_profile(write_profile(tmp_path, allowing_unix), "test")
    network = load_profile(POLICY_DIR, "network")
    assert lint_profile_result(network) == ()


def _world_plan(tmp_path: Path, profile: str, extra_profiles: dict[str, str] | None = None,
                ) -> tuple[Any, ExecPlan]:
    world = World(tmp_path / "w", vault_scopes={"reports": {"policies": ["haios-reports-read"]}})
    for name, text in (extra_profiles or {}).items():
        path = world.policy / "profiles" / f"{name}.toml"
        path.write_text(text)
        path.chmod(0o644)
    document = plan("p", [step("s", sh("true"), profile=profile, vault_scope="reports")])
    return load_policy(world.policy), ExecPlan.model_validate(document)


def test_a_vault_scope_needs_vault_in_the_profiles_egress(tmp_path: Path) -> None:
    policy, exec_plan = _world_plan(tmp_path, "network")
    decide_plan(exec_plan, policy)  # the shipped network profile names vault
    policy, exec_plan = _world_plan(tmp_path / "b", "default")
    with pytest.raises(PolicyDeniedError, match="egress includes 'vault'"):
        decide_plan(exec_plan, policy)


def test_other_endpoints_do_not_satisfy_a_vault_scope(tmp_path: Path) -> None:
    other = (POLICY_DIR / "profiles" / "network.toml").read_text().replace(
        'egress = ["vault"]', 'egress = ["pypi.org:443"]')
    host = (POLICY_DIR / "profiles" / "default.toml").read_text().replace(
        "egress = []", "unsafe_host_network = true").replace(
        'args = [{ index = 0, op = "eq", value = "AF_UNIX" }]',
        'args = [{ index = 0, op = "eq", value = "AF_UNSPEC" }]')
    for name in ("pypi", "hostnet"):
        policy, exec_plan = _world_plan(tmp_path / name, name,
                                        {"pypi": other, "hostnet": host})
        with pytest.raises(PolicyDeniedError, match="'vault'"):
            decide_plan(exec_plan, policy)


def test_egress_metrics_count_outcomes_refusals_and_bytes() -> None:
    recorder = MetricsRecorder()

    def publish(kind: str, **fields: object) -> None:
        recorder.on_event(event(kind, **fields))

    def value(name: str, **labels: str) -> float | None:
        return recorder.registry.get_sample_value(name, labels)

    assert value("haios_egress_connections_total", outcome="closed") == 0
    assert value("haios_egress_refusals_total", reason="resolution") == 0
    assert value("haios_egress_bytes_total", direction="in") == 0
    publish(events.EgressConnection.KIND, step_id="s", endpoint="vault", destination="x",
            outcome="closed", bytes_out=10, bytes_in=32, duration_seconds=0.1)
    publish(events.EgressConnection.KIND, step_id="s", endpoint="vault", destination=None,
            outcome="attacker\ntext", bytes_out=0, bytes_in=0, duration_seconds=0.1)
    publish(events.EgressRefused.KIND, step_id="s", endpoint=None, reason="byte_limit", message="m")
    publish(events.EgressRefused.KIND, step_id=None, endpoint="x", reason="weird", message="m")
    publish(events.EgressOpened.KIND, step_id="s", mode="egress", endpoints=[], limits={})
    publish(events.EgressClosed.KIND, step_id="s", connections=2, bytes_out=10, bytes_in=32,
            refusals={})
    assert value("haios_egress_connections_total", outcome="closed") == 1
    assert value("haios_egress_connections_total", outcome="other") == 1
    assert value("haios_egress_bytes_total", direction="out") == 10
    assert value("haios_egress_bytes_total", direction="in") == 32
    assert value("haios_egress_refusals_total", reason="byte_limit") == 1
    assert value("haios_egress_refusals_total", reason="other") == 1
    text = recorder.render().decode()
    for leaked in ('endpoint="vault"', "attacker", "weird", "step_id"):
        assert leaked not in text
