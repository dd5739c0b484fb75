# SPDX-License-Identifier: Apache-2.0
"""Engine overhead per step and startup, beside bwrap, posix_spawn and the bare launcher.

Engine overhead per step and at startup. One invocation measures, side by side:

- startup: a signed 1-step plan of ``/bin/true`` run end to end through the
  real ``haios run`` CLI (a fresh process each time; median of
  `--startup-runs`), with ``--jobs 1`` and ``--jobs 2``;
- the marginal engine overhead per step of N-step plans (default N = 10, 100
  and 1,000; ``--quick``: 10 and 100), each step ``/bin/true`` needing the
  previous one (a chain), with ``--jobs 1`` and ``--jobs 2``:
  marginal = (time(N) - time(1)) / (N - 1), time(1) being the startup median
  with the same ``--jobs``;
- the peers, each launching ``/bin/true`` `--count` times, interleaved in
  rounds, half before and half after the plans so that drift hits both:
  ``bwrap --unshare-all --die-with-parent --ro-bind / / true``,
  ``os.posix_spawn`` of ``/bin/true`` (plus ``waitpid``), and the bare haios
  launcher (`Launcher` + `NamespaceRunner`, default profile, fresh step
  filesystems and captures, exactly as ``haios-launcher`` in bench_launch.py);
- the floor of one step, each part alone in the same rounds:
  ``cgroups`` (the step's memory and pids cgroups made and removed, as the
  engine does for every step), ``uid-lease`` (one uid leased from the pool
  and released) and ``durable-turn`` (the I/O one scheduler turn must do
  under the durability contract, on the file system of the os_roots: one
  audit record appended, a 1 KiB state written to a temporary file,
  ``syncfs``, ``fsync`` of the log, ``rename``, ``fsync`` of the
  directory). The floor is their sum plus one ``haios-launcher`` launch:
  what every step costs before any engine work (no signing, hashing or
  JSON), in confinement and durability that the goals must not weaken.

It prints every ratio of the performance goals: marginal per step vs one bwrap launch
for 100 steps (goal <= 1.5x); the 1,000-step marginal vs the 100-step one
(goal <= 1.2x); 1-step startup vs 250 ms (goal < 1.0x); launcher launch vs
bwrap (goal <= 1.0x); and the floor vs bwrap, which the 100-step marginal
cannot go below.

Plans are signed and valid (tests/support/world.py builds keys, policy and os_roots,
as the integration tests do) under a scratch directory in /tmp, removed at
the end. Each run must exit 0 and leave one cost record per step. A
1,000-step plan takes about a minute per ``--jobs`` value.

Run as root from the repository root:

    python3 benchmarks/bench_engine_overhead.py [--quick | --sizes 10,100,1000]
        [--startup-runs 5] [--repeat 1] [--count 100] [--json]

With ``--json``, the table goes to stderr and stdout carries one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.world import World, plan, step  # noqa: E402

DEFAULT_SIZES = (10, 100, 1000)
QUICK_SIZES = (10, 100)
JOBS = (1, 2)
STARTUP_GOAL_MS = 250.0
MARGINAL_VS_BWRAP_GOAL = 1.5
FLATNESS_GOAL = 1.2
LAUNCHER_VS_BWRAP_GOAL = 1.0
RUN_TIMEOUT_SECONDS = 1800.0
PEER_ROUNDS = 4
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"]

Launch = Callable[[], object]


def haios_command() -> list[str]:
    """The installed `haios` console script next to this interpreter.

    The pyenv shim on PATH would add its own start-up to every run; the entry
    script beside the interpreter is what the shim ends up executing.
    """
    script = Path(sys.executable).with_name("haios")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "haios"]


def chain(steps: int) -> dict[str, Any]:
    """A plan of `steps` `/bin/true` steps, each needing the previous one."""
    ids = [f"s{i:04d}" for i in range(steps)]
    return plan(
        f"overhead-{steps}",
        [step(sid, ["/bin/true"], needs=[ids[i - 1]] if i else []) for i, sid in enumerate(ids)],
    )


class PlanRuns:
    """Fresh signed os_roots for chain plans, each run once through `haios run`."""

    def __init__(self, world: World, log: TextIO) -> None:
        self.world = world
        self.log = log
        self.command = haios_command()
        self.serial = 0
        # Engine variables from the caller's shell must not change what is measured.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}

    def run(self, steps: int, jobs: int) -> float:
        """Build a fresh os_root for a `steps`-long chain, run it, return the wall seconds.

        Raises:
            SystemExit: the run did not exit 0 or did not leave one cost record per step.

        Side Effects:
            Writes an os_root under the world's base; runs the engine (which forks steps).
        """
        self.serial += 1
        root = self.world.os_root(chain(steps), name=f"root-{self.serial:04d}-{steps}-j{jobs}")
        argv = [
            *self.command,
            "run",
            str(root),
            "--policy",
            str(self.world.policy),
            "--jobs",
            str(jobs),
        ]
        started = time.perf_counter()
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            env=self.env,
            timeout=RUN_TIMEOUT_SECONDS,
        )
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(
                f"haios run ({steps} steps, --jobs {jobs}) exited "
                f"{done.returncode}: {done.stderr[-2000:]}"
            )
        records = len(list((root / "cost").glob("*.json")))
        if records != steps:
            raise SystemExit(f"haios run ({steps} steps) left {records} cost records")
        shutil.rmtree(root, ignore_errors=True)
        print(f"  {steps:>5} steps --jobs {jobs}: {elapsed:.3f} s", file=self.log, flush=True)
        return elapsed


def posix_spawn_true() -> object:
    """posix_spawn /bin/true and reap it; fail unless it exited 0."""
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {"PATH": "/usr/bin:/bin"})
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"/bin/true exited with status {status}")
    return status


@contextlib.contextmanager
def peer_launches(scratch: Path, log: TextIO) -> Iterator[dict[str, Launch]]:
    """The peers' launch functions; the bare launcher is stopped on exit.

    Side Effects:
        Starts the haios launcher process (importing bench_launch does so).
    """
    # bench_launch starts its launcher at import, so import it only once we are root.
    from benchmarks.bench_launch import LAUNCHER, HaiosLaunches, command
    from haios.sandbox.runner import NamespaceRunner

    try:
        launches: dict[str, Launch] = {"posix_spawn": posix_spawn_true}
        if shutil.which("bwrap") is None:
            print("skip bwrap: not installed (apt-get install bubblewrap)", file=log)
        else:
            launches["bwrap"] = command(BWRAP)
        launcher_scratch = scratch / "launcher"
        launcher_scratch.mkdir()
        haios = HaiosLaunches(launcher_scratch)
        runner = NamespaceRunner(launcher=LAUNCHER)
        launches["haios-launcher"] = haios.runner(runner)
        launches["cgroups"] = haios.cgroups_only
        launches["uid-lease"] = haios.lease_only
        with DurableTurn(scratch / "turns") as turn:
            launches["durable-turn"] = turn
            yield launches
    finally:
        LAUNCHER.close()


class DurableTurn:
    """The I/O of one scheduler turn under the durability contract, alone.

    What the engine must do at least once per turn (docs/durability.md):
    append the turn's audit record, write the state to a temporary file,
    make both durable with one barrier (syncfs), then rename the state into
    place and make the directory entry durable. No signing, no JSON.
    """

    RECORD = b'{"kind":"step.finished","fields":{}}' + b" " * 200 + b"\n"
    STATE = b"{}" + b" " * 1022

    def __init__(self, directory: Path) -> None:
        from haios._util.durability import syncfs

        directory.mkdir(mode=0o700)
        self.syncfs = syncfs
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.log_fd = os.open("audit.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600,
                              dir_fd=self.dir_fd)

    def __call__(self) -> object:
        """One turn: append, write, syncfs, fsync the log, rename, fsync the directory."""
        os.write(self.log_fd, self.RECORD)
        fd = os.open(".state.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600,
                     dir_fd=self.dir_fd)
        try:
            os.write(fd, self.STATE)
        finally:
            os.close(fd)
        self.syncfs(self.dir_fd)
        os.fsync(self.log_fd)
        os.rename(".state.tmp", "state.json", src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)
        return None

    def __enter__(self) -> DurableTurn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.log_fd)
        os.close(self.dir_fd)


def measure_peers(launches: dict[str, Launch], count: int, times: dict[str, list[float]]) -> None:
    """Append per-launch wall times to `times`, interleaving the peers in rounds."""
    for launch in launches.values():
        launch()  # warm-up: page cache, first compilation of the seccomp filter
    for round_index in range(PEER_ROUNDS):
        per_round = count // PEER_ROUNDS + (round_index < count % PEER_ROUNDS)
        for name, launch in launches.items():
            for _ in range(per_round):
                started = time.perf_counter()
                launch()
                times.setdefault(name, []).append(time.perf_counter() - started)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """A table cell; "n/a" for a missing value."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def verdict(value: float | None, goal: float, *, strict: bool = False) -> str:
    """'met' or 'not met' against an upper-bound goal."""
    if value is None:
        return "n/a"
    return "met" if (value < goal if strict else value <= goal) else "not met"


def summarise(
    sizes: list[int],
    startup: dict[int, list[float]],
    plans: dict[tuple[int, int], list[float]],
    peers: dict[str, list[float]],
) -> dict[str, Any]:
    """Medians, marginals and the goal ratios as one JSON-ready document."""
    peer_ms = {
        name: {
            "n": len(values),
            "mean_ms": statistics.mean(values) * 1000,
            "median_ms": statistics.median(values) * 1000,
        }
        for name, values in peers.items()
    }
    bwrap_ms = peer_ms.get("bwrap", {}).get("mean_ms")
    launcher_ms = peer_ms.get("haios-launcher", {}).get("mean_ms")
    floor_parts = [peer_ms.get(name, {}).get("mean_ms")
                   for name in ("haios-launcher", "cgroups", "uid-lease", "durable-turn")]
    floor_ms = None if None in floor_parts else sum(p for p in floor_parts if p is not None)
    spawn_ms = peer_ms.get("posix_spawn", {}).get("mean_ms")
    startup_ms = {jobs: statistics.median(values) * 1000 for jobs, values in startup.items()}
    rows: list[dict[str, Any]] = []
    marginal: dict[tuple[int, int], float] = {}
    for jobs in JOBS:
        for steps in sizes:
            total_s = statistics.median(plans[steps, jobs])
            per_step_ms = (total_s * 1000 - startup_ms[jobs]) / (steps - 1)
            marginal[steps, jobs] = per_step_ms
            rows.append(
                {
                    "steps": steps,
                    "jobs": jobs,
                    "runs_s": plans[steps, jobs],
                    "total_s": total_s,
                    "marginal_ms_per_step": per_step_ms,
                    "including_startup_ms_per_step": total_s * 1000 / steps,
                    "marginal_vs_bwrap": ratio(per_step_ms, bwrap_ms),
                    "marginal_vs_launcher": ratio(per_step_ms, launcher_ms),
                    "marginal_vs_posix_spawn": ratio(per_step_ms, spawn_ms),
                }
            )
    ratios: dict[str, Any] = {
        "launcher_vs_bwrap": {
            "value": ratio(launcher_ms, bwrap_ms),
            "goal_at_most": LAUNCHER_VS_BWRAP_GOAL,
        },
        "floor_ms": floor_ms,
        "floor_vs_bwrap": ratio(floor_ms, bwrap_ms),
    }
    for jobs in JOBS:
        key = f"jobs_{jobs}"
        ratios[key] = {
            "startup_ms": startup_ms[jobs],
            "startup_vs_250ms": {"value": startup_ms[jobs] / STARTUP_GOAL_MS, "goal_below": 1.0},
        }
        if 100 in sizes:
            ratios[key]["marginal_100_vs_bwrap"] = {
                "value": ratio(marginal[100, jobs], bwrap_ms),
                "goal_at_most": MARGINAL_VS_BWRAP_GOAL,
            }
            ratios[key]["including_startup_100_vs_bwrap"] = ratio(
                statistics.median(plans[100, jobs]) * 1000 / 100, bwrap_ms
            )
        if 100 in sizes and 1000 in sizes:
            ratios[key]["marginal_1000_vs_100"] = {
                "value": ratio(marginal[1000, jobs], marginal[100, jobs]),
                "goal_at_most": FLATNESS_GOAL,
            }
    return {
        "peers": peer_ms,
        "startup": {
            str(j): {"runs_s": startup[j], "median_ms": ms} for j, ms in startup_ms.items()
        },
        "plans": rows,
        "ratios": ratios,
    }


def report(result: dict[str, Any], out: TextIO) -> None:
    """Print the tables and the goal ratios."""
    peers = result["peers"]
    print("\npeers: one launch of /bin/true", file=out)
    print("{:<16} {:>5} {:>9} {:>10}".format("launcher", "n", "mean ms", "median ms"), file=out)
    for name, row in peers.items():
        print(
            f"{name:<16} {row['n']:>5} {row['mean_ms']:>9.2f} {row['median_ms']:>10.2f}", file=out
        )
    print(
        "\nhaios run, chain of /bin/true steps; marginal = (time(N) - time(1)) / (N - 1)", file=out
    )
    header = (
        "steps",
        "jobs",
        "total s",
        "marginal ms",
        "incl. start ms",
        "x bwrap",
        "x launcher",
        "x posix_spawn",
    )
    print("{:>6} {:>4} {:>9} {:>12} {:>15} {:>8} {:>11} {:>14}".format(*header), file=out)
    for jobs, entry in result["startup"].items():
        print(f"{1:>6} {jobs:>4} {entry['median_ms'] / 1000:>9.3f} {'(startup)':>12}", file=out)
    for row in result["plans"]:
        cells = (
            row["steps"],
            row["jobs"],
            row["total_s"],
            row["marginal_ms_per_step"],
            row["including_startup_ms_per_step"],
            fmt(row["marginal_vs_bwrap"]),
            fmt(row["marginal_vs_launcher"]),
            fmt(row["marginal_vs_posix_spawn"]),
        )
        print(
            "{:>6} {:>4} {:>9.3f} {:>12.2f} {:>15.2f} {:>8} {:>11} {:>14}".format(*cells), file=out
        )
    ratios = result["ratios"]
    print("\nratios (goal; verdict)", file=out)
    for jobs in JOBS:
        entry = ratios[f"jobs_{jobs}"]
        if "marginal_100_vs_bwrap" in entry:
            value = entry["marginal_100_vs_bwrap"]["value"]
            print(
                f"  --jobs {jobs}: 100-step marginal per step / one bwrap launch: "
                f"{fmt(value, suffix='x')} (<= 1.5x; {verdict(value, MARGINAL_VS_BWRAP_GOAL)})"
                f"; counting startup {fmt(entry['including_startup_100_vs_bwrap'], suffix='x')}",
                file=out,
            )
        if "marginal_1000_vs_100" in entry:
            value = entry["marginal_1000_vs_100"]["value"]
            print(
                f"  --jobs {jobs}: 1,000-step marginal / 100-step marginal: "
                f"{fmt(value, suffix='x')} (<= 1.2x; {verdict(value, FLATNESS_GOAL)})",
                file=out,
            )
        value = entry["startup_vs_250ms"]["value"]
        print(
            f"  --jobs {jobs}: 1-step startup {entry['startup_ms']:.0f} ms / 250 ms: "
            f"{value:.2f}x (< 1.0x; {verdict(value, 1.0, strict=True)})",
            file=out,
        )
    value = ratios["launcher_vs_bwrap"]["value"]
    print(
        f"  launcher launch / bwrap launch: {fmt(value, suffix='x')} "
        f"(<= 1.0x; {verdict(value, LAUNCHER_VS_BWRAP_GOAL)})",
        file=out,
    )
    print(
        f"  floor of one step (haios-launcher + cgroups + uid-lease + durable-turn, "
        f"{fmt(ratios['floor_ms'], suffix=' ms')})"
        f" / bwrap launch: {fmt(ratios['floor_vs_bwrap'], suffix='x')} "
        f"(the 100-step marginal cannot go below it; its goal is <= 1.5x)",
        file=out,
    )


def parse_sizes(text: str) -> list[int]:
    """'10,100,1000' -> [10, 100, 1000]; every size must be at least 2."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc
    if not sizes or sizes[0] < 2:
        raise argparse.ArgumentTypeError("sizes must be at least 2 (1 step is the startup run)")
    return sizes


def main() -> None:
    """Run the benchmark and print the table (and, with --json, one JSON document).

    Side Effects:
        Creates keys, a policy and os_roots under a scratch dir in /tmp (removed
        at the end); runs `haios run` many times; starts a launcher process.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="plan sizes 10 and 100 only")
    sizes.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(DEFAULT_SIZES),
        help="comma-separated plan sizes, each >= 2 (default 10,100,1000)",
    )
    parser.add_argument(
        "--startup-runs",
        type=int,
        default=5,
        help="1-step runs per --jobs value; the median is used (default 5)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds; each runs every plan size with every --jobs value once; "
        "the median per size is used (default 1)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=100,
        help="launches per peer, half before and half after the plans (default 100)",
    )
    parser.add_argument(
        "--json", action="store_true", help="table to stderr, one JSON document to stdout"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the sandbox needs it")
    plan_sizes: list[int] = list(QUICK_SIZES) if args.quick else args.sizes
    log = sys.stderr
    out = sys.stderr if args.json else sys.stdout
    scratch = Path(tempfile.mkdtemp(prefix="haios-bench-overhead-", dir="/tmp"))
    peers: dict[str, list[float]] = {}
    startup: dict[int, list[float]] = {}
    plans: dict[tuple[int, int], list[float]] = {}
    try:
        runs = PlanRuns(World(scratch / "world"), log)
        with peer_launches(scratch, log) as launches:
            print("peers (first half)", file=log, flush=True)
            measure_peers(launches, args.count // 2, peers)
            print(f"haios run via {' '.join(runs.command)}; warm-up", file=log, flush=True)
            runs.run(1, 1)  # warm-up: page cache for the interpreter and haios modules
            for jobs in JOBS:
                startup[jobs] = [runs.run(1, jobs) for _ in range(args.startup_runs)]
            # In rounds, every size and --jobs once per round, so that drift on
            # a shared host hits the ratios' numerator and denominator alike.
            for _round in range(args.repeat):
                for steps in plan_sizes:
                    for jobs in JOBS:
                        plans.setdefault((steps, jobs), []).append(runs.run(steps, jobs))
            print("peers (second half)", file=log, flush=True)
            measure_peers(launches, args.count - args.count // 2, peers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = summarise(plan_sizes, startup, plans, peers)
    result["command"] = [*runs.command, "run", "OS_ROOT", "--policy", "POLICY", "--jobs", "J"]
    result["cpus"] = os.cpu_count()
    report(result, out)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
