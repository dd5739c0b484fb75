# SPDX-License-Identifier: Apache-2.0
"""The engine side of one step: pipes, output caps, setup report, timeout, outcome.

After the init is forked (directly or by the launcher), `supervise` runs a
single poll loop in the calling thread:

- drains stdout and stderr into the step's capture descriptors, keeping at most
  `output_limit_bytes` of each and discarding the rest while still reading,
  so the step never blocks on a full pipe (T-S09);
- reads the close-on-exec report pipe: text means a setup stage failed
  (`SandboxSetupError`, the step never ran), EOF means setup is complete;
- enforces the wall-clock timeout and, with a cgroup, the CPU limit of the
  whole tree: SIGKILL to the init through its pidfd (the kernel then kills the
  whole PID namespace) and ``1`` into ``cgroup.kill``;
- waits for the init to be reaped, which happens only after every process
  of the namespace is gone, and turns what it saw into a `StepOutcome`.

Does I/O: writes the output descriptors, reads pipes and cgroup files, sends signals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import select
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from haios.errors import SandboxSetupError
from haios.sandbox import _child, rlimits
from haios.sandbox.spec import StepOutcome, StepSpec
from haios.sandbox.stepfs import StepMounts

READ_CHUNK_BYTES: Final = 65536
#: how often the CPU use of the step's cgroup is compared with its limit
CPU_POLL_SECONDS: Final = 0.1
#: after the init is reaped every writer is dead; this only bounds a bug
DRAIN_AFTER_EXIT_SECONDS: Final = 2.0


@dataclasses.dataclass(frozen=True)
class InitExit:
    """How the init ended, as its parent saw it.

    Attributes:
        status: the init's raw wait status.
        cpu_seconds: user + system CPU of the init and everything it reaped.
        max_rss_bytes: peak RSS of the largest process it reaped.
    """

    status: int
    cpu_seconds: float
    max_rss_bytes: int


@dataclasses.dataclass
class Spawned:
    """A running init, however it was forked.

    Attributes:
        pid: the init's pid in the engine's PID namespace.
        pidfd: a pidfd for race-free signalling.
        exit_fd: becomes readable when `collect` will not block.
        collect: returns the init's `InitExit` (reaps it).
    """

    pid: int
    pidfd: int
    exit_fd: int
    collect: Callable[[], InitExit]


@dataclasses.dataclass
class ParentEnds:
    """The engine's ends of the step's pipes."""

    stdout_r: int
    stderr_r: int
    report_r: int
    status_r: int

    def close(self) -> None:
        """Close all four.

        Side Effects:
            Closes descriptors.
        """
        for fd in (self.stdout_r, self.stderr_r, self.report_r, self.status_r):
            os.close(fd)


def open_pipes(mounts: StepMounts, egress_fd: int = -1) -> tuple[_child.ChildFds, ParentEnds]:
    """Four close-on-exec pipes, clones of the step's filesystems and a copy
    of its egress channel (when it has one) for the child.

    The engine's pipe ends are non-blocking. Every descriptor in the
    returned `ChildFds` is the runner's own (`close_child_ends` closes it);
    the caller keeps its `egress_fd`.

    Raises:
        SandboxSetupError: out of descriptors, or a mount cannot be cloned.

    Side Effects:
        Creates pipes, detached mount clones and a duplicate descriptor.
    """
    made: list[tuple[int, int]] = []
    try:
        for _ in range(4):
            made.append(os.pipe2(os.O_CLOEXEC))
    except OSError as exc:
        for read_end, write_end in made:
            os.close(read_end)
            os.close(write_end)
        raise SandboxSetupError(f"cannot create pipes ({exc.strerror})") from exc
    try:
        clones = mounts.clone_fds()
    except BaseException:
        for read_end, write_end in made:
            os.close(read_end)
            os.close(write_end)
        raise
    channel = -1
    if egress_fd >= 0:
        try:
            channel = fcntl.fcntl(egress_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        except OSError as exc:
            for fd in [fd for pair in made for fd in pair] + [fd for fd in clones if fd >= 0]:
                os.close(fd)
            raise SandboxSetupError(f"cannot pass the egress channel ({exc.strerror})") from exc
    for read_end, _ in made:
        os.set_blocking(read_end, False)
    writes = [write_end for _, write_end in made]
    child = _child.ChildFds(writes[0], writes[1], writes[2], writes[3], *clones, egress=channel)
    parent = ParentEnds(*(read_end for read_end, _ in made))
    return child, parent


def close_child_ends(pipes: _child.ChildFds) -> None:
    """Close the engine's copies of the child's pipe ends.

    Side Effects:
        Closes descriptors.
    """
    for fd in dataclasses.astuple(pipes):
        if fd >= 0:
            os.close(fd)


class _Sink:
    """Writes at most `limit` bytes of a stream to a file, drops the rest."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.remaining = limit
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        kept = data[: self.remaining]
        self.dropped += len(data) - len(kept)
        self.remaining -= len(kept)
        view = memoryview(kept)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


def read_cgroup_counter(cgroup: Path | None, filename: str, key: str) -> int | None:
    """One counter of a cgroup flat-keyed file (cpu.stat, memory.events...).

    Returns:
        The value, or None without a cgroup or when the file/key is absent
        (controller not enabled).

    Side Effects:
        Reads a cgroup file.
    """
    if cgroup is None:
        return None
    try:
        text = (cgroup / filename).read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.isdigit():
            return int(value)
    return None


def kill_tree(pidfd: int, cgroup: Path | None) -> None:
    """SIGKILL the init (the kernel kills its PID namespace) and the cgroup.

    Side Effects:
        Sends SIGKILL; writes cgroup.kill.
    """
    # ProcessLookupError: already dead (maybe reaped), its namespace is gone too.
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if cgroup is not None:
        # cgroup.kill is a second line of defence (absent before Linux 5.14);
        # the namespace kill above already reaches every process of the step.
        with contextlib.suppress(OSError):
            (cgroup / "cgroup.kill").write_text("1", encoding="ascii")


@dataclasses.dataclass
class _Loop:
    """Mutable state of one supervision loop."""

    spec: StepSpec
    spawned: Spawned
    ends: ParentEnds
    sinks: dict[int, _Sink]
    started: float
    cpu_limit_seconds: int
    cpu_start_usec: int | None
    poller: select.poll = dataclasses.field(default_factory=select.poll)
    open_fds: set[int] = dataclasses.field(default_factory=set)
    report: bytearray = dataclasses.field(default_factory=bytearray)
    setup_done: bool = False
    exited: InitExit | None = None
    timed_out: bool = False
    cpu_killed: bool = False
    killed: bool = False

    def watch(self, fd: int) -> None:
        self.poller.register(fd, select.POLLIN)
        self.open_fds.add(fd)

    def unwatch(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.open_fds.discard(fd)

    def kill(self) -> None:
        if not self.killed:
            self.killed = True
            kill_tree(self.spawned.pidfd, self.spec.cgroup)

    def on_readable(self, fd: int) -> None:
        if fd == self.spawned.exit_fd:
            self.unwatch(fd)
            self.exited = self.spawned.collect()
            return
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        if not data:
            self.unwatch(fd)
            if fd == self.ends.report_r:
                self.setup_done = True
            return
        if fd == self.ends.report_r:
            self.report += data[: 4096 - len(self.report)]
        else:
            self.sinks[fd].feed(data)

    def check_limits(self, now: float) -> None:
        if now - self.started >= self.spec.timeout_seconds:
            self.timed_out = True
            self.kill()
        if self.cpu_start_usec is not None:
            usage = read_cgroup_counter(self.spec.cgroup, "cpu.stat", "usage_usec")
            if (
                usage is not None
                and usage - self.cpu_start_usec >= self.cpu_limit_seconds * 1_000_000
            ):
                self.cpu_killed = True
                self.kill()

    def next_timeout_ms(self, now: float) -> int:
        remaining = self.spec.timeout_seconds - (now - self.started)
        if self.cpu_start_usec is not None:
            remaining = min(remaining, CPU_POLL_SECONDS)
        return max(0, int(remaining * 1000) + 1)

    def run_until_exit(self) -> None:
        while self.exited is None:
            now = time.monotonic()
            if not self.killed:
                self.check_limits(now)
            timeout = None if self.killed else self.next_timeout_ms(now)
            for fd, _events in self.poller.poll(timeout):
                if fd in self.open_fds:
                    self.on_readable(fd)

    def drain(self) -> None:
        deadline = time.monotonic() + DRAIN_AFTER_EXIT_SECONDS
        while self.open_fds and time.monotonic() < deadline:
            for fd, _events in self.poller.poll(100):
                if fd in self.open_fds:
                    self.on_readable(fd)


def _read_status(fd: int) -> int | None:
    try:
        data = os.read(fd, 16)
    except BlockingIOError:
        return None
    size = struct.calcsize(_child.STATUS_FORMAT)
    if len(data) != size:
        return None
    status: int = struct.unpack(_child.STATUS_FORMAT, data)[0]
    return status


def _violation(
    loop: _Loop, signum: int | None, cpu_seconds: float, events: dict[str, int | None]
) -> str | None:
    if loop.timed_out:
        return None
    if signum == signal.SIGSYS:
        return "seccomp"
    if signum == signal.SIGXCPU or loop.cpu_killed:
        return "cpu_limit"
    if signum == signal.SIGKILL and cpu_seconds >= loop.cpu_limit_seconds:
        return "cpu_limit"
    if signum == signal.SIGXFSZ:
        return "file_size"
    before_oom, after_oom = events["oom_before"], events["oom_after"]
    if before_oom is not None and after_oom is not None and after_oom > before_oom:
        return "memory"
    before_pids, after_pids = events["pids_before"], events["pids_after"]
    if before_pids is not None and after_pids is not None and after_pids > before_pids:
        return "processes"
    return None


def _outcome(loop: _Loop, exit_info: InitExit, events: dict[str, int | None]) -> StepOutcome:
    status = _read_status(loop.ends.status_r)
    if status is None:
        # The init did not report: it was killed (timeout, CPU, kill switch).
        if not os.WIFSIGNALED(exit_info.status) and not loop.killed:
            raise SandboxSetupError(
                f"step {loop.spec.step_id}: sandbox init exited with status "
                f"{exit_info.status} without a report"
            )
        status = exit_info.status if os.WIFSIGNALED(exit_info.status) else signal.SIGKILL
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    cpu_seconds = exit_info.cpu_seconds
    usage = read_cgroup_counter(loop.spec.cgroup, "cpu.stat", "usage_usec")
    if usage is not None and loop.cpu_start_usec is not None:
        # cgroup accounting also counts descendants the init never reaped.
        cpu_seconds = max(cpu_seconds, (usage - loop.cpu_start_usec) / 1_000_000)
    return StepOutcome(
        exit_code=exit_code,
        signal=signum,
        timed_out=loop.timed_out,
        violation=_violation(loop, signum, cpu_seconds, events),
        cpu_seconds=cpu_seconds,
        wall_seconds=time.monotonic() - loop.started,
        max_rss_bytes=exit_info.max_rss_bytes,
    )


def supervise(
    spec: StepSpec,
    spawned: Spawned,
    ends: ParentEnds,
    outputs: tuple[int, int],
    *,
    started: float,
    on_start: Callable[[int], None] | None,
) -> StepOutcome:
    """Run one step's supervision loop to completion.

    Args:
        spec: the step.
        spawned: the running init.
        ends: the engine's pipe ends.
        outputs: descriptors of the stdout and stderr files.
        started: `time.monotonic()` when the launch began.
        on_start: called with the init's pid right after the fork.

    Returns:
        The outcome, once every process of the step is gone.

    Raises:
        SandboxSetupError: a setup stage failed (the step never ran).

    Side Effects:
        Reads pipes, writes the output files, may kill the tree.
    """
    events = {
        "oom_before": read_cgroup_counter(spec.cgroup, "memory.events", "oom_kill"),
        "pids_before": read_cgroup_counter(spec.cgroup, "pids.events", "max"),
    }
    loop = _Loop(
        spec=spec,
        spawned=spawned,
        ends=ends,
        sinks={
            ends.stdout_r: _Sink(outputs[0], spec.output_limit_bytes),
            ends.stderr_r: _Sink(outputs[1], spec.output_limit_bytes),
        },
        started=started,
        cpu_limit_seconds=rlimits.effective_cpu_seconds(
            spec.profile.rlimits, spec.cpu_seconds_limit
        ),
        cpu_start_usec=read_cgroup_counter(spec.cgroup, "cpu.stat", "usage_usec"),
    )
    for fd in (ends.stdout_r, ends.stderr_r, ends.report_r, spawned.exit_fd):
        loop.watch(fd)
    try:
        if on_start is not None:
            on_start(spawned.pid)
        loop.run_until_exit()
    finally:
        if loop.exited is None:
            # on_start raised, or an unexpected error: never leave a tree behind.
            loop.kill()
            loop.exited = spawned.collect()
    loop.drain()
    if loop.report:
        raise SandboxSetupError(
            f"step {spec.step_id}: sandbox setup failed: {loop.report.decode(errors='replace')}"
        )
    events["oom_after"] = read_cgroup_counter(spec.cgroup, "memory.events", "oom_kill")
    events["pids_after"] = read_cgroup_counter(spec.cgroup, "pids.events", "max")
    return _outcome(loop, loop.exited, events)
