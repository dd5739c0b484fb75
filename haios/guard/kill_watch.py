# SPDX-License-Identifier: Apache-2.0
"""The kill watch of one run: each step's kill cgroup, registered with the watchdog.

The watchdog (haios/watchdog/) is an independent process; this is the
engine's side of it. Before a step: create its kill cgroup and register it
(a flag already set refuses the step). After: unregister and remove it.
The watchdog's reader thread reports kills, engagements and its own death
here; a lost watchdog kills every registered tree from the engine and fails
the run closed. Does I/O through the watchdog client.
"""

from __future__ import annotations

import os
import secrets as pyrandom
import threading
from pathlib import Path

from haios import events as ev
from haios.errors import HaiosError, KilledError, WatchdogLostError
from haios.guard.api import GuardRequest
from haios.watchdog.client import Engagement, KillReport, PendingWatchdog, Watchdog
from haios.watchdog.flags import engaged_flag


class KillWatch:
    """Registers step trees with the watchdog and remembers which flag killed what."""

    def __init__(self, request: GuardRequest, process: PendingWatchdog | None = None) -> None:
        """`process`: a watchdog spawned ahead, for `start` to configure (else it spawns one)."""
        self.request = request
        self.watchdog: Watchdog | None = None
        self._process = process
        self._kills: dict[str, str] = {}
        self._lost: HaiosError | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the run's watchdog: configure the one spawned ahead, or spawn one.

        Raises:
            EnvironmentUnavailableError: it cannot start (exit 6).
        """
        request = self.request
        process, self._process = self._process, None
        self.watchdog = Watchdog.start(
            control_dir=request.osr.path / "control",
            extra_paths=request.policy.kill_paths,
            journal_path=request.journal_path,
            run_id=f"{request.run_id}-{os.getpid()}-{pyrandom.token_hex(3)}",
            on_kill=self._on_kill, on_lost=self._on_lost, on_engaged=self._on_engaged,
            process=process,
        )

    def register(self, step_id: str) -> str | None:
        """Create and register the step's kill cgroup; return its path (None: no watchdog).

        Raises:
            KilledError: a flag killed the step at registration (do not start it).
            WatchdogLostError: the watchdog died.
        """
        lost = self.failure()
        if lost is not None:
            raise lost
        if self.watchdog is None:
            return None
        path = self.watchdog.create_step_cgroup(step_id)
        report = self.watchdog.register(step_id, path)
        if report is not None:
            self.watchdog.remove_step_cgroup(path)
            raise KilledError(f"kill switch {flag_name(report.flag)} engaged")
        return str(path)

    def release(self, step_id: str, cgroup: str | None) -> None:
        """Unregister and remove the step's kill cgroup (not after a loss: all are dead)."""
        if self.watchdog is not None and cgroup is not None and self.failure() is None:
            self.watchdog.unregister(step_id)
            self.watchdog.remove_step_cgroup(Path(cgroup))

    def was_killed(self, step_id: str) -> str | None:
        """The flag that killed `step_id`, if one did.

        The watchdog's report can reach us a moment after the runner saw the
        tree die, so a latched engagement or a flag still present counts too.
        """
        with self._lock:
            reported = self._kills.get(step_id) or self._kills.get("*")
        if reported is not None:
            return reported
        if self.watchdog is not None:
            for engagement in self.watchdog.engagements():
                if engagement.scope == "global" or engagement.step_id == step_id:
                    return flag_name(engagement.flag)
        flag = engaged_flag(self.request.osr.path / "control", self.request.policy.kill_paths,
                            step_id)
        return flag_name(flag) if flag is not None else None

    def failure(self) -> HaiosError | None:
        """The error that must stop the run (the watchdog was lost), or None."""
        with self._lock:
            return self._lost

    def close(self) -> None:
        """Stop the watchdog."""
        if self.watchdog is not None:
            self.watchdog.close()

    # -- the watchdog's callbacks (its reader thread) --------------------------

    def _on_kill(self, report: KillReport) -> None:
        latency_ms = report.latency_seconds * 1000
        with self._lock:
            self._kills[report.step_id or "*"] = (
                f"{flag_name(report.flag)} (tree dead {latency_ms:.1f} ms after the flag was seen)")
        self.request.bus.publish(ev.Kill(scope=report.scope, flag=flag_name(report.flag),
                                 step_id=report.step_id, latency_seconds=report.latency_seconds,
                                 complete=report.complete))

    def _on_engaged(self, engagement: Engagement) -> None:
        self.request.bus.publish(ev.KillSwitch(engaged=True, flag=flag_name(engagement.flag),
                                 scope=engagement.scope))

    def _on_lost(self) -> None:
        """It died: kill every tree ourselves and fail closed."""
        with self._lock:
            self._lost = WatchdogLostError("the watchdog process died; every step tree "
                                           "was killed by the engine")
        if self.watchdog is not None:
            self.watchdog.kill_all_registered()


def flag_name(flag: str | None) -> str:
    """A flag's base name for records (never the os_root path)."""
    if not flag:
        return "engine_lost"
    return Path(flag.split(" ", 1)[0]).name
