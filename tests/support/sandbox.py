# SPDX-License-Identifier: Apache-2.0
"""Shared helpers for the sandbox tests: step specs, probe runs, process scans.

Tests run real sandboxed children and therefore need root (CI runs as root).
Each spec gets its own unprivileged uid so RLIMIT_NPROC and leftover-process
checks never mix steps.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from pathlib import Path
from typing import Any

from haios.sandbox.profile import Profile, load_profile
from haios.sandbox.runner import NamespaceRunner
from haios.sandbox.spec import VIEW_COST_REPORT, VIEW_WORKSPACE, StepOutcome, StepSpec
from haios.sandbox.stepfs import StepMounts, open_capture, read_capture

REPO = Path(__file__).resolve().parents[2]
POLICY_DIR = REPO / "policy"
PROBE_FILE = "probe.json"

# A band of uids unlikely to exist on the host, offset by pid so parallel
# test processes do not share uids.
_uids = itertools.count(200_000 + (os.getpid() % 1000) * 100)

#: Python run inside probes: TRY(nr, args) as in the attack catalog, and a
#: results dict written to the workspace at the end.
PRELUDE = r"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def try_syscall(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return 0 if result >= 0 else ctypes.get_errno()
results = {}
def record(name, action):
    try:
        value = action()
        results[name] = 0 if value is None else value
    except OSError as exc:
        results[name] = exc.errno
def save():
    with open("/haios/work/probe.json", "w") as handle:
        json.dump(results, handle)
"""


#: A small valid profile for tests that mutate one field at a time.
MINIMAL_PROFILE = """
schema = "haios/profile/v1"
description = "A minimal valid profile for tests."
egress = []

[rlimits]
cpu_seconds = 60

[filesystem]
[[filesystem.read_only]]
path = "/usr"
comment = "Programs and libraries."

[seccomp]
default_action = "kill_process"

[[seccomp.allow]]
comment = "What the sandbox itself needs after the filter is loaded."
syscalls = [
  "execve", "exit_group", "write", "wait4", "brk", "mmap", "munmap",
  "rt_sigprocmask", "rt_sigaction", "dup2", "close",
]

[[seccomp.allow]]
comment = "clone for posix_spawn, without namespace flags."
syscalls = ["clone"]
args = [{ index = 0, op = "masked_eq", mask = "CLONE_NAMESPACE_FLAGS", value = 0 }]

[[seccomp.deny]]
comment = "Polite refusal for the tests."
syscalls = ["sync"]
errno = "EPERM"
"""


def host_network_profile_text() -> str:
    """The shipped default profile with the documented-unsafe host network.

    The lint then wants AF_UNIX refused outright (the host's abstract
    names), not just allowed for AF_UNIX alone as the default does.
    """
    return (POLICY_DIR / "profiles" / "default.toml").read_text().replace(
        "egress = []", "unsafe_host_network = true").replace(
        'args = [{ index = 0, op = "eq", value = "AF_UNIX" }]',
        'args = [{ index = 0, op = "eq", value = "AF_UNSPEC" }]') + (
        '\n[[seccomp.deny]]\ncomment = "No AF_UNIX socket: the host\'s abstract names."\n'
        'syscalls = ["socket"]\nerrno = "EPERM"\n'
        'args = [{ index = 0, op = "eq", value = "AF_UNIX" }]\n')


def write_profile(tmp_path: Path, text: str, name: str = "test") -> Path:
    """A policy dir holding profiles/<name>.toml with `text`."""
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / f"{name}.toml").write_text(text)
    # The policy loader refuses anything group- or world-writable, whatever the umask.
    (tmp_path / "profiles").chmod(0o755)
    (tmp_path / "profiles" / f"{name}.toml").chmod(0o644)
    return tmp_path


@functools.cache
def shipped_profile(name: str) -> Profile:
    """A profile from the repository's policy/profiles."""
    return load_profile(POLICY_DIR, name)


def next_uid() -> int:
    """A fresh unprivileged uid (also used as gid)."""
    return next(_uids)


def make_mounts(profile: Profile, uid: int, *, with_secret: bool = False) -> StepMounts:
    """Fresh detached step filesystems sized by `profile`, owned by `uid`."""
    return StepMounts.create(uid, uid, workspace_bytes=profile.filesystem.workspace_size_bytes,
                             workspace_inodes=profile.filesystem.workspace_inodes,
                             with_secret=with_secret)


def workspace_path(spec: StepSpec) -> Path:
    """The step's workspace as seen from the test (through the mount's descriptor)."""
    return Path(f"/proc/self/fd/{spec.mounts.workspace.dir.fd}")


def cost_path(spec: StepSpec) -> Path:
    """The step's cost dir as seen from the test."""
    return Path(f"/proc/self/fd/{spec.mounts.cost.dir.fd}")


def secret_path(spec: StepSpec) -> Path:
    """The step's secret filesystem as seen from the test (it must have one)."""
    assert spec.mounts.secret is not None
    return Path(f"/proc/self/fd/{spec.mounts.secret.dir.fd}")


def captured(fd: int) -> str:
    """What a step wrote to one of its output captures."""
    return read_capture(fd, 1 << 24).decode(errors="replace")


def make_spec(
    base: Path,
    argv: tuple[str, ...],
    *,
    profile: str | Profile = "default",
    name: str = "step",
    timeout_seconds: float = 20.0,
    env: dict[str, str] | None = None,
    with_secret: bool = False,
    **overrides: Any,
) -> StepSpec:
    """A StepSpec with fresh filesystems, captures and the contract's environment.

    `base` is kept for the callers' signature; nothing of the step lives on
    a host path any more.
    """
    del base
    uid = next_uid()
    resolved = shipped_profile(profile) if isinstance(profile, str) else profile
    spec = StepSpec(
        plan_id="plan",
        step_id=name,
        argv=argv,
        env=env
        if env is not None
        else {
            "PATH": "/usr/bin:/bin",
            "HOME": VIEW_WORKSPACE,
            "HAIOS_PLAN_ID": "plan",
            "HAIOS_STEP_ID": name,
            "HAIOS_COST_REPORT": VIEW_COST_REPORT,
        },
        mounts=make_mounts(resolved, uid, with_secret=with_secret),
        profile=resolved,
        uid=uid,
        gid=uid,
        timeout_seconds=timeout_seconds,
        cpu_seconds_limit=None,
        stdout_fd=open_capture(f"{name}.out"),
        stderr_fd=open_capture(f"{name}.err"),
        output_limit_bytes=1 << 20,
        cgroup=None,
    )
    return dataclasses.replace(spec, **overrides)


@dataclasses.dataclass
class ProbeRun:
    """What a probe step left behind."""

    outcome: StepOutcome
    results: dict[str, Any]
    stdout: str
    stderr: str
    spec: StepSpec


def run_python_probe(
    runner: NamespaceRunner, base: Path, body: str, *, profile: str | Profile = "default", **kw: Any
) -> ProbeRun:
    """Run `PRELUDE + body` with /usr/bin/python3 -c; the body calls save()."""
    spec = make_spec(base, ("/usr/bin/python3", "-c", PRELUDE + body), profile=profile, **kw)
    return run_spec(runner, spec)


def run_spec(runner: NamespaceRunner, spec: StepSpec) -> ProbeRun:
    """Run a spec and collect its probe file and outputs."""
    outcome = runner.run(spec)
    probe = workspace_path(spec) / PROBE_FILE
    results = json.loads(probe.read_text()) if probe.exists() else {}
    return ProbeRun(
        outcome=outcome,
        results=results,
        stdout=captured(spec.stdout_fd),
        stderr=captured(spec.stderr_fd),
        spec=spec,
    )


def processes_of_uid(uid: int) -> list[int]:
    """Live host pids whose real uid is `uid` (leftover-process checks).

    Zombies are left out: an orphaned init that has exited waits for the
    host's PID 1 to reap it and runs nothing any more.
    """
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = status_fields(Path("/proc", entry, "status").read_text())
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].startswith("Z"):
            found.append(int(entry))
    return found


def status_fields(text: str) -> dict[str, str]:
    """Parse /proc/<pid>/status text into name -> value."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields
