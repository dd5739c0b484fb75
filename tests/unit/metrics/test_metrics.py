# SPDX-License-Identifier: Apache-2.0
"""Unit tests of haios.metrics: the contract's metric set, events, serving, files."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from haios import errors, events
from haios.errors import EnvironmentUnavailableError, InternalError, PathError
from tests.support.events import event

if TYPE_CHECKING:
    from collections.abc import Iterator

from haios.metrics import (
    METRICS_FILE_NAME,
    PROFILE_LABELS_MAX,
    REJECTION_REASONS,
    MetricsRecorder,
    is_loopback_host,
    parse_metrics_addr,
)
from haios.metrics import server as metrics_server
from haios.metrics.server import _QuietHandler

REPO = Path(__file__).resolve().parents[3]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "haios.json"

# Copied from the table in contract section 10, with the rows ADR 0004
# (docs/adr/0004-egress.md) adds; change it only with the contract.
CONTRACT_TABLE = """
| `haios_build_info` | gauge (1) | `version`, `contract` |
| `haios_plan_runs_total` | counter | `outcome` (a plan status) |
| `haios_steps_total` | counter | `outcome` (a step status) |
| `haios_steps_running` | gauge | |
| `haios_step_duration_seconds` | histogram | `profile` |
| `haios_verifications_total` | counter | `kind` (`plan`, `artefact`, `link`, `digest`), `result` (`ok`, `fail`) |
| `haios_rejections_total` | counter | `reason` |
| `haios_kill_switch_engaged` | gauge (0/1) | |
| `haios_kills_total` | counter | `scope` (`global`, `step`, `engine_lost`) |
| `haios_kill_latency_seconds` | histogram | |
| `haios_vault_tokens_issued_total` | counter | |
| `haios_vault_tokens_revoked_total` | counter | |
| `haios_cost_total` | counter | `unit` (`cpu_seconds`, `wall_seconds`, `usd`, `tokens`) |
| `haios_budget_remaining` | gauge | `unit` |
| `haios_sandbox_violations_total` | counter | `kind` |
| `haios_egress_connections_total` | counter | `outcome` |
| `haios_egress_refusals_total` | counter | `reason` |
| `haios_egress_bytes_total` | counter | `direction` (`out`, `in`) |
"""  # noqa: E501 - a verbatim copy

# The label values the contract enumerates (sections 6 and 10).
PLAN_STATUSES = {
    "pending",
    "running",
    "succeeded",
    "failed",
    "killed",
    "budget_exhausted",
    "rejected",
}
STEP_STATUSES = {"pending", "running", "succeeded", "failed", "timed_out", "killed", "skipped"}
UNITS = {"cpu_seconds", "wall_seconds", "usd", "tokens"}
ENUMERATED = {
    ("haios_plan_runs_total", "outcome"): PLAN_STATUSES,
    ("haios_steps_total", "outcome"): STEP_STATUSES,
    ("haios_verifications_total", "kind"): {"plan", "artefact", "link", "digest"},
    ("haios_verifications_total", "result"): {"ok", "fail"},
    ("haios_kills_total", "scope"): {"global", "step", "engine_lost"},
    ("haios_cost_total", "unit"): UNITS,
    ("haios_budget_remaining", "unit"): UNITS,
}


def contract_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Name -> (type, label names), parsed from the copied table."""
    table: dict[str, tuple[str, frozenset[str]]] = {}
    for row in CONTRACT_TABLE.strip().splitlines():
        name, kind, labels = (cell.strip() for cell in row.strip("|").split("|"))
        label_names = re.findall(r"`(\w+)`(?:\s*\([^)]*\))?", labels)
        table[name.strip("`")] = (kind.split()[0], frozenset(label_names))
    return table


CONTRACT = contract_metrics()
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def families_by_contract_name(text: str) -> dict[str, Any]:
    """Parsed families keyed by contract name (a counter family drops `_total`)."""
    families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        families[name] = family
    return families


def value(recorder: MetricsRecorder, name: str, **labels: str) -> float | None:
    return recorder.registry.get_sample_value(name, labels)


@pytest.fixture
def recorder() -> MetricsRecorder:
    return MetricsRecorder()


@pytest.fixture
def dir_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def publish(recorder: MetricsRecorder, event_kind: str, /, **fields: object) -> None:
    recorder.on_event(event(event_kind, **fields))


# -- the contract's metric set ----------------------------------------------------


def test_contract_table_copy_is_complete() -> None:
    assert len(CONTRACT) == 18
    assert CONTRACT["haios_verifications_total"] == ("counter", frozenset({"kind", "result"}))


def test_registry_matches_the_contract_table(recorder: MetricsRecorder) -> None:
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for metric in recorder.registry.collect():
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        label_names = {
            label
            for sample in metric.samples
            if not sample.name.endswith("_created")
            for label in sample.labels
            if label != "le"
        }
        found[name] = (metric.type, frozenset(label_names))
    assert found == CONTRACT


def test_text_exposition_has_every_family_with_samples(recorder: MetricsRecorder) -> None:
    families = families_by_contract_name(recorder.render().decode())
    extra = {name for name in families if name not in CONTRACT}
    # prometheus_client exposes counters' and histograms' `_created` as their own gauges.
    assert all(name.endswith("_created") for name in extra), extra
    for name, (kind, labels) in CONTRACT.items():
        family = families[name]
        assert family.type == kind, name
        assert family.samples, f"{name} has no samples"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, sample
            for label, label_value in sample.labels.items():
                allowed = ENUMERATED.get((name, label))
                assert allowed is None or label_value in allowed, sample


def test_enumerated_label_values_are_all_preinitialised(recorder: MetricsRecorder) -> None:
    families = families_by_contract_name(recorder.render().decode())
    for (name, label), allowed in ENUMERATED.items():
        seen = {s.labels[label] for s in families[name].samples if not s.name.endswith("_created")}
        assert seen == allowed, name


def test_build_info(recorder: MetricsRecorder) -> None:
    assert value(recorder, "haios_build_info", version="1.0.0", contract="1") == 1


def test_every_error_reason_is_an_allowed_rejection_reason() -> None:
    def subclasses(cls: type[errors.HaiosError]) -> Iterator[type[errors.HaiosError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    reasons = {cls.reason for cls in subclasses(errors.HaiosError)}
    assert reasons <= set(REJECTION_REASONS)
    assert len(REJECTION_REASONS) == len(set(REJECTION_REASONS))


# -- events -> metrics --------------------------------------------------------------


def test_verifications(recorder: MetricsRecorder) -> None:
    publish(recorder, events.Verification.KIND, kind="plan", result="ok", subject="exec_plan.json")
    publish(recorder, events.Verification.KIND, kind="link", result="fail", subject="links/a.link")
    assert value(recorder, "haios_verifications_total", kind="plan", result="ok") == 1
    assert value(recorder, "haios_verifications_total", kind="link", result="fail") == 1
    assert value(recorder, "haios_verifications_total", kind="link", result="ok") == 0


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("signature", "signature"),
        ("tampered", "tampered"),
        ("made-up", "other"),
        ('x"} 1\nhaios_injected 1', "other"),
        (None, "other"),
        (42, "other"),
    ],
)
def test_rejections_use_the_fixed_reason_list(
    recorder: MetricsRecorder, reason: object, label: str
) -> None:
    publish(recorder, events.Rejection.KIND, reason=reason, message="/etc/secret path in text")
    assert value(recorder, "haios_rejections_total", reason=label) == 1
    assert b"haios_injected" not in recorder.render()


def test_step_lifecycle(recorder: MetricsRecorder) -> None:
    publish(recorder, events.StepStarted.KIND, step_id="a", profile="default", attempt=1)
    publish(recorder, events.StepStarted.KIND, step_id="b", profile="network", attempt=1)
    publish(recorder, events.StepStarted.KIND, step_id="b", profile="network", attempt=1)
    assert value(recorder, "haios_steps_running") == 2
    publish(
        recorder,
        events.StepFinished.KIND,
        step_id="a",
        status="succeeded",
        exit_code=0,
        profile="default",
        wall_seconds=0.3,
        reason=None,
    )
    assert value(recorder, "haios_steps_running") == 1
    assert value(recorder, "haios_steps_total", outcome="succeeded") == 1
    assert value(recorder, "haios_step_duration_seconds_count", profile="default") == 1
    assert value(recorder, "haios_step_duration_seconds_sum", profile="default") == 0.3
    assert value(recorder, "haios_step_duration_seconds_bucket", profile="default", le="0.5") == 1


def test_skipped_step_counts_without_duration_or_running_change(
    recorder: MetricsRecorder,
) -> None:
    publish(
        recorder,
        events.StepFinished.KIND,
        step_id="never",
        status="skipped",
        exit_code=None,
        profile="default",
        wall_seconds=None,
        reason="dependency failed",
    )
    assert value(recorder, "haios_steps_total", outcome="skipped") == 1
    assert value(recorder, "haios_steps_running") == 0
    assert value(recorder, "haios_step_duration_seconds_count", profile="default") == 0


def test_profile_labels_are_names_and_capped(recorder: MetricsRecorder) -> None:
    profiles = ["/etc/haios/policy/profiles/x.toml", "Bad Name", None] + [
        f"p{n}" for n in range(PROFILE_LABELS_MAX + 5)
    ]
    for profile in profiles:
        publish(
            recorder,
            events.StepFinished.KIND,
            step_id="s",
            status="failed",
            exit_code=1,
            profile=profile,
            wall_seconds=1.0,
            reason="exit",
        )
    families = families_by_contract_name(recorder.render().decode())
    seen = {s.labels["profile"] for s in families["haios_step_duration_seconds"].samples}
    assert "other" in seen
    assert len(seen) <= PROFILE_LABELS_MAX + 1
    assert not any("/" in label or " " in label for label in seen)


def test_sandbox_violations(recorder: MetricsRecorder) -> None:
    publish(recorder, events.SandboxViolation.KIND, step_id="s", kind="seccomp")
    publish(recorder, events.SandboxViolation.KIND, step_id="s", kind="ptrace attempt on pid 7")
    assert value(recorder, "haios_sandbox_violations_total", kind="seccomp") == 1
    assert value(recorder, "haios_sandbox_violations_total", kind="other") == 1


def test_cost_totals_per_unit(recorder: MetricsRecorder) -> None:
    for _ in range(2):
        publish(
            recorder,
            events.CostRecorded.KIND,
            step_id="s",
            cpu_seconds=0.25,
            wall_seconds=1.5,
            usd=Decimal("0.10"),
            tokens=7,
        )
    assert value(recorder, "haios_cost_total", unit="cpu_seconds") == 0.5
    assert value(recorder, "haios_cost_total", unit="wall_seconds") == 3.0
    assert value(recorder, "haios_cost_total", unit="usd") == pytest.approx(0.2)
    assert value(recorder, "haios_cost_total", unit="tokens") == 14


def test_budget_remaining(recorder: MetricsRecorder) -> None:
    assert value(recorder, "haios_budget_remaining", unit="usd") == math.inf
    publish(recorder, events.BudgetRemaining.KIND, unit="usd", value=Decimal("1.25"))
    publish(recorder, events.BudgetRemaining.KIND, unit="tokens", value=0)
    publish(recorder, events.BudgetRemaining.KIND, unit="cpu_seconds", value=None)
    assert value(recorder, "haios_budget_remaining", unit="usd") == 1.25
    assert value(recorder, "haios_budget_remaining", unit="tokens") == 0
    assert value(recorder, "haios_budget_remaining", unit="cpu_seconds") == math.inf


def test_kill_switch_and_kills(recorder: MetricsRecorder) -> None:
    publish(recorder, events.KillSwitch.KIND, engaged=True, flag="control/KILL")
    assert value(recorder, "haios_kill_switch_engaged") == 1
    publish(
        recorder,
        events.Kill.KIND,
        scope="global",
        flag="control/KILL",
        step_id="s",
        latency_seconds=0.004,
    )
    publish(
        recorder, events.Kill.KIND, scope="engine_lost", flag="engine_lost", step_id="t",
        latency_seconds=None,
    )
    publish(recorder, events.KillSwitch.KIND, engaged=False, flag="control/KILL")
    assert value(recorder, "haios_kill_switch_engaged") == 0
    assert value(recorder, "haios_kills_total", scope="global") == 1
    assert value(recorder, "haios_kills_total", scope="engine_lost") == 1
    assert value(recorder, "haios_kill_latency_seconds_count") == 1
    assert value(recorder, "haios_kill_latency_seconds_bucket", le="0.005") == 1
    assert value(recorder, "haios_kill_latency_seconds_bucket", le="0.0025") == 0


def test_vault_tokens(recorder: MetricsRecorder) -> None:
    publish(recorder, events.VaultTokenIssued.KIND, step_id="s", accessor="acc-123", ttl_seconds=60)
    publish(recorder, events.VaultTokenIssued.KIND, step_id="t", accessor="acc-456", ttl_seconds=60)
    publish(recorder, events.VaultTokenRevoked.KIND, step_id="s", accessor="acc-123")
    publish(recorder, events.VaultRevokeFailed.KIND, step_id="t", accessor="acc-456", message="503")
    assert value(recorder, "haios_vault_tokens_issued_total") == 2
    assert value(recorder, "haios_vault_tokens_revoked_total") == 1
    assert b"acc-" not in recorder.render()


def test_run_finished(recorder: MetricsRecorder) -> None:
    publish(recorder, events.RunFinished.KIND, status="budget_exhausted", reason="usd")
    assert value(recorder, "haios_plan_runs_total", outcome="budget_exhausted") == 1


def test_kinds_without_metrics_and_unknown_kinds_are_ignored(recorder: MetricsRecorder) -> None:
    before = recorder.render()
    publish(recorder, events.RunStarted.KIND, plan_id="p", plan_sha256="0" * 64, jobs=1)
    publish(recorder, events.BudgetHalt.KIND, reason="budget exhausted: usd")
    publish(recorder, events.ProductRecorded.KIND, step_id="s", name="a", sha256="0", size=1)
    publish(recorder, "from.the.future")
    after = recorder.render()
    strip = re.compile(rb"^haios_\w+_created.*$", re.MULTILINE)
    assert strip.sub(b"", before) == strip.sub(b"", after)


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (events.Verification.KIND, {"kind": "plan", "result": "maybe"}),
        (events.Verification.KIND, {"kind": "exec_plan.json", "result": "ok"}),
        (events.StepFinished.KIND, {"step_id": "s", "status": "exploded", "wall_seconds": 1}),
        (events.StepFinished.KIND, {"step_id": "s", "status": "failed", "wall_seconds": -1}),
        (events.StepFinished.KIND, {"step_id": "s", "status": "failed", "wall_seconds": "1"}),
        (events.Kill.KIND, {"scope": "galaxy"}),
        (events.Kill.KIND, {"scope": "step", "latency_seconds": math.nan}),
        (events.CostRecorded.KIND, {"usd": -1}),
        (events.CostRecorded.KIND, {"tokens": True}),
        (events.CostRecorded.KIND, {"cpu_seconds": math.inf}),
        (events.BudgetRemaining.KIND, {"unit": "euros", "value": 1}),
        (events.BudgetRemaining.KIND, {"unit": "usd", "value": math.nan}),
        (events.KillSwitch.KIND, {"engaged": "yes"}),
        (events.RunFinished.KIND, {"status": "done"}),
    ],
)
def test_values_outside_the_contract_are_publisher_bugs(
    recorder: MetricsRecorder, kind: str, fields: dict[str, Any]
) -> None:
    with pytest.raises(InternalError):
        publish(recorder, kind, **fields)


def test_no_label_carries_a_step_id_plan_id_or_path(recorder: MetricsRecorder) -> None:
    step_id, plan_id, root = "step-zz9", "plan-qq7", "/srv/os_root_abc"
    publish(recorder, events.RunStarted.KIND, plan_id=plan_id, plan_sha256="0" * 64, jobs=1)
    publish(
        recorder,
        events.Verification.KIND,
        kind="artefact",
        result="fail",
        subject=f"{root}/inbox/{step_id}",
    )
    publish(recorder, events.Rejection.KIND, reason=f"{root}/exec_plan.json", message=step_id)
    publish(
        recorder, events.StepStarted.KIND, step_id=step_id, profile=step_id.upper(), attempt=1
    )
    publish(recorder, events.SandboxViolation.KIND, step_id=step_id, kind=f"{root}/x")
    publish(
        recorder,
        events.StepFinished.KIND,
        step_id=step_id,
        status="killed",
        exit_code=None,
        profile=f"{root}/profiles/p",
        wall_seconds=2.0,
        reason=step_id,
    )
    publish(
        recorder,
        events.Kill.KIND,
        scope="step",
        flag=f"{root}/control/KILL.{step_id}",
        step_id=step_id,
        latency_seconds=0.01,
    )
    publish(recorder, events.RunFinished.KIND, status="killed", reason=plan_id)
    for family in text_string_to_metric_families(recorder.render().decode()):
        for sample in family.samples:
            for label_value in sample.labels.values():
                for forbidden in (step_id, plan_id, root, "/"):
                    assert forbidden not in label_value, sample


# -- serving --------------------------------------------------------------------------


def test_serve_is_scraped_over_http(recorder: MetricsRecorder) -> None:
    server = recorder.serve("127.0.0.1", 0)
    try:
        host, port = server.address
        assert host == "127.0.0.1"
        publish(recorder, events.RunFinished.KIND, status="succeeded", reason=None)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            text = response.read().decode()
    finally:
        server.close()
    families = families_by_contract_name(text)
    assert set(CONTRACT) <= set(families)
    assert any(
        s == Sample("haios_plan_runs_total", {"outcome": "succeeded"}, 1.0)
        for s in families["haios_plan_runs_total"].samples
    )
    with pytest.raises(OSError, match="refused"):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_serve_refuses_a_port_in_use(recorder: MetricsRecorder) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(EnvironmentUnavailableError, match="cannot serve metrics"):
            recorder.serve("127.0.0.1", taken.getsockname()[1])


def test_idle_scrape_clients_are_dropped(
    recorder: MetricsRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_QuietHandler, "timeout", 0.2)
    server = recorder.serve("127.0.0.1", 0)
    try:
        with socket.create_connection(server.address, timeout=5) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""  # the server closed the silent connection
            assert time.monotonic() - started < 4
        with urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}/", timeout=5) as r:
            assert r.status == 200
    finally:
        server.close()


def test_clients_past_the_cap_are_hung_up_on(
    recorder: MetricsRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_server, "SCRAPE_CLIENTS_MAX", 3)
    monkeypatch.setattr(_QuietHandler, "timeout", 30.0)
    server = recorder.serve("127.0.0.1", 0)
    try:
        held = [socket.create_connection(server.address, timeout=5) for _ in range(3)]
        with socket.create_connection(server.address, timeout=5) as extra:
            assert extra.recv(1) == b""  # closed at once, not after the 30 s timeout
        for connection in held:
            connection.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{server.address[1]}/", timeout=5
                ) as r:
                    assert r.status == 200
                    break
            except OSError:
                # slots free up as the server notices the held clients left
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        server.close()


# -- metrics.prom -----------------------------------------------------------------------


def test_write_textfile_writes_parseable_private_file(
    recorder: MetricsRecorder, dir_fd: int, tmp_path: Path
) -> None:
    (tmp_path / METRICS_FILE_NAME).write_text("old")
    publish(recorder, events.RunFinished.KIND, status="failed", reason="step_failed")
    recorder.write_textfile(dir_fd)
    path = tmp_path / METRICS_FILE_NAME
    assert path.read_bytes() == recorder.render()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    families = families_by_contract_name(path.read_text())
    assert set(CONTRACT) <= set(families)
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE_NAME]


def test_write_textfile_refuses_a_symlink_and_leaves_its_target(
    recorder: MetricsRecorder, dir_fd: int, tmp_path: Path
) -> None:
    target = tmp_path.parent / f"{tmp_path.name}-target"
    target.write_text("precious")
    (tmp_path / METRICS_FILE_NAME).symlink_to(target)
    with pytest.raises(PathError):
        recorder.write_textfile(dir_fd)
    assert target.read_text() == "precious"
    assert (tmp_path / METRICS_FILE_NAME).is_symlink()
    target.unlink()


@pytest.mark.parametrize("planted", ["fifo", "directory", "hardlink"])
def test_write_textfile_refuses_planted_files(
    recorder: MetricsRecorder, dir_fd: int, tmp_path: Path, planted: str
) -> None:
    path = tmp_path / METRICS_FILE_NAME
    if planted == "fifo":
        os.mkfifo(path)
    elif planted == "directory":
        path.mkdir()
    else:
        (tmp_path / "other").write_text("x")
        os.link(tmp_path / "other", path)
    with pytest.raises(PathError):
        recorder.write_textfile(dir_fd)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["", ".", "..", "sub/metrics.prom", "a\0b"])
def test_write_textfile_refuses_names_that_are_not_one_component(
    recorder: MetricsRecorder, dir_fd: int, name: str
) -> None:
    with pytest.raises(PathError, match="plain file name"):
        recorder.write_textfile(dir_fd, name)


def test_failed_rename_leaves_no_temporary_file(
    recorder: MetricsRecorder, dir_fd: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_rename(*_args: object, **_kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(EnvironmentUnavailableError, match="cannot rename"):
        recorder.write_textfile(dir_fd)
    assert list(tmp_path.iterdir()) == []


# -- --metrics-addr ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[2001:db8::1]:80", ("2001:db8::1", 80)),
        ("localhost:9100", ("localhost", 9100)),
    ],
)
def test_parse_metrics_addr_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_addr(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("999.1.1.1:9100", "HOST must be"),
        ("127.0.0.1:x", "PORT must be"),
        ("127.0.0.1:0", "PORT must be"),
        ("127.0.0.1:65536", "PORT must be"),
        ("127.0.0.1:09100", "PORT must be"),
        ("127.0.0.1:+80", "PORT must be"),
        ("127.0.0.1: 80", "PORT must be"),
        ("127.0.0.1:", "PORT must be"),
        ("127.0.0.1", "expected HOST:PORT"),
        (":9100", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        ("::1:9100", "brackets"),
        ("[::1]", "brackets"),
        ("[127.0.0.1]:80", "HOST must be"),
        ("[fe80::1%eth0]:80", "HOST must be"),
        ("example.com:80", "HOST must be"),
        ("127.000.0.1:80", "HOST must be"),
        ("LOCALHOST:80", "HOST must be"),
        ("١٢٧.0.0.1:80", "HOST must be"),
    ],
)
def test_parse_metrics_addr_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_metrics_addr(text)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.1", False),
        ("not-an-ip", False),
    ],
)
def test_is_loopback_host(host: str, *, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# -- deploy/: alert rules and dashboard -------------------------------------------------


def metric_names_in(text: str) -> set[str]:
    return {histogram_base(name) for name in re.findall(r"\bhaios_[a-z_]+", text)}


def histogram_base(name: str) -> str:
    """A histogram series name (`_bucket`, `_sum`, ...) mapped to its metric."""
    for suffix in HISTOGRAM_SUFFIXES:
        stem = name.removesuffix(suffix)
        if stem != name and CONTRACT.get(stem, ("",))[0] == "histogram":
            return stem
    return name


def test_alert_rules_reference_only_contract_metrics() -> None:
    names = metric_names_in(ALERTS.read_text())
    assert names, "no haios metric in the alert rules"
    assert names <= set(CONTRACT), names - set(CONTRACT)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing; CI installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus); required when CI is set")
    return found


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def without_annotations(rules: str) -> str:
    """The rules without their `annotations:` blocks (prose the unit tests need not pin)."""
    kept: list[str] = []
    block_indent: int | None = None
    for line in rules.splitlines():
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and (not line.strip() or indent > block_indent):
            continue
        block_indent = indent if line.strip() == "annotations:" else None
        if block_indent is None:
            kept.append(line)
    return "\n".join(kept) + "\n"


def test_alert_rules_fire_as_intended(tmp_path: Path) -> None:
    rules = tmp_path / "alerts.yml"
    rules.write_text(without_annotations(ALERTS.read_text()))
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(ALERT_UNIT_TESTS.replace("ALERTS_FILE", str(rules)))
    result = subprocess.run(
        [promtool(), "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_text_passes_promtool_check_metrics(recorder: MetricsRecorder) -> None:
    publish(
        recorder,
        events.StepFinished.KIND,
        step_id="s",
        status="succeeded",
        exit_code=0,
        profile="default",
        wall_seconds=1.0,
        reason=None,
    )
    result = subprocess.run(
        [promtool(), "check", "metrics"],
        input=recorder.render().decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_only_contract_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs, "the dashboard has no queries"
    for expr in exprs:
        names = metric_names_in(expr)
        assert names, f"query without a haios metric: {expr}"
        assert names <= set(CONTRACT), names - set(CONTRACT)
    assert set(CONTRACT) <= set().union(*(metric_names_in(e) for e in exprs))


# `promtool test rules` input: each alert fires on a series that should trip it
# and stays quiet on a healthy one.
ALERT_UNIT_TESTS = """
rule_files: [ALERTS_FILE]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'haios_kill_switch_engaged{job="haios",instance="a"}'
        values: '0 1 1 1'
      - series: 'haios_rejections_total{job="haios",instance="a",reason="signature"}'
        values: '0 0 1 1'
      - series: 'haios_sandbox_violations_total{job="haios",instance="a",kind="seccomp"}'
        values: '0 1 1 1'
      - series: 'haios_verifications_total{job="haios",instance="a",kind="plan",result="fail"}'
        values: '0 1 1 1'
      - series: 'haios_budget_remaining{job="haios",instance="a",unit="usd"}'
        values: '10 5 0.5 0.5'
      - series: 'haios_cost_total{job="haios",instance="a",unit="usd"}'
        values: '0 5 9.5 9.5'
      - series: 'haios_budget_remaining{job="haios",instance="a",unit="tokens"}'
        values: '+Inf +Inf +Inf +Inf'
      - series: 'haios_cost_total{job="haios",instance="a",unit="tokens"}'
        values: '0 100 200 300'
      - series: 'haios_kills_total{job="haios",instance="a",scope="engine_lost"}'
        values: '0 1 1 1'
      - series: 'haios_vault_tokens_issued_total{job="haios",instance="a"}'
        values: '0 2 2 2 2 2 2 2 2 2 2 2'
      - series: 'haios_vault_tokens_revoked_total{job="haios",instance="a"}'
        values: '0 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'haios_steps_running{job="haios",instance="a"}'
        values: '0 0 0 0 0 0 0 0 0 0 0 0'
      - series: 'haios_egress_refusals_total{job="haios",instance="a",reason="byte_limit"}'
        values: '0 0 1 1'
    alert_rule_test:
      - eval_time: 3m
        alertname: HaiosEgressRefused
        exp_alerts:
          - exp_labels: {severity: warning, job: haios, instance: a, reason: byte_limit}
      - eval_time: 3m
        alertname: HaiosKillSwitchEngaged
        exp_alerts:
          - exp_labels: {severity: critical, job: haios, instance: a}
      - eval_time: 3m
        alertname: HaiosRejections
        exp_alerts:
          - exp_labels: {severity: warning, job: haios, instance: a, reason: signature}
      - eval_time: 3m
        alertname: HaiosSandboxViolations
        exp_alerts:
          - exp_labels: {severity: critical, job: haios, instance: a, kind: seccomp}
      - eval_time: 3m
        alertname: HaiosVerificationFailures
        exp_alerts:
          - exp_labels: {severity: warning, job: haios, instance: a, kind: plan}
      - eval_time: 3m
        alertname: HaiosBudgetNearlyExhausted
        exp_alerts:
          - exp_labels: {severity: warning, job: haios, instance: a, unit: usd}
      - eval_time: 3m
        alertname: HaiosEngineLost
        exp_alerts:
          - exp_labels: {severity: critical, job: haios, instance: a, scope: engine_lost}
      - eval_time: 11m
        alertname: HaiosVaultTokensNotRevoked
        exp_alerts:
          - exp_labels: {severity: critical, job: haios, instance: a}
  - interval: 1m
    input_series:
      - series: 'haios_kill_switch_engaged{job="haios",instance="a"}'
        values: '0 0 0 0'
      - series: 'haios_budget_remaining{job="haios",instance="a",unit="usd"}'
        values: '+Inf +Inf +Inf +Inf'
      - series: 'haios_cost_total{job="haios",instance="a",unit="usd"}'
        values: '0 0 0 0'
      - series: 'haios_vault_tokens_issued_total{job="haios",instance="a"}'
        values: '0 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'haios_vault_tokens_revoked_total{job="haios",instance="a"}'
        values: '0 0 0 0 0 0 0 0 0 0 0 0'
      - series: 'haios_steps_running{job="haios",instance="a"}'
        values: '0 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'haios_egress_refusals_total{job="haios",instance="a",reason="byte_limit"}'
        values: '0 0 0 0'
    alert_rule_test:
      - eval_time: 3m
        alertname: HaiosEgressRefused
        exp_alerts: []
      - eval_time: 3m
        alertname: HaiosKillSwitchEngaged
        exp_alerts: []
      - eval_time: 3m
        alertname: HaiosBudgetNearlyExhausted
        exp_alerts: []
      - eval_time: 11m
        alertname: HaiosVaultTokensNotRevoked
        exp_alerts: []
"""
