# SPDX-License-Identifier: Apache-2.0
"""The engine's side of the watchdog: start it, register steps, hear kills.

`Watchdog.start` creates the run's parent cgroup, spawns the watchdog as a
separate process in its own session (`python -I -S`, so neither the
environment nor site-packages shape it), sends it its configuration and
waits for `ready`. The spawn needs nothing of the run, so `haios run` does
it first (`PendingWatchdog.spawn`) and hands the process to `start`: its
interpreter starts while the engine imports and verifies. A reader thread
then delivers the watchdog's messages to the engine's callbacks. The engine
keeps the write end of the watchdog's stdin: when the engine dies for any
reason the pipe closes and the watchdog kills every step tree of the run
(one not configured yet only exits).

The engine's sequence (docs/watchdog.md section 2): `global_flag_present`
before anything (exit 4); `Watchdog.start`; per step `create_step_cgroup`,
`register` (a returned report means the step was killed: do not start it),
run, `unregister`, `remove_step_cgroup`; `close`. On `on_lost` the engine
calls `kill_all_registered()` and stops with `WatchdogLostError` (exit 6;
contract section 12).

What it does not do: it does not record kills in state or the audit log (the
engine does, from `on_kill`), and does not run steps. I/O: spawns a process,
pipes, cgroup directories, one thread (and a timer while a spawned watchdog
waits to be taken).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Self

import haios
from haios._util.process import wait_exited
from haios.errors import (
    EnvironmentUnavailableError,
    HaiosError,
    InternalError,
    WatchdogLostError,
)
from haios.watchdog import cgroups, protocol
from haios.watchdog.flags import check_extra_paths, global_flag_present, step_flag_present

__all__ = [
    "DEFAULT_POLL_SECONDS",
    "Engagement",
    "KillReport",
    "PendingWatchdog",
    "Watchdog",
    "global_flag_present",
    "step_flag_present",
]

#: polling period when inotify is off or unavailable (bounded 1 ms .. 1 s)
DEFAULT_POLL_SECONDS: Final = 0.02
#: how long `start` waits for `ready`
DEFAULT_START_TIMEOUT_SECONDS: Final = 10.0
# A register may wait behind a kill in progress (bounded by the watchdog's
# 5 s kill deadline), so its answer gets more than that.
DEFAULT_REGISTER_TIMEOUT_SECONDS: Final = 15.0
DEFAULT_CLOSE_TIMEOUT_SECONDS: Final = 15.0
#: a watchdog spawned ahead that no run took by then is killed: well before
#: it stops waiting for its config (`_daemon.CONFIG_TIMEOUT_SECONDS`, 10 s)
#: and says so on the engine's stderr; `start` then spawns a fresh one
PENDING_MAX_AGE_SECONDS: Final = 5.0

# Run by `python -I -S -c`: -I ignores PYTHON* variables, the user site and
# the current directory; -S skips site-packages (the watchdog needs only the
# standard library). The haios package is found where the engine found it.
_BOOTSTRAP: Final = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from haios.watchdog.__main__ import exit_process, main; exit_process(main())"
)
_READ_BYTES: Final = 64 * 1024


@dataclasses.dataclass(frozen=True)
class KillReport:
    """One step tree the watchdog killed.

    Attributes:
        scope: "global", "step" or "engine_lost" (`haios_kills_total` labels).
        flag: the flag's path that caused it (with the reason when it could
            not be examined); None for engine_lost.
        step_id: the killed step.
        latency_seconds: from the watchdog seeing the flag (or the step
            registering while a flag was latched) to the step cgroup
            reporting `populated 0` (`haios_kill_latency_seconds`).
        complete: False when the tree was not empty by the watchdog's kill
            deadline (a process in uninterruptible sleep); the watchdog keeps
            retrying and the engine should alert.
        cpu_seconds: the tree's CPU time from cgroup accounting, or None.
    """

    scope: str
    flag: str | None
    step_id: str
    latency_seconds: float
    complete: bool
    cpu_seconds: float | None


@dataclasses.dataclass(frozen=True)
class Engagement:
    """A flag the watchdog saw; latched for the rest of the run.

    Attributes:
        scope: "global" or "step".
        flag: the flag's path.
        step_id: the step a per-step flag names (registered or not), else None.
    """

    scope: str
    flag: str
    step_id: str | None


KillCallback = Callable[[KillReport], None]
LostCallback = Callable[[], None]
EngagedCallback = Callable[[Engagement], None]


@dataclasses.dataclass
class _Waiter:
    """One `register` waiting for its answer."""

    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    refusal: str | None = None


class PendingWatchdog:
    """A watchdog process spawned ahead of its run, waiting for its config.

    Most of a watchdog's start-up is its interpreter's, and the process
    takes nothing of the run until its config, so `haios run` spawns it
    before importing the engine and `Watchdog.start(process=...)` takes it
    over. Until then `discard` kills and reaps it (idempotent, and a no-op
    once taken). A timer discards it after `PENDING_MAX_AGE_SECONDS`.
    Thread-safe.
    """

    def __init__(self, process: subprocess.Popen[bytes], *,
                 max_age_seconds: float = PENDING_MAX_AGE_SECONDS) -> None:
        """Hold a spawned watchdog; use `PendingWatchdog.spawn` instead."""
        self._process: subprocess.Popen[bytes] | None = process
        self._pid = process.pid
        self._lock = threading.Lock()
        self._timer = threading.Timer(max_age_seconds, self.discard)
        self._timer.daemon = True
        self._timer.start()

    @classmethod
    def spawn(cls, *, max_age_seconds: float = PENDING_MAX_AGE_SECONDS) -> PendingWatchdog:
        """Spawn a watchdog process now; it waits for its config.

        Raises:
            OSError: the interpreter could not be started.

        Side Effects:
            Forks and executes the Python interpreter; starts a timer thread.
        """
        return cls(_spawn(), max_age_seconds=max_age_seconds)

    @property
    def pid(self) -> int:
        """The spawned process's pid (it may be gone)."""
        return self._pid

    def take(self) -> subprocess.Popen[bytes] | None:
        """Hand the process over; None if it was discarded or has exited.

        Side Effects:
            Reaps the process if it exited.
        """
        with self._lock:
            process, self._process = self._process, None
        self._timer.cancel()
        if process is not None and process.poll() is not None:
            _reap(process)
            return None
        return process

    def discard(self) -> None:
        """Kill and reap the process unless it was taken.

        Side Effects:
            Sends SIGKILL, waits, closes the pipes.
        """
        with self._lock:
            process, self._process = self._process, None
        self._timer.cancel()
        if process is not None:
            _reap(process)


class Watchdog:
    """A running watchdog process and the engine's channel to it.

    Thread-safe: `register`, `unregister` and the queries may be called from
    several engine threads (`--jobs N`). Callbacks run on the reader thread
    ("haios-watchdog-reader"), one at a time, in the order the watchdog sent
    them; they must return quickly and must not call `close()`.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        run_cgroup: Path,
        *,
        on_kill: KillCallback,
        on_lost: LostCallback,
        on_engaged: EngagedCallback | None,
    ) -> None:
        """Wrap a spawned watchdog; use `Watchdog.start` instead."""
        self._process = process
        self._run_cgroup = run_cgroup
        self._on_kill = on_kill
        self._on_lost = on_lost
        self._on_engaged = on_engaged
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._ready = threading.Event()
        self._ready_message: protocol.Ready | None = None
        self._start_failure: str | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._registered: dict[str, Path] = {}
        self._kills: dict[str, KillReport] = {}
        self._engagements: list[Engagement] = []
        self._lost = False
        self._closing = False
        self._closed = False
        self._reader = threading.Thread(
            target=self._read_loop, name="haios-watchdog-reader", daemon=True
        )

    # -- starting ------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        control_dir: Path,
        extra_paths: Sequence[Path],
        journal_path: Path,
        run_id: str,
        on_kill: KillCallback,
        on_lost: LostCallback,
        on_engaged: EngagedCallback | None = None,
        cgroup_root: Path | None = None,
        disable_inotify: bool = False,
        poll_interval_seconds: float = DEFAULT_POLL_SECONDS,
        start_timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS,
        process: PendingWatchdog | None = None,
    ) -> Watchdog:
        """Create the run cgroup, spawn the watchdog, wait until it watches.

        Args:
            control_dir: `<os_root>/control` (need not exist yet).
            extra_paths: the policy's operator-wide flag paths (absolute).
            journal_path: the watchdog's journal (created mode 0600 if absent;
                must not be a symlink or special file). Keep it outside
                os_root, where only the engine writes.
            run_id: unique id of this run; names the cgroup `haios-<run_id>`.
            on_kill: called for every killed step tree.
            on_lost: called once if the watchdog dies while the run goes on.
            on_engaged: called for every flag the watchdog sees, if given.
            cgroup_root: cgroup directory to create the run cgroup in; the
                cgroup2 mount point when None.
            disable_inotify: poll only (tests; file systems without inotify).
            poll_interval_seconds: polling period without inotify.
            start_timeout_seconds: how long to wait for `ready`.
            process: a watchdog spawned ahead, taken over here (killed on
                any failure); one discarded or dead is replaced by a fresh
                spawn, as is None.

        Returns:
            The running watchdog.

        Raises:
            PolicyLoadError: an extra path is not absolute.
            InputError: `run_id` is not a valid cgroup name.
            EnvironmentUnavailableError: no cgroup2 hierarchy, the run cgroup
                exists or cannot be created, or the watchdog failed to start
                or to answer in time (nothing is left behind).

        Side Effects:
            Creates a cgroup directory, spawns a process, starts a thread.
        """
        spawned = process.take() if process is not None else None
        try:
            extra = check_extra_paths(extra_paths)
            run_cgroup = cgroups.create_run_cgroup(run_id, root=cgroup_root)
        except BaseException:
            if spawned is not None:
                _reap(spawned)
            raise
        config = protocol.Config(
            version=protocol.PROTOCOL_VERSION,
            run_id=run_id,
            control_dir=str(control_dir.absolute()),
            extra_paths=tuple(str(p) for p in extra),
            journal_path=str(journal_path.absolute()),
            run_cgroup=str(run_cgroup),
            poll_interval_seconds=poll_interval_seconds,
            use_inotify=not disable_inotify,
        )
        if spawned is None:
            try:
                spawned = _spawn()
            except OSError as e:
                cgroups.remove_cgroup(run_cgroup)
                raise EnvironmentUnavailableError(f"cannot start the watchdog: {e}") from e
        watchdog = cls(spawned, run_cgroup, on_kill=on_kill, on_lost=on_lost, on_engaged=on_engaged)
        watchdog._await_ready(config, start_timeout_seconds)
        return watchdog

    def _await_ready(self, config: protocol.Config, timeout_seconds: float) -> None:
        """Start the reader, send the config, wait for `ready`; clean up on failure."""
        self._reader.start()
        # A send failure means the watchdog already died; the reader thread
        # records why, and the wait below reports it.
        with contextlib.suppress(WatchdogLostError):
            self._send(config)
        if self._ready.wait(timeout_seconds) and self._ready_message is not None:
            return
        reason = self._start_failure or "no answer in time"
        self._abort_start()
        raise EnvironmentUnavailableError(f"the watchdog did not start: {reason}")

    def _abort_start(self) -> None:
        """Kill the half-started watchdog and remove the run cgroup."""
        with self._lock:
            self._closing = True
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._close_stdin()
        self._reader.join()
        self._close_stdout()
        cgroups.remove_cgroup(self._run_cgroup)

    # -- properties and queries ---------------------------------------------

    @property
    def pid(self) -> int:
        """The watchdog process's pid."""
        return self._process.pid

    @property
    def run_cgroup(self) -> Path:
        """The run's parent cgroup; step cgroups are created below it."""
        return self._run_cgroup

    @property
    def inotify(self) -> bool:
        """True when the watchdog watches with inotify (else it polls)."""
        return self._ready_message is not None and self._ready_message.inotify

    def alive(self) -> bool:
        """Return True while the watchdog process runs and its channel works."""
        with self._lock:
            lost = self._lost
        return not lost and self._process.poll() is None

    def engagements(self) -> tuple[Engagement, ...]:
        """Return every flag the watchdog has seen so far, in order."""
        with self._lock:
            return tuple(self._engagements)

    def global_engaged(self) -> str | None:
        """Return the first global flag the watchdog saw, or None.

        The engine checks this before starting each step: a latched global
        flag means no further step starts (contract section 7).
        """
        with self._lock:
            for engagement in self._engagements:
                if engagement.scope == protocol.SCOPE_GLOBAL:
                    return engagement.flag
        return None

    # -- steps -----------------------------------------------------------------

    def create_step_cgroup(self, step_id: str) -> Path:
        """Create `step-<step_id>` under the run cgroup (for `StepSpec.cgroup`).

        Raises:
            InputError: `step_id` is not a valid step id.
            EnvironmentUnavailableError: it exists or cannot be created.

        Side Effects:
            Creates a cgroup directory.
        """
        return cgroups.create_step_cgroup(self._run_cgroup, step_id)

    def register(
        self,
        step_id: str,
        cgroup: Path,
        *,
        timeout_seconds: float = DEFAULT_REGISTER_TIMEOUT_SECONDS,
    ) -> KillReport | None:
        """Put a step under the watchdog; call before the step starts.

        The watchdog checks the flags at once: if a global flag is latched
        or the step's own flag is set (or was seen), it kills the cgroup and
        removes it, so the step's first process cannot join it, and this
        returns the report (also delivered to `on_kill` before this returns).

        Args:
            step_id: the step's id.
            cgroup: the directory from `create_step_cgroup(step_id)`.
            timeout_seconds: how long to wait for the watchdog's answer.

        Returns:
            None when the step may start; its `KillReport` when it was killed
            on registration (do not start it: it is `killed`).

        Raises:
            WatchdogLostError: the watchdog is gone or did not answer.
            EnvironmentUnavailableError: the watchdog refused the step (the
                cgroup is not this run's `step-<step_id>`); do not start it.

        Side Effects:
            Writes to the watchdog's pipe and waits for its answer.
        """
        waiter = _Waiter()
        with self._lock:
            if self._lost:
                raise WatchdogLostError("the watchdog is gone")
            if step_id in self._waiters:
                raise InternalError(f"step {step_id} is already being registered")
            self._waiters[step_id] = waiter
            self._registered[step_id] = cgroup
        try:
            self._send(protocol.Register(step_id=step_id, cgroup=str(cgroup)))
            if not waiter.done.wait(timeout_seconds):
                raise WatchdogLostError("the watchdog did not answer a registration")
        finally:
            with self._lock:
                self._waiters.pop(step_id, None)
        with self._lock:
            if waiter.refusal is not None:
                self._registered.pop(step_id, None)
                raise EnvironmentUnavailableError(
                    f"the watchdog refused step {step_id}: {waiter.refusal}"
                )
            if self._lost:
                raise WatchdogLostError("the watchdog is gone")
            return self._kills.get(step_id)

    def unregister(self, step_id: str) -> None:
        """Take a finished step off the watchdog (its tree is no longer killed).

        Raises:
            WatchdogLostError: the watchdog is gone.

        Side Effects:
            Writes to the watchdog's pipe.
        """
        with self._lock:
            self._registered.pop(step_id, None)
        self._send(protocol.Unregister(step_id=step_id))

    def remove_step_cgroup(self, cgroup: Path) -> None:
        """Remove a step's cgroup after the step ended (kills any leftover).

        Raises:
            EnvironmentUnavailableError: it could not be emptied or removed.

        Side Effects:
            May write `cgroup.kill`; removes the cgroup directory.
        """
        cgroups.remove_cgroup(cgroup)

    def kill_all_registered(self) -> dict[str, cgroups.KillOutcome]:
        """Kill every step tree of the run from the engine itself.

        For when the watchdog is lost (`on_lost`): the engine must then kill
        every running step tree and stop (exit 6). Kills the registered
        steps' cgroups in parallel, then the whole run cgroup (which also
        holds any step cgroup not registered yet), and removes them.

        Returns:
            The outcome per registered step id (`complete`, `emptied_at`).

        Side Effects:
            Writes `cgroup.kill`, removes cgroup directories.
        """
        with self._lock:
            registered = dict(self._registered)
            self._registered.clear()
        outcomes = cgroups.kill_cgroups(registered.values())
        cgroups.kill_cgroup(self._run_cgroup)
        return dict(zip(registered, outcomes, strict=True))

    # -- closing ---------------------------------------------------------------

    def close(self, *, timeout_seconds: float = DEFAULT_CLOSE_TIMEOUT_SECONDS) -> None:
        """Shut the watchdog down, wait for it, remove the run cgroup.

        Anything still registered is killed (by the watchdog, and again here
        if it could not). Idempotent; must not be called from a callback.

        Raises:
            EnvironmentUnavailableError: the run cgroup could not be emptied
                and removed (a process of the run may survive).

        Side Effects:
            Writes to and closes the pipe, waits for (or kills) the watchdog
            process, joins the reader thread, removes cgroups.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing = True
        # Already gone is fine here: the cgroup cleanup below still runs.
        with contextlib.suppress(WatchdogLostError):
            self._send(protocol.Shutdown())
        self._close_stdin()
        if not wait_exited(self._process, timeout_seconds):
            self._process.kill()
            self._process.wait()
        if threading.current_thread() is not self._reader:
            self._reader.join()
            self._close_stdout()
        cgroups.remove_cgroup(self._run_cgroup)

    def __enter__(self) -> Self:
        """Use as a context manager: `close()` on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the watchdog (see `close`)."""
        self.close()

    # -- the pipe --------------------------------------------------------------

    def _send(self, message: protocol.Message) -> None:
        """Write one message to the watchdog; WatchdogLostError if the pipe is gone."""
        data = protocol.encode(message)
        stdin = self._process.stdin
        if stdin is None:
            raise WatchdogLostError("the watchdog's pipe is closed")
        with self._write_lock:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(stdin.fileno(), view)
                    view = view[written:]
            except (BrokenPipeError, ValueError) as e:
                # ValueError: the pipe object was closed by close().
                raise WatchdogLostError("the watchdog's pipe is closed") from e

    def _close_stdin(self) -> None:
        """Close the command pipe (the watchdog reads EOF)."""
        with self._write_lock:
            stdin = self._process.stdin
            if stdin is not None and not stdin.closed:
                stdin.close()

    def _close_stdout(self) -> None:
        """Close the reply pipe once the reader thread is done with it."""
        stdout = self._process.stdout
        if stdout is not None and not stdout.closed:
            stdout.close()

    def _read_loop(self) -> None:
        """Reader thread: dispatch each line; EOF or garbage = watchdog lost.

        However the loop ends (EOF, a malformed line, a callback raising),
        the watchdog counts as lost from then on: nobody would hear its kill
        reports any more, so the engine must fail closed.
        """
        reason = "the watchdog closed its pipe"
        try:
            self._read_messages()
        except (HaiosError, OSError) as e:
            reason = f"watchdog channel broken: {e}"
        except BaseException as e:
            reason = f"watchdog reader failed: {e!r}"
            raise
        finally:
            self._mark_lost(reason)

    def _read_messages(self) -> None:
        """Read lines from the watchdog and dispatch them until EOF."""
        stdout = self._process.stdout
        buffer = bytearray()
        while stdout is not None:
            data = os.read(stdout.fileno(), _READ_BYTES)
            if not data:
                return
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                self._dispatch(protocol.decode(line))
            if len(buffer) > protocol.MAX_LINE_BYTES:
                raise InternalError("watchdog message too long")

    def _mark_lost(self, reason: str) -> None:
        """Record the loss, wake every waiter, and tell the engine if it matters."""
        with self._lock:
            self._lost = True
            closing = self._closing
            waiters = list(self._waiters.values())
            was_ready = self._ready_message is not None
            if not was_ready:
                self._start_failure = self._start_failure or reason
        for waiter in waiters:
            waiter.done.set()
        self._ready.set()
        if was_ready and not closing:
            self._on_lost()

    def _dispatch(self, message: protocol.Message) -> None:
        """Route one message from the watchdog to its handler."""
        if isinstance(message, protocol.Ready | protocol.Failed):
            self._on_start_answer(message)
        elif self._ready_message is None:
            raise InternalError(f"watchdog sent {message.TYPE} before ready")
        elif isinstance(message, protocol.Killed):
            self._on_killed(message)
        elif isinstance(message, protocol.Engaged):
            engagement = Engagement(message.scope, message.flag, message.step_id)
            with self._lock:
                self._engagements.append(engagement)
            if self._on_engaged is not None:
                self._on_engaged(engagement)
        elif isinstance(message, protocol.Registered | protocol.Refused):
            self._on_register_answer(message)
        else:
            raise InternalError(f"unexpected {message.TYPE} message from the watchdog")

    def _on_start_answer(self, message: protocol.Ready | protocol.Failed) -> None:
        """Handle `ready` or `failed` (only as the first message)."""
        if self._ready.is_set():
            raise InternalError(f"unexpected {message.TYPE} message from the watchdog")
        if isinstance(message, protocol.Failed):
            with self._lock:
                self._start_failure = message.reason
            raise InternalError(f"watchdog failed: {message.reason}")
        self._ready_message = message
        self._ready.set()

    def _on_killed(self, message: protocol.Killed) -> None:
        """Record a kill report and deliver it to `on_kill`."""
        report = KillReport(
            scope=message.scope,
            flag=message.flag,
            step_id=message.step_id,
            latency_seconds=message.latency_seconds,
            complete=message.complete,
            cpu_seconds=message.cpu_seconds,
        )
        with self._lock:
            self._kills[report.step_id] = report
            self._registered.pop(report.step_id, None)
        self._on_kill(report)

    def _on_register_answer(self, message: protocol.Registered | protocol.Refused) -> None:
        """Wake the `register` call waiting for this step."""
        with self._lock:
            waiter = self._waiters.get(message.step_id)
        if waiter is None:
            raise InternalError(f"unexpected answer for step {message.step_id}")
        if isinstance(message, protocol.Refused):
            waiter.refusal = message.reason
        waiter.done.set()


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Kill a watchdog that never watched (it holds nothing yet), reap it, close its pipes."""
    process.kill()  # a no-op once reaped
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


def _spawn() -> subprocess.Popen[bytes]:
    """Start the watchdog process.

    Side Effects:
        Forks and executes the Python interpreter.
    """
    package_root = str(Path(haios.__file__).resolve().parent.parent)
    # A fixed argv: this interpreter and this package, no shell.
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, package_root],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        close_fds=True,
        # Its own session: no terminal signal (Ctrl-C, hang-up) that reaches
        # the engine's process group reaches the watchdog.
        start_new_session=True,
        cwd="/",
        env={},
        bufsize=0,
    )
