# SPDX-License-Identifier: Apache-2.0
"""The seam between the engine and the code that runs a step.

The engine decides *what* runs (argv, environment, workspace, identity,
limits); a `StepRunner` decides *how* it is confined. This module holds only
the value types and the protocol: no I/O.

No host path crosses this seam: the step's writable filesystems and its
output captures are descriptors. Paths inside the step's view are fixed
(in `haios/sandbox/view.py`, re-exported here) so the engine can compute
the environment before the runner builds the view:

- the workspace (read-write, HOME and cwd): `VIEW_WORKSPACE`
- the cost report directory (read-write):   `VIEW_COST_DIR`
- the Vault token directory (read-only):     `VIEW_SECRET_DIR`

Network reach is described by `StepEgress`: the TCP endpoints the step may
dial (each a listener inside the step's own network namespace) and the
channel over which the sandbox hands those listeners to the engine's
forwarder (`haios.egress.forward`, docs/adr/0004-egress.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

# The fixed paths of the step's view live apart (haios/sandbox/view.py) so
# the profile loader can name them without importing this seam.
from haios.sandbox.view import VIEW_COST_DIR as VIEW_COST_DIR
from haios.sandbox.view import VIEW_COST_REPORT as VIEW_COST_REPORT
from haios.sandbox.view import VIEW_SECRET_DIR as VIEW_SECRET_DIR
from haios.sandbox.view import VIEW_TOKEN_FILE as VIEW_TOKEN_FILE
from haios.sandbox.view import VIEW_WORKSPACE as VIEW_WORKSPACE

if TYPE_CHECKING:
    from haios.sandbox.profile import Profile
    from haios.sandbox.stepfs import StepMounts



@dataclasses.dataclass(frozen=True)
class EgressRoute:
    """One TCP endpoint a step may reach, as the sandbox and the forwarder apply it.

    Attributes:
        endpoint: the profile's entry (``"vault"``, ``"pypi.org:443"``), the
            label in records and evidence.
        host: the name the step dials (published in its /etc/hosts), or None
            for an address endpoint (the step dials the address itself).
        listen: the address of the listener inside the step's network
            namespace: a private loopback address per host name,
            127.0.0.1 for ``localhost``, the address itself for an address
            endpoint (added to the namespace's loopback interface).
        port: the TCP port, the same inside and outside.
        destinations: the addresses the engine forwards to, tried in order;
            resolved by the engine from the host, never by the step.
    """

    endpoint: str
    host: str | None
    listen: str
    port: int
    destinations: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StepEgress:
    """The step's allowed endpoints and the channel for their listeners.

    Attributes:
        routes: the endpoints (at least one).
        channel_fd: one end of a SOCK_SEQPACKET socket pair; the sandbox
            init sends the listening sockets over it, in `routes` order, and
            closes it before the step starts. The caller owns it.
    """

    routes: tuple[EgressRoute, ...]
    channel_fd: int


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything a runner needs to start one step; built by the engine.

    Attributes:
        plan_id: the plan's id (for messages only).
        step_id: the step's id.
        argv: the step's `run`, absolute program path first.
        env: the complete environment of the step (contract section 9).
        mounts: the step's private filesystems, detached tmpfs mounts that
            no host path names: workspace (read-write at `VIEW_WORKSPACE`),
            cost dir (read-write at `VIEW_COST_DIR`) and, with a Vault scope,
            the token (read-only at `VIEW_SECRET_DIR`). The caller owns them.
        profile: the sandbox profile the policy resolved for the step.
        uid: unprivileged uid the step runs as (never 0).
        gid: unprivileged gid the step runs as (never 0).
        timeout_seconds: wall-clock limit; past it the whole tree is killed.
        cpu_seconds_limit: CPU limit in seconds (RLIMIT_CPU), already bounded
            by the step's budget reservation, or None for the profile's limit.
        stdout_fd: descriptor receiving the step's stdout (the caller owns it).
        stderr_fd: descriptor receiving the step's stderr (the caller owns it).
        output_limit_bytes: at most this many bytes of each stream are kept.
        cgroup: a cgroup v2 directory the step joins before exec (kill and
            CPU accounting), or None.
        limit_cgroups: further cgroup directories the step joins before exec
            (memory and process limits, v1 or v2), root-owned, never client paths.
        egress: the TCP endpoints the step may reach through the engine's
            forwarder, or None: then the step's network namespace has no
            usable interface (unless its profile sets the unsafe host
            network, which shares the host's namespace).
    """

    plan_id: str
    step_id: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    mounts: StepMounts
    profile: Profile
    uid: int
    gid: int
    timeout_seconds: float
    cpu_seconds_limit: int | None
    stdout_fd: int
    stderr_fd: int
    output_limit_bytes: int
    cgroup: Path | None
    limit_cgroups: tuple[Path, ...] = ()
    egress: StepEgress | None = None


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """How a step ended, as observed from outside its sandbox.

    Attributes:
        exit_code: the step's exit status, or None when a signal ended it.
        signal: the signal that ended the step, or None.
        timed_out: the runner killed the tree at `timeout_seconds`.
        violation: why the sandbox stopped the step ("seccomp", "cpu_limit",
            "file_size", "memory", "processes"), or None.
        cpu_seconds: user+system CPU of the whole step tree.
        wall_seconds: wall time from start to the last process reaped.
        max_rss_bytes: peak resident set size of the largest process.
    """

    exit_code: int | None
    signal: int | None
    timed_out: bool
    violation: str | None
    cpu_seconds: float
    wall_seconds: float
    max_rss_bytes: int


class StepRunner(Protocol):
    """Runs one step to completion inside its confinement. Thread-safe."""

    def run(self, spec: StepSpec, *, on_start: Callable[[int], None] | None = None) -> StepOutcome:
        """Run the step and wait until every process of its tree is gone.

        Args:
            spec: what to run and how to confine it.
            on_start: called with the host pid of the step's init once it runs.

        Raises:
            SandboxSetupError: the confinement could not be built; the step
                did not run (exec never happened).

        Side Effects:
            Forks, writes the step's stdout/stderr descriptors, kills the
            tree at the timeout.
        """
        ...
