# SPDX-License-Identifier: Apache-2.0
"""Wires the real parts together for the CLI: policy, metrics, sandbox, guard.

Kept apart from `engine.py` so the engine never imports the concrete
sandbox, watchdog or Vault code, and tests can supply their own parts.
Does I/O.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haios import events as ev
from haios._util.safedir import SafeDir
from haios.engine import Services, run_plan
from haios.errors import HaiosError
from haios.execute import StepBounds, TreeTracker
from haios.guard.api import GuardRequest, StepGuard
from haios.load.policy import Policy, load_policy, resolve_policy_dir
from haios.models.plan import PlanStep
from haios.osroot import METRICS_FILE, STATE_FILE, OsRoot
from haios.sandbox.spec import StepOutcome, StepSpec

if TYPE_CHECKING:
    from haios.sandbox.launcher import PendingLauncher
    from haios.watchdog.client import PendingWatchdog


class _LauncherRunner:
    """The namespace runner forking through a small pre-started launcher process.

    Forking cost grows with the forking process's memory; the launcher is a
    fresh, small interpreter, so launch cost does not grow with the engine.
    `pending` is the launcher `haios run` spawned ahead: only its greeting
    is awaited here.
    """

    def __init__(self, policy: Policy, pending: PendingLauncher | None = None) -> None:
        # Profiles travel with each step's spec; the launcher needs no policy.
        from haios.sandbox.launcher import Launcher
        from haios.sandbox.runner import NamespaceRunner

        self.launcher = pending.wait_ready() if pending is not None else Launcher.start()
        self.runner = NamespaceRunner(launcher=self.launcher)

    def run(self, spec: StepSpec, *, on_start: Callable[[int], None] | None = None
            ) -> StepOutcome:
        """Run one step (see `StepRunner.run`)."""
        return self.runner.run(spec, on_start=on_start)

    def close(self) -> None:
        """Stop the launcher."""
        self.launcher.close()


def _bounds(policy: Policy, run_id: str) -> Callable[[PlanStep, Path | None], StepBounds]:
    from haios.sandbox.cglimits import StepLimits

    def create(step: PlanStep, kill_cgroup: Path | None) -> StepBounds:
        limits = policy.profiles[step.profile].cgroup
        return StepLimits.create(run_id, step.id, limits.memory_max_bytes, limits.pids_max,
                                 kill_cgroup=kill_cgroup)

    return create


def _trees() -> TreeTracker:
    from haios.sandbox.treewatch import TreeWatch

    return TreeWatch.start()


def default_services(*, watchdog: PendingWatchdog | None = None,
                     launcher: PendingLauncher | None = None) -> Services:
    """The production parts: namespace sandbox, watchdog + Vault guard, uid pool,
    tree-wide limits and SIGSYS watch (imported lazily).

    `watchdog` and `launcher` are processes spawned ahead; the run takes
    them over where it would otherwise spawn them (None: it spawns there).
    """
    from haios.guard.preflight import preflight
    from haios.guard.run_guard import make_guard

    def guard(request: GuardRequest) -> StepGuard:
        return make_guard(request, watchdog=watchdog)

    def runner(policy: Policy) -> _LauncherRunner:
        return _LauncherRunner(policy, launcher)

    return Services(runner_factory=runner, guard_factory=guard, preflight=preflight,
                    bounds_factory=_bounds, tree_tracker=_trees)


def run_command(os_root: Path, policy_option: Path | None, environ: dict[str, str], *,
                jobs: int, metrics_addr: tuple[str, int] | None,
                services: Services | None = None, watchdog: PendingWatchdog | None = None,
                launcher: PendingLauncher | None = None
                ) -> tuple[int, dict[str, Any] | None, str]:
    """`haios run`: returns (exit code, final state document, message).

    `watchdog` and `launcher`, spawned ahead by the CLI, go to the default
    services (not to `services`). What the run does not take over stays the
    caller's to discard.

    Raises:
        HaiosError: a refusal (its exit code is the process's).
    """
    from haios.metrics import MetricsRecorder, is_loopback_host
    from haios.progress import open_progress

    policy = load_policy(resolve_policy_dir(str(policy_option) if policy_option else None,
                                            environ))
    bus = ev.EventBus()
    recorder = MetricsRecorder()
    chosen = services or default_services(watchdog=watchdog, launcher=launcher)
    chosen.subscribers.append(recorder.on_event)  # after the audit log (engine subscribes)
    progress = open_progress(sys.stderr, environ=environ,
                             state_dir=policy.file.engine.state_dir)
    chosen.subscribers.append(progress.on_event)  # last: it only shows what was recorded
    if metrics_addr and not is_loopback_host(metrics_addr[0]):
        # Metrics carry no secrets, but they describe the run; say so when exposed.
        sys.stderr.write(f"haios: warning: serving metrics on non-loopback address "
                         f"{metrics_addr[0]}\n")
    # metrics.prom goes through the os_root descriptor the run holds, under
    # its lock, never through the path again (a busy refusal writes nothing).
    exporter = _exporter(policy, recorder, os_root)
    chosen.finish = functools.partial(_write_metrics, recorder, exporter)
    if exporter is not None:
        chosen.subscribers.append(exporter.on_event)  # progress pushes from run.started on
    server = recorder.serve(*metrics_addr) if metrics_addr else None
    try:
        outcome = run_plan(os_root, policy, jobs=jobs, services=chosen, bus=bus)
        return outcome.exit_code, outcome.state, outcome.message
    finally:
        progress.close()  # before the CLI prints: the terminal is restored first
        if server is not None:
            server.close()
        if exporter is not None:
            exporter.close()


def _exporter(policy: Policy, recorder: Any, os_root: Path) -> Any:
    """The Pushgateway/textfile exporter the policy's `[metrics]` asks for, or None."""
    settings = policy.file.metrics
    if settings.pushgateway_url is None and settings.textfile_dir is None:
        return None
    from haios.metrics_export import MetricsExporter

    try:
        root_stat = os.stat(os_root, follow_symlinks=False)
    except OSError:
        return None  # the run refuses this os_root itself, before the lock
    return MetricsExporter(settings, recorder.registry, root_stat)


def _write_metrics(recorder: Any, exporter: Any, root: SafeDir) -> None:
    """Write metrics.prom at the end of the run (best effort after a refusal), then export."""
    with contextlib.suppress(HaiosError, OSError):
        recorder.write_textfile(root.fd, METRICS_FILE)
    if exporter is not None:
        # Under the os_root lock: a busy refusal never overwrites the holder's group.
        exporter.finish(os.fstat(root.fd))


def state_command(os_root: Path, policy_option: Path | None, environ: dict[str, str]
                  ) -> dict[str, Any]:
    """`haios state`: the verified state document.

    Raises:
        PolicyLoadError: policy unusable (exit 6).
        TamperedError: state, registry or audit chain fail verification (exit 3).
    """
    from haios.state.verify import verify_state_files

    policy = load_policy(resolve_policy_dir(str(policy_option) if policy_option else None,
                                            environ))
    osr = OsRoot(os_root)
    try:
        return verify_state_files(osr, policy)
    finally:
        osr.close()


__all__ = ["STATE_FILE", "default_services", "run_command", "state_command"]
