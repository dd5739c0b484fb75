# SPDX-License-Identifier: Apache-2.0
"""Engine-side preparation of a launch: compile once per profile, plan per step.

`compiled_profile` does the per-profile work once per run and caches it by
profile digest: the two seccomp programs and the read-only path plan.
`build_plan` combines it with one `StepSpec` into a `LaunchPlan` of plain
values, so the child only executes decisions already taken.

Reads /proc/sys/kernel/cap_last_cap once and lstats profile paths once per
profile; otherwise no I/O.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Final

from haios.errors import SandboxSetupError
from haios.sandbox import _libc, env, mounts, netns, rlimits, seccomp
from haios.sandbox._launchplan import LaunchPlan
from haios.sandbox.profile import Profile
from haios.sandbox.spec import StepSpec

HOSTNAME: Final = "haios"
STEP_UMASK: Final = 0o022
CAP_LAST_CAP_PATH: Final = "/proc/sys/kernel/cap_last_cap"

#: namespaces the init unshares (the PID namespace is created by the parent
#: so that the init is PID 1 of it without a second fork).
BASE_NAMESPACES: Final = (
    _libc.CLONE_NEWNS | _libc.CLONE_NEWIPC | _libc.CLONE_NEWUTS | _libc.CLONE_NEWCGROUP
)


@dataclasses.dataclass(frozen=True)
class CompiledProfile:
    """The per-profile, per-run work.

    Attributes:
        profile: the profile compiled.
        floor: the profile-independent refusal filter (loaded first).
        program: the profile's default-deny filter (loaded last).
        entries: the read-only view entries.
    """

    profile: Profile
    floor: seccomp.SeccompProgram
    program: seccomp.SeccompProgram
    entries: tuple[mounts.ViewEntry, ...]


_lock = threading.Lock()
_compiled: dict[str, CompiledProfile] = {}
_cap_last_cap: list[int] = []


def cap_last_cap() -> int:
    """The kernel's highest capability number, read once.

    Raises:
        SandboxSetupError: the file is unreadable or malformed.

    Side Effects:
        Reads /proc/sys/kernel/cap_last_cap the first time.
    """
    with _lock:
        if not _cap_last_cap:
            try:
                with open(CAP_LAST_CAP_PATH, encoding="ascii") as handle:
                    _cap_last_cap.append(int(handle.read().strip()))
            except (OSError, ValueError) as exc:
                raise SandboxSetupError(f"cannot read {CAP_LAST_CAP_PATH} ({exc})") from exc
        return _cap_last_cap[0]


def compiled_profile(profile: Profile) -> CompiledProfile:
    """Compile `profile` once per run (cached by digest, checked for equality).

    Raises:
        PolicyLoadError: the profile's rules do not compile.
        SandboxSetupError: libseccomp is missing or a required path is absent.

    Side Effects:
        lstat of the profile's paths on first use.
    """
    with _lock:
        cached = _compiled.get(profile.digest)
        if cached is not None and (cached.profile is profile or cached.profile == profile):
            return cached
    paths = tuple((entry.path, entry.optional) for entry in profile.filesystem.read_only)
    compiled = CompiledProfile(
        profile=profile,
        floor=seccomp.floor_program(),
        program=seccomp.profile_program(profile),
        entries=mounts.plan_read_only_paths(paths),
    )
    with _lock:
        _compiled[profile.digest] = compiled
    return compiled


def namespaces_for(profile: Profile) -> int:
    """unshare(2) flags for the init: network too, unless the profile sets the
    unsafe host network."""
    if profile.unsafe_host_network:
        return BASE_NAMESPACES
    return BASE_NAMESPACES | _libc.CLONE_NEWNET


def network_plan(spec: StepSpec) -> netns.NetworkPlan:
    """The step's network plan.

    Raises:
        SandboxSetupError: endpoints under the host network, endpoints
            without a channel, or endpoints that cannot be built.
    """
    if spec.egress is not None and spec.egress.channel_fd < 0:
        raise SandboxSetupError(f"step {spec.step_id}: egress endpoints without a channel")
    try:
        return netns.plan_network(spec.egress, host_network=spec.profile.unsafe_host_network)
    except ValueError as exc:
        raise SandboxSetupError(f"step {spec.step_id}: {exc}") from exc


def build_plan(spec: StepSpec, *, dry_run: bool = False) -> LaunchPlan:
    """Turn a spec into a launch plan (compiling its profile on first use).

    Raises:
        SandboxSetupError: uid/gid 0, bad argv/env, or a compile problem.
        PolicyLoadError: the profile does not compile.
    """
    if spec.uid <= 0 or spec.gid <= 0:
        raise SandboxSetupError(
            f"step {spec.step_id}: uid/gid must be unprivileged, not {spec.uid}/{spec.gid}"
        )
    compiled = compiled_profile(spec.profile)
    view = mounts.ViewPlan(
        entries=compiled.entries,
        tmp_size_bytes=spec.profile.filesystem.tmp_size_bytes,
        tmp_inodes=spec.profile.filesystem.tmp_inodes,
        has_secret=spec.mounts.secret is not None,
        uid=spec.uid,
        gid=spec.gid,
        hosts=netns.hosts_entries(spec.egress),
    )
    return LaunchPlan(
        step_id=spec.step_id,
        argv=env.checked_argv(spec.argv),
        env=env.checked_env(spec.env),
        uid=spec.uid,
        gid=spec.gid,
        namespaces=namespaces_for(spec.profile),
        network=network_plan(spec),
        hostname=HOSTNAME,
        cgroups=tuple(str(path) for path in
                      ((spec.cgroup,) if spec.cgroup is not None else ()) + spec.limit_cgroups),
        view=view,
        rlimits=rlimits.effective_rlimits(spec.profile.rlimits, spec.cpu_seconds_limit),
        cap_last_cap=cap_last_cap(),
        seccomp=(compiled.floor.bpf, compiled.program.bpf),
        umask=STEP_UMASK,
        dry_run=dry_run,
    )
