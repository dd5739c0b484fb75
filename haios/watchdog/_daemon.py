# SPDX-License-Identifier: Apache-2.0
"""The watchdog process: watch flags and the engine, kill step trees.

One thread, one poll(2) loop over: the inotify descriptor (flags), the
command pipe from the engine (stdin), a pidfd of the engine, and stdout when
replies are queued. Every wake-up handles, in this order: commands (so the
engine's earlier `unregister` wins over a later flag), flag events, engine
liveness; and at a bounded interval a full lstat scan that also re-resolves
the watches.

Rules it keeps:
- A flag, once seen, is latched for the rest of the run: removing it never
  un-kills, and a flag that flickered still counts (attack catalog case 97).
- A global flag kills every registered step and every step registered later,
  at registration. A per-step flag kills only that step, now or when it
  registers.
- A killed step's cgroup is removed as soon as it is empty, so a process that
  tries to join it later (a step still starting) fails instead of running.
- Engine death (stdin EOF, or the engine's pidfd readable, whichever comes
  first) kills the whole run's cgroup, records it in the journal, and exits.
- Nothing it writes to the engine may block it: replies go through a queue
  written without blocking.

I/O: everything here is I/O; the decisions are small and commented.
"""

from __future__ import annotations

import os
import select
import stat
import sys
import time
from pathlib import Path
from typing import Final

from haios.errors import EXIT_ENVIRONMENT, HaiosError, InternalError
from haios.watchdog import cgroups, protocol
from haios.watchdog._harden import harden_process
from haios.watchdog._journal import Journal
from haios.watchdog._watch import FlagHit, FlagWatcher
from haios.watchdog.flags import check_extra_paths

EXIT_OK: Final = 0
EXIT_INCOMPLETE: Final = 1
EXIT_PROTOCOL: Final = 2

#: full lstat scans happen at least this often while inotify is on
INOTIFY_BACKSTOP_SECONDS: Final = 0.25
#: bounds accepted for the polling interval
MIN_POLL_SECONDS: Final = 0.001
MAX_POLL_SECONDS: Final = 1.0
#: how long the watchdog waits for its config line
CONFIG_TIMEOUT_SECONDS: Final = 10.0
#: how long one kill may wait for a tree to be gone before reporting it
KILL_TIMEOUT_SECONDS: Final = 5.0

_STDIN: Final = 0
_STDOUT: Final = 1
_READ_BYTES: Final = 64 * 1024


class _EngineLostError(Exception):
    """Internal signal: the engine is gone (EOF, pidfd, or a broken channel)."""

    def __init__(self, reason: str) -> None:
        """Remember why the engine counts as lost."""
        super().__init__(reason)
        self.reason = reason


class _Outbox:
    """Replies to the engine, written without ever blocking the watchdog."""

    def __init__(self) -> None:
        """Queue nothing yet; make stdout non-blocking."""
        self._pending = bytearray()
        self.broken = False
        os.set_blocking(_STDOUT, False)

    def send(self, message: protocol.Message) -> None:
        """Queue one message and try to write it now."""
        if self.broken:
            return
        self._pending += protocol.encode(message)
        self.flush()

    def wants_write(self) -> bool:
        """Return True while bytes wait for the pipe to drain."""
        return bool(self._pending) and not self.broken

    def flush(self) -> None:
        """Write as much of the queue as the pipe takes without blocking."""
        while self._pending and not self.broken:
            try:
                written = os.write(_STDOUT, self._pending)
            except BlockingIOError:
                return  # the engine is slow to read; poll for POLLOUT
            except BrokenPipeError:
                # The engine closed its end; stdin EOF or the pidfd tells the
                # loop whether it died. Replies are lost, the journal is not.
                self.broken = True
                self._pending.clear()
                return
            del self._pending[:written]


class _Daemon:
    """The state of one watchdog: registered steps, latched flags."""

    def __init__(self, config: protocol.Config, journal: Journal, outbox: _Outbox) -> None:
        """Set up the flag watcher and empty registries."""
        self.config = config
        self.journal = journal
        self.outbox = outbox
        self.run_cgroup = Path(config.run_cgroup)
        self.watcher = FlagWatcher(
            Path(config.control_dir),
            tuple(Path(p) for p in config.extra_paths),
            use_inotify=config.use_inotify,
        )
        self.registered: dict[str, Path] = {}
        self.stuck: dict[str, Path] = {}
        self.global_flag: str | None = None
        self.step_flags: dict[str, str] = {}
        self.inbuf = bytearray()
        self.incomplete = False

    # -- flags ---------------------------------------------------------------

    def handle_hits(self, hits: list[FlagHit], seen_at: float) -> None:
        """Latch each flag seen and kill what it covers."""
        for hit in hits:
            if hit.scope == protocol.SCOPE_GLOBAL:
                self._engage_global(hit.flag, seen_at)
            elif hit.step_id is not None:
                self._engage_step(hit.step_id, hit.flag, seen_at)

    def _engage_global(self, flag: str, seen_at: float) -> None:
        """Latch a global flag (once) and kill every registered step."""
        if self.global_flag is not None:
            return  # latched: every registered step is already dead
        self.global_flag = flag
        self.outbox.send(protocol.Engaged(scope="global", flag=flag, step_id=None))
        self._kill(list(self.registered), protocol.SCOPE_GLOBAL, flag, seen_at)

    def _engage_step(self, step_id: str, flag: str, seen_at: float) -> None:
        """Latch a per-step flag (once) and kill that step if registered."""
        if step_id in self.step_flags:
            return
        self.step_flags[step_id] = flag
        self.outbox.send(protocol.Engaged(scope="step", flag=flag, step_id=step_id))
        if step_id in self.registered:
            self._kill([step_id], protocol.SCOPE_STEP, flag, seen_at)

    def scan(self, now: float) -> None:
        """Run the backstop: re-resolve watches, lstat every flag, retry stuck kills."""
        self.watcher.refresh_watches()
        self.handle_hits(self.watcher.scan(self.registered), now)
        self._retry_stuck()

    def drain_inotify(self, now: float) -> None:
        """Handle queued inotify events; rescan when they say watches went stale."""
        hits, rescan = self.watcher.drain()
        self.handle_hits(hits, now)
        if rescan:
            self.scan(now)

    # -- killing -------------------------------------------------------------

    def _kill(self, step_ids: list[str], scope: str, flag: str | None, seen_at: float) -> None:
        """Kill these steps' trees in parallel; report and journal each."""
        paths = [self.registered.pop(s) for s in step_ids]
        if not paths:
            return
        outcomes = cgroups.kill_cgroups(paths, timeout_seconds=KILL_TIMEOUT_SECONDS)
        finished = time.monotonic()
        for step_id, outcome in zip(step_ids, outcomes, strict=True):
            emptied = outcome.emptied_at if outcome.emptied_at is not None else finished
            report = protocol.Killed(
                scope=scope,
                flag=flag,
                step_id=step_id,
                latency_seconds=max(0.0, emptied - seen_at),
                complete=outcome.complete,
                cpu_seconds=outcome.cpu_seconds,
            )
            # Report first (the engine is waiting on it), then make it durable.
            self.outbox.send(report)
            self._journal_kill(report, outcome)

    def _journal_kill(self, report: protocol.Killed, outcome: cgroups.KillOutcome) -> None:
        """Record one kill durably; remember a tree that is not gone yet."""
        if not outcome.removed:
            self.stuck[report.step_id] = outcome.path
            self.incomplete = True
        self.journal.append(
            "killed",
            scope=report.scope,
            flag=report.flag,
            step_id=report.step_id,
            cgroup=str(outcome.path),
            method=outcome.method,
            latency_seconds=report.latency_seconds,
            complete=report.complete,
            removed=outcome.removed,
            error=outcome.error,
        )

    def _retry_stuck(self) -> None:
        """Try again to empty and remove trees a kill could not finish."""
        for step_id, path in list(self.stuck.items()):
            outcome = cgroups.kill_cgroup(path, timeout_seconds=0.05)
            if outcome.removed:
                del self.stuck[step_id]
                self.journal.append("removed", step_id=step_id, cgroup=str(path))

    def kill_everything(self, reason: str) -> None:
        """Engine lost: kill the whole run cgroup, journal it."""
        seen_at = time.monotonic()
        step_ids = list(self.registered)
        paths = [self.registered.pop(s) for s in step_ids]
        outcomes = cgroups.kill_cgroups(paths, timeout_seconds=KILL_TIMEOUT_SECONDS)
        # Then the run's parent: it also holds any step cgroup the engine
        # created but had not registered when it died.
        run_outcome = cgroups.kill_cgroup(self.run_cgroup, timeout_seconds=KILL_TIMEOUT_SECONDS)
        steps = [
            self._report_engine_lost(step_id, outcome, seen_at)
            for step_id, outcome in zip(step_ids, outcomes, strict=True)
        ]
        self.incomplete = self.incomplete or not run_outcome.removed
        self.incomplete = self.incomplete or not all(o.complete for o in outcomes)
        self.journal.append(
            "engine_lost",
            reason=reason,
            steps=steps,
            run_cgroup=str(self.run_cgroup),
            run_cgroup_removed=run_outcome.removed,
            error=run_outcome.error,
        )

    def shutdown(self) -> None:
        """End the run: kill whatever is left in the run cgroup, journal it."""
        # Steps still registered at shutdown would outlive the run. They are
        # not reported as kills (no flag engaged); the journal records them.
        leftovers = sorted(self.registered)
        self.registered.clear()
        outcome = cgroups.kill_cgroup(self.run_cgroup, timeout_seconds=KILL_TIMEOUT_SECONDS)
        self.incomplete = self.incomplete or not outcome.removed
        self.journal.append(
            "stopped",
            killed_leftovers=leftovers,
            run_cgroup_removed=outcome.removed,
            error=outcome.error,
        )

    def _report_engine_lost(
        self, step_id: str, outcome: cgroups.KillOutcome, seen_at: float
    ) -> dict[str, object]:
        """Send the `killed` report of one tree (if anyone still listens); return its record."""
        emptied = outcome.emptied_at if outcome.emptied_at is not None else time.monotonic()
        latency = max(0.0, emptied - seen_at)
        self.outbox.send(
            protocol.Killed(
                scope=protocol.SCOPE_ENGINE_LOST,
                flag=None,
                step_id=step_id,
                latency_seconds=latency,
                complete=outcome.complete,
                cpu_seconds=outcome.cpu_seconds,
            )
        )
        return {
            "step_id": step_id,
            "cgroup": str(outcome.path),
            "latency_seconds": latency,
            "complete": outcome.complete,
            "error": outcome.error,
        }

    # -- commands ------------------------------------------------------------

    def read_commands(self, now: float) -> bool:
        """Read and handle every complete command line; True on `shutdown`."""
        while True:
            try:
                data = os.read(_STDIN, _READ_BYTES)
            except BlockingIOError:
                return False
            if not data:
                raise _EngineLostError("command pipe closed")
            self.inbuf += data
            if self._handle_lines(now):
                return True
            if len(self.inbuf) > protocol.MAX_LINE_BYTES:
                raise InternalError("command line from the engine is too long")

    def _handle_lines(self, now: float) -> bool:
        """Handle each complete line in the buffer; True on `shutdown`."""
        while (end := self.inbuf.find(b"\n")) >= 0:
            line = bytes(self.inbuf[:end])
            del self.inbuf[: end + 1]
            message = protocol.decode(line)
            if isinstance(message, protocol.Shutdown):
                return True
            if isinstance(message, protocol.Register):
                self.register(message, now)
            elif isinstance(message, protocol.Unregister):
                self.registered.pop(message.step_id, None)
            else:
                raise InternalError(f"unexpected {message.TYPE} message from the engine")
        return False

    def register(self, message: protocol.Register, now: float) -> None:
        """Accept (and check the flags for) or refuse one step; always answer."""
        refusal = self._registration_refusal(message)
        if refusal is not None:
            self.outbox.send(protocol.Refused(step_id=message.step_id, reason=refusal))
            return
        self.registered[message.step_id] = Path(message.cgroup)
        # A flag set (or seen) before the step registered must kill it now.
        if self.global_flag is not None:
            self._kill([message.step_id], protocol.SCOPE_GLOBAL, self.global_flag, now)
        elif message.step_id in self.step_flags:
            flag = self.step_flags[message.step_id]
            self._kill([message.step_id], protocol.SCOPE_STEP, flag, now)
        else:
            self.handle_hits(self.watcher.scan([message.step_id]), now)
        self.outbox.send(protocol.Registered(step_id=message.step_id))

    def _registration_refusal(self, message: protocol.Register) -> str | None:
        """Return why a registration is refused, or None to accept it."""
        if message.step_id in self.registered:
            return "step already registered"
        try:
            expected = self.run_cgroup / cgroups.step_cgroup_name(message.step_id)
        except HaiosError as e:
            return str(e)
        # Only this run's step cgroups: the watchdog must never be turned
        # against another cgroup (the engine's own, another run's).
        if Path(message.cgroup) != expected:
            return f"cgroup must be {expected}"
        try:
            info = os.lstat(expected)
        except OSError as e:
            return f"cgroup {expected}: {e.strerror}"
        if not stat.S_ISDIR(info.st_mode):
            return f"cgroup {expected} is not a directory"
        return None


# -- start-up -------------------------------------------------------------------


def _read_config() -> protocol.Config:
    """Read the first line from the engine, with a deadline."""
    deadline = time.monotonic() + CONFIG_TIMEOUT_SECONDS
    buf = bytearray()
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([_STDIN], [], [], max(0.0, remaining))
        if not ready:
            raise InternalError("no config from the engine")
        data = os.read(_STDIN, _READ_BYTES)
        if not data:
            raise _EngineLostError("command pipe closed before config")
        buf += data
        if len(buf) > protocol.MAX_LINE_BYTES:
            raise InternalError("config line too long")
    line, _, rest = bytes(buf).partition(b"\n")
    if rest:
        raise InternalError("the engine sent commands before ready")
    message = protocol.decode(line)
    if not isinstance(message, protocol.Config):
        raise InternalError("the first message must be config")
    _check_config(message)
    return message


def _check_config(config: protocol.Config) -> None:
    """Refuse a config whose paths or bounds are unsafe (InternalError)."""
    for name in ("control_dir", "journal_path", "run_cgroup"):
        if not Path(getattr(config, name)).is_absolute():
            raise InternalError(f"config {name} must be absolute")
    check_extra_paths([Path(p) for p in config.extra_paths])
    if not MIN_POLL_SECONDS <= config.poll_interval_seconds <= MAX_POLL_SECONDS:
        raise InternalError("config poll_interval_seconds out of bounds")
    run_cgroup = Path(config.run_cgroup)
    if run_cgroup.name != cgroups.run_cgroup_name(config.run_id):
        raise InternalError(f"run cgroup must be named {cgroups.run_cgroup_name(config.run_id)}")
    mount = cgroups.find_cgroup2_mount()
    if not run_cgroup.is_relative_to(mount) or run_cgroup == mount:
        raise InternalError(f"run cgroup must be below the cgroup2 mount {mount}")
    cgroups.kill_method(run_cgroup)


def _open_engine_pidfd(engine_pid: int) -> int:
    """Return a pidfd of the engine; raise if the engine is already gone."""
    try:
        pidfd = os.pidfd_open(engine_pid)
    except ProcessLookupError as e:
        raise _EngineLostError("engine gone before the watchdog started") from e
    # If the engine died before pidfd_open, its pid may already name another
    # process; being re-parented tells.
    if os.getppid() != engine_pid:
        os.close(pidfd)
        raise _EngineLostError("engine gone before the watchdog started")
    return pidfd


# -- the loop -------------------------------------------------------------------


def _loop(daemon: _Daemon, engine_pidfd: int) -> None:
    """Run until shutdown (returns) or engine loss (raises _EngineLostError)."""
    inotify_fd = daemon.watcher.fileno()
    # With inotify the scan is only a backstop; without it, it is the watch.
    interval = (
        daemon.config.poll_interval_seconds if inotify_fd is None else INOTIFY_BACKSTOP_SECONDS
    )
    poller = select.poll()
    poller.register(_STDIN, select.POLLIN)
    poller.register(engine_pidfd, select.POLLIN)
    if inotify_fd is not None:
        poller.register(inotify_fd, select.POLLIN)
    watching_stdout = False
    next_scan = time.monotonic()
    while True:
        if daemon.outbox.wants_write() != watching_stdout:
            watching_stdout = not watching_stdout
            if watching_stdout:
                poller.register(_STDOUT, select.POLLOUT)
            else:
                poller.unregister(_STDOUT)
        timeout_ms = max(0.0, next_scan - time.monotonic()) * 1000
        ready = {fd for fd, _ in poller.poll(timeout_ms)}
        now = time.monotonic()
        # Commands first: an `unregister` sent before a flag appeared must
        # take effect before that flag is acted on. Commands are rare and
        # cheap, so this costs the flag path nothing measurable.
        if _STDIN in ready and daemon.read_commands(now):
            return
        if inotify_fd in ready:
            daemon.drain_inotify(now)
        if engine_pidfd in ready:
            raise _EngineLostError("engine process exited")
        if now >= next_scan:
            daemon.scan(now)
            next_scan = now + interval
        daemon.outbox.flush()


def _serve(
    config: protocol.Config,
    journal: Journal,
    outbox: _Outbox,
    engine_pid: int,
    *,
    oom_protected: bool,
) -> int:
    """Announce ready, run the loop, and act on how it ended; return the exit status."""
    daemon = _Daemon(config, journal, outbox)
    try:
        engine_pidfd = _open_engine_pidfd(engine_pid)
        os.set_blocking(_STDIN, False)
        journal.append(
            "started",
            pid=os.getpid(),
            inotify=daemon.watcher.inotify_active,
            oom_protected=oom_protected,
        )
        outbox.send(protocol.Ready(pid=os.getpid(), inotify=daemon.watcher.inotify_active))
        _loop(daemon, engine_pidfd)
    except _EngineLostError as e:
        daemon.kill_everything(e.reason)
        return EXIT_INCOMPLETE if daemon.incomplete else EXIT_OK
    except InternalError as e:
        # A corrupted channel means the engine can no longer be trusted to
        # speak for its steps: fail closed as if it had died.
        daemon.kill_everything(f"protocol error: {e}")
        return EXIT_PROTOCOL
    except BaseException:
        # Anything unexpected: the trees must not outlive the watchdog.
        daemon.kill_everything("watchdog internal error")
        raise
    daemon.shutdown()
    return EXIT_INCOMPLETE if daemon.incomplete else EXIT_OK


def run() -> int:
    """Run the watchdog process until shutdown or engine loss.

    Returns:
        The process exit status: 0 after a clean shutdown or a complete
        engine-lost kill, 1 when a tree could not be fully killed, 2 on a
        protocol error, 6 when it could not start.

    Side Effects:
        Everything in this module: hardens the process, reads stdin, writes
        stdout and the journal, watches flags, kills and removes cgroups.
    """
    engine_pid = os.getppid()
    outbox = _Outbox()
    try:
        oom_protected = harden_process()
        config = _read_config()
        journal = Journal(Path(config.journal_path), config.run_id)
    except (HaiosError, _EngineLostError) as e:
        outbox.send(protocol.Failed(reason=str(e)))
        sys.stderr.write(f"haios watchdog: cannot start: {e}\n")
        return EXIT_ENVIRONMENT
    try:
        return _serve(config, journal, outbox, engine_pid, oom_protected=oom_protected)
    finally:
        journal.close()
