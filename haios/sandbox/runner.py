# SPDX-License-Identifier: Apache-2.0
"""`NamespaceRunner`: the engine's `StepRunner` that confines each step.

One `run()` call: build the launch plan (the profile is compiled once per run
and cached), create the output files and pipes, fork the namespace init
(from the calling thread, or through a pre-started `Launcher` so the cost of
fork does not grow with the engine's memory), then supervise it until every
process of the step is gone. The confinement itself is in `_child.py`; the
order of its stages is documented there and in threat_model/sandbox.md.

Thread-safe: each call uses only its own descriptors; the caches are locked.
The engine must not call ``os.wait()``/``waitpid(-1)`` elsewhere, which could
reap a step's init. Does I/O (fork, files, pipes, signals).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING

from haios.errors import SandboxSetupError
from haios.sandbox import _plan, _spawn, _supervise
from haios.sandbox.spec import StepOutcome, StepSpec

if TYPE_CHECKING:
    from haios.sandbox.launcher import Launcher


def _egress_fd(spec: StepSpec) -> int:
    return -1 if spec.egress is None else spec.egress.channel_fd


def _direct_spawn(
    spec: StepSpec, plan_dry_run: bool, stack: ExitStack
) -> tuple[_supervise.Spawned, _supervise.ParentEnds]:
    plan = _plan.build_plan(spec, dry_run=plan_dry_run)
    child_ends, parent_ends = _supervise.open_pipes(spec.mounts, _egress_fd(spec))
    stack.callback(parent_ends.close)
    try:
        pid = _spawn.spawn_init(plan, child_ends)
    finally:
        _supervise.close_child_ends(child_ends)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        # Without a pidfd the step could not be killed race-free: stop it now.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise SandboxSetupError(f"step {spec.step_id}: pidfd_open failed ({exc.strerror})") from exc
    stack.callback(os.close, pidfd)

    def collect() -> _supervise.InitExit:
        _pid, status, usage = os.wait4(pid, 0)
        return _supervise.InitExit(
            status=status,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            max_rss_bytes=usage.ru_maxrss * 1024,
        )

    return _supervise.Spawned(pid=pid, pidfd=pidfd, exit_fd=pidfd, collect=collect), parent_ends


class NamespaceRunner:
    """Runs each step as an unprivileged uid in fresh namespaces with seccomp.

    Args:
        launcher: fork through this pre-started launcher process instead of
            from the calling (engine) process. Same confinement; launch cost
            independent of the engine's memory size.
    """

    def __init__(self, *, launcher: Launcher | None = None) -> None:
        """Create a runner (no I/O)."""
        self._launcher = launcher

    def run(self, spec: StepSpec, *, on_start: Callable[[int], None] | None = None) -> StepOutcome:
        """Run the step and wait until every process of its tree is gone.

        Args:
            spec: what to run and how to confine it.
            on_start: called with the host pid of the step's init right after
                it is forked (before setup completes), so a kill switch can
                reach it at once.

        Returns:
            How the step ended.

        Raises:
            SandboxSetupError: the confinement could not be built (uid 0,
                a setup stage failed, execve failed);
                the step did not run.
            PolicyLoadError: the profile does not compile.

        Side Effects:
            Forks, writes the step's stdout/stderr descriptors, kills the
            tree at the timeout.
        """
        return self._run(spec, on_start=on_start, dry_run=False)

    def _run(
        self, spec: StepSpec, *, on_start: Callable[[int], None] | None, dry_run: bool
    ) -> StepOutcome:
        started = time.monotonic()
        with ExitStack() as stack:
            if self._launcher is None:
                spawned, ends = _direct_spawn(spec, dry_run, stack)
            else:
                plan = _plan.build_plan(spec, dry_run=dry_run)
                spawned, ends = self._launcher.spawn(plan, spec.mounts, stack,
                                                     egress_fd=_egress_fd(spec))
            return _supervise.supervise(
                spec, spawned, ends, (spec.stdout_fd, spec.stderr_fd), started=started,
                on_start=on_start,
            )

    def dry_run(self, spec: StepSpec) -> StepOutcome:
        """Build the whole confinement for `spec`, then exit 0 instead of execve.

        Used by the preflight check: proves namespaces, the view, the identity
        drop and both seccomp filters work on this host.

        Raises:
            SandboxSetupError: as `run`.

        Side Effects:
            As `run`, without executing the step's program.
        """
        return self._run(spec, on_start=None, dry_run=True)
