# SPDX-License-Identifier: Apache-2.0
"""Resource limits of a step: computed from the profile and spec, applied in the child.

`effective_rlimits` is pure: it turns the profile's limits and the engine's
CPU bound into (resource, soft, hard) triples. `apply_rlimits` calls
setrlimit(2) for each, in the child, before the uid change.

Soft equals hard for every limit, so the unprivileged step can lower but never
raise them (raising a hard limit needs CAP_SYS_RESOURCE, which the step lacks).
The one exception is RLIMIT_CPU, whose hard limit is one second above the soft
one: the kernel sends SIGXCPU at the soft limit (recorded as violation
"cpu_limit") and SIGKILL at the hard limit if the step ignores SIGXCPU.

Core dumps are always off (RLIMIT_CORE = 0): a core file would carry the
step's memory, including any Vault token, to the host (T-S10).
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Final

from haios.errors import SandboxSetupError

if TYPE_CHECKING:
    from haios.sandbox.profile import Rlimits

#: grace between SIGXCPU and SIGKILL, in seconds of CPU time
CPU_KILL_GRACE_SECONDS: Final = 1

Rlimit = tuple[int, int, int]


def effective_cpu_seconds(limits: Rlimits, cpu_seconds_limit: int | None) -> int:
    """The CPU limit actually applied: the profile's, lowered by the engine's bound.

    Raises:
        SandboxSetupError: the engine's bound is below one second.
    """
    if cpu_seconds_limit is None:
        return limits.cpu_seconds
    if cpu_seconds_limit < 1:
        raise SandboxSetupError(f"cpu_seconds_limit {cpu_seconds_limit} leaves no CPU time to run")
    return min(limits.cpu_seconds, cpu_seconds_limit)


def effective_rlimits(limits: Rlimits, cpu_seconds_limit: int | None) -> tuple[Rlimit, ...]:
    """(resource, soft, hard) for every limit the child sets.

    Besides the profile's limits: RLIMIT_CORE 0 (no core dumps) and
    RLIMIT_RTPRIO/RLIMIT_NICE 0 (no real-time or raised priority).

    Raises:
        SandboxSetupError: as `effective_cpu_seconds`.
    """
    cpu = effective_cpu_seconds(limits, cpu_seconds_limit)
    return (
        (resource.RLIMIT_CPU, cpu, cpu + CPU_KILL_GRACE_SECONDS),
        (resource.RLIMIT_AS, limits.address_space_bytes, limits.address_space_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_NPROC, limits.processes, limits.processes),
        (resource.RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_RTPRIO, 0, 0),
        (resource.RLIMIT_NICE, 0, 0),
    )


def describe_rlimits(limits: Rlimits, cpu_seconds_limit: int | None) -> dict[str, int]:
    """The applied limits by name, for the step's evidence record.

    Raises:
        SandboxSetupError: as `effective_cpu_seconds`.
    """
    return {
        "cpu_seconds": effective_cpu_seconds(limits, cpu_seconds_limit),
        "address_space_bytes": limits.address_space_bytes,
        "open_files": limits.open_files,
        "processes": limits.processes,
        "file_size_bytes": limits.file_size_bytes,
        "core_bytes": 0,
        "rtprio": 0,
        "nice": 0,
    }


def apply_rlimits(rlimits: tuple[Rlimit, ...]) -> None:
    """setrlimit(2) for each triple (child side).

    Raises:
        OSError: the kernel refused a limit.

    Side Effects:
        Lowers the calling process's resource limits (inherited across exec).
    """
    for which, soft, hard in rlimits:
        try:
            resource.setrlimit(which, (soft, hard))
        except ValueError as exc:
            raise OSError(22, f"setrlimit {which}: {exc}") from exc
