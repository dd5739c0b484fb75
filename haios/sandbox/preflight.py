# SPDX-License-Identifier: Apache-2.0
"""Refuse to run when this host cannot build the sandbox the profiles ask for.

`check_sandbox_prerequisites` checks, in order: Linux on x86_64; root with
the capabilities the setup needs; every namespace type; seccomp in the
kernel; libseccomp and both filters compiling; the staging directory; then,
per profile, a complete dry-run launch (namespaces, view, pivot_root,
identity drop, both filters loaded) that stops just before execve; for a
profile with egress endpoints the dry run also brings loopback up, adds an
address to it, binds a listener below port 1024 and hands it over the
egress channel, as a real step's network is built. Anything
missing raises `SandboxSetupError` naming every problem found. There is no
weaker mode to fall back to (no silent downgrade).

Does I/O: reads /proc, creates detached tmpfs mounts, forks.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterable
from typing import Final

from haios.errors import PolicyLoadError, SandboxSetupError
from haios.sandbox import _libc, _plan, mounts, netns, seccomp
from haios.sandbox.profile import Profile
from haios.sandbox.runner import NamespaceRunner
from haios.sandbox.spec import EgressRoute, StepEgress, StepOutcome, StepSpec
from haios.sandbox.stepfs import StepMounts, open_capture

#: the unprivileged identity used for the dry runs (nobody/nogroup)
PROBE_UID: Final = 65534
PROBE_GID: Final = 65534
PROBE_TIMEOUT_SECONDS: Final = 30.0
PROBE_FS_BYTES: Final = 1 << 20
PROBE_FS_INODES: Final = 64
NAMESPACES: Final = ("pid", "mnt", "ipc", "uts", "net", "cgroup")
#: capability numbers the setup uses (linux/capability.h)
REQUIRED_CAPABILITIES: Final = {
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_ADMIN": 21,
    "CAP_MKNOD": 27,
}


def _host_problems() -> list[str]:
    problems: list[str] = []
    machine = os.uname().machine
    if machine != "x86_64":
        problems.append(f"architecture {machine} (the seccomp filters are x86_64 only)")
    if os.geteuid() != 0:
        problems.append(
            f"not root (euid {os.geteuid()}); the sandbox needs root to build namespaces"
        )
        return problems
    effective = _libc.capget_self()[0]
    missing = [name for name, bit in REQUIRED_CAPABILITIES.items() if not effective >> bit & 1]
    if missing:
        problems.append("missing capabilities " + ", ".join(missing))
    for name in NAMESPACES:
        if not os.path.exists(f"/proc/self/ns/{name}"):
            problems.append(f"{name} namespaces unavailable")
    try:
        _libc.prctl(_libc.PR_GET_SECCOMP)
    except OSError:
        problems.append("seccomp unavailable in this kernel")
    try:
        info = os.lstat(mounts.STAGING_DIR)
    except OSError:
        problems.append(f"{mounts.STAGING_DIR} missing (used to assemble the view)")
    else:
        if not stat.S_ISDIR(info.st_mode):
            problems.append(f"{mounts.STAGING_DIR} is not a directory")
    try:
        seccomp.floor_program()
    except SandboxSetupError as exc:
        problems.append(str(exc))
    return problems


#: the endpoints of an egress dry run: a name and an address added to loopback
PROBE_ROUTES: Final = (
    EgressRoute("preflight.invalid:443", "preflight.invalid", "127.200.0.1", 443, ("127.0.0.1",)),
    EgressRoute("198.18.255.254:443", None, "198.18.255.254", 443, ("198.18.255.254",)),
)


def _probe_spec(profile: Profile, step_fs: StepMounts, captures: tuple[int, int],
                egress: StepEgress | None = None) -> StepSpec:
    return StepSpec(
        plan_id="preflight",
        step_id=f"preflight-{profile.name}",
        argv=("/bin/true",),
        env={"PATH": "/usr/bin:/bin"},
        mounts=step_fs,
        profile=profile,
        uid=PROBE_UID,
        gid=PROBE_GID,
        timeout_seconds=PROBE_TIMEOUT_SECONDS,
        cpu_seconds_limit=None,
        stdout_fd=captures[0],
        stderr_fd=captures[1],
        output_limit_bytes=4096,
        cgroup=None,
        egress=egress,
    )


def _profile_problems(profiles: Iterable[Profile], runner: NamespaceRunner) -> list[str]:
    problems: list[str] = []
    for profile in profiles:
        try:
            _plan.compiled_profile(profile)
            outcome = _dry_run(profile, runner)
        except (SandboxSetupError, PolicyLoadError) as exc:
            problems.append(f"profile {profile.name}: {exc}")
            continue
        if outcome.exit_code != 0:
            problems.append(f"profile {profile.name}: dry run ended with {outcome}")
    return problems


def _dry_run(profile: Profile, runner: NamespaceRunner) -> StepOutcome:
    step_fs = StepMounts.create(PROBE_UID, PROBE_GID, workspace_bytes=PROBE_FS_BYTES,
                                workspace_inodes=PROBE_FS_INODES, with_secret=False)
    captures = (open_capture("preflight-out"), open_capture("preflight-err"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    egress = StepEgress(PROBE_ROUTES, theirs.fileno()) if profile.egress else None
    try:
        outcome = runner.dry_run(_probe_spec(profile, step_fs, captures, egress))
        if egress is not None:
            _check_listeners(ours)
        return outcome
    finally:
        step_fs.close()
        for fd in captures:
            os.close(fd)
        ours.close()
        theirs.close()


def _check_listeners(channel: socket.socket) -> None:
    """The dry run's listeners arrived over the channel (then closed).

    Raises:
        SandboxSetupError: they did not.
    """
    channel.setblocking(False)
    try:
        message, fds, _flags, _addr = socket.recv_fds(
            channel, len(netns.LISTENERS_MESSAGE) + 1, len(PROBE_ROUTES) + 1)
    except OSError as exc:
        raise SandboxSetupError(f"egress listeners not delivered ({exc.strerror})") from exc
    for fd in fds:
        os.close(fd)
    if message != netns.LISTENERS_MESSAGE or len(fds) != len(PROBE_ROUTES):
        raise SandboxSetupError("egress listeners not delivered")


def check_sandbox_prerequisites(
    profiles: Iterable[Profile], *, runner: NamespaceRunner | None = None
) -> None:
    """Prove that every profile's sandbox can be built here, or refuse.

    Args:
        profiles: the profiles the run may use.
        runner: the runner to try them with (default: a direct one).

    Raises:
        SandboxSetupError: naming everything missing (not root, a namespace
            type, seccomp, libseccomp, a profile path, a failed dry run).

    Side Effects:
        Forks one dry-run sandbox per profile, each with its own small
        detached filesystems.
    """
    problems = _host_problems()
    if not problems:
        problems = _profile_problems(profiles, runner or NamespaceRunner())
    if problems:
        raise SandboxSetupError("sandbox prerequisites missing: " + "; ".join(problems))
