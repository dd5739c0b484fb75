# SPDX-License-Identifier: Apache-2.0
"""Every control is on, as seen from inside the step (T-S01, T-S08).

The attacker is the step's own code looking for privilege it could use: a
uid of 0, a supplementary group, a capability in any set, a missing
no_new_privs or seccomp, an inherited descriptor or ignored signal, an extra
environment variable. Each is read from /proc/self and must be exactly as
the contract states (section 9 and 12): uid/gid = the step's, no groups, all
capability sets empty, NoNewPrivs 1, Seccomp 2 (two filters), SigBlk and
SigIgn 0, only fds 0-2, exactly the engine's environment, and PID 1 is the
step's init.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from haios.sandbox.launcher import Launcher
from haios.sandbox.runner import NamespaceRunner
from tests.support.sandbox import (
    ProbeRun,
    make_spec,
    run_spec,
    status_fields,
    workspace_path,
)

PROBE = r"""
set -e
cat /proc/self/status > /haios/work/status
tr '\0' '\n' < /proc/self/environ > /haios/work/environ
ls /proc/self/fd > /haios/work/fds
echo "$$ $PPID" > /haios/work/pids
id -G > /haios/work/groups
"""


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    """One launcher for the module's launcher-mode runs."""
    started = Launcher.start()
    yield started
    started.close()


@pytest.fixture(scope="module", params=["direct", "launcher"])
def identity_probe(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, launcher: Launcher
) -> tuple[ProbeRun, dict[str, str]]:
    """Run the probe with /bin/sh (so no Python start-up changes what is read)."""
    runner = NamespaceRunner(launcher=launcher if request.param == "launcher" else None)
    spec = make_spec(tmp_path_factory.mktemp(request.param), ("/bin/sh", "-c", PROBE))
    probe = run_spec(runner, spec)
    assert probe.outcome.exit_code == 0, probe.stderr
    status = status_fields((workspace_path(spec) / "status").read_text())
    return probe, status


def test_uid_and_gid_are_the_steps_and_not_root(
    identity_probe: tuple[ProbeRun, dict[str, str]],
) -> None:
    probe, status = identity_probe
    uid = probe.spec.uid
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(probe.spec.gid)] * 4
    assert uid != 0


def test_no_supplementary_groups(identity_probe: tuple[ProbeRun, dict[str, str]]) -> None:
    _probe, status = identity_probe
    assert status["Groups"] == ""


@pytest.mark.parametrize("capability_set", ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"])
def test_every_capability_set_is_empty(
    identity_probe: tuple[ProbeRun, dict[str, str]], capability_set: str
) -> None:
    _probe, status = identity_probe
    assert int(status[capability_set], 16) == 0


def test_no_new_privs_is_set(identity_probe: tuple[ProbeRun, dict[str, str]]) -> None:
    _probe, status = identity_probe
    assert status["NoNewPrivs"] == "1"


def test_seccomp_filter_mode_with_both_filters(
    identity_probe: tuple[ProbeRun, dict[str, str]],
) -> None:
    _probe, status = identity_probe
    assert status["Seccomp"] == "2"
    assert status["Seccomp_filters"] == "2"


def test_signal_mask_and_ignored_signals_are_clear(
    identity_probe: tuple[ProbeRun, dict[str, str]],
) -> None:
    _probe, status = identity_probe
    assert int(status["SigBlk"], 16) == 0
    assert int(status["SigIgn"], 16) == 0


def test_only_stdio_descriptors_are_inherited(
    identity_probe: tuple[ProbeRun, dict[str, str]],
) -> None:
    probe, _status = identity_probe
    # 3 is the directory ls itself opened to list /proc/self/fd.
    assert (workspace_path(probe.spec) / "fds").read_text().split() == ["0", "1", "2", "3"]


def test_environment_is_exactly_the_engines(
    identity_probe: tuple[ProbeRun, dict[str, str]],
) -> None:
    probe, _status = identity_probe
    environ = (workspace_path(probe.spec) / "environ").read_text()
    lines = [line for line in environ.splitlines() if line]
    assert dict(line.split("=", 1) for line in lines) == dict(probe.spec.env)


def test_pid_1_is_the_steps_init(identity_probe: tuple[ProbeRun, dict[str, str]]) -> None:
    probe, _status = identity_probe
    pid, ppid = (workspace_path(probe.spec) / "pids").read_text().split()
    assert (pid, ppid) == ("2", "1")


def test_id_reports_only_the_primary_group(identity_probe: tuple[ProbeRun, dict[str, str]]) -> None:
    probe, _status = identity_probe
    assert (workspace_path(probe.spec) / "groups").read_text().split() == [str(probe.spec.gid)]


def test_contract_tools_run_normally(tmp_path: Path) -> None:
    script = (
        "import json, os, hashlib, ctypes, shutil, subprocess\n"
        "command = 'echo a b | tr a-z A-Z | wc -w; ls /usr/bin/python3'\n"
        "out = subprocess.run(['/bin/sh', '-c', command],"
        " capture_output=True, text=True, check=True).stdout\n"
        "shutil.copy('/etc/nsswitch.conf', 'copy.txt')\n"
        "data = {'out': out, 'sha': hashlib.sha256(b'x').hexdigest(),"
        " 'pid': ctypes.CDLL(None).getpid(), 'cwd': os.getcwd(), 'home': os.environ['HOME']}\n"
        "json.dump(data, open('probe.json', 'w'))\n"
    )
    for profile in ("default", "network"):
        spec = make_spec(
            tmp_path, ("/usr/bin/python3", "-c", script), profile=profile, name=profile
        )
        probe = run_spec(NamespaceRunner(), spec)
        assert probe.outcome.exit_code == 0, probe.stderr
        assert probe.results["out"] == "2\n/usr/bin/python3\n"
        assert probe.results["pid"] == 2
        assert probe.results["cwd"] == probe.results["home"] == "/haios/work"
        assert (workspace_path(spec) / "copy.txt").exists()
