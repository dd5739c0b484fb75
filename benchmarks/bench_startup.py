# SPDX-License-Identifier: Apache-2.0
"""Where the start-up of `haios run` goes: imports, a 1-step run, and a timeline.

One invocation measures, in fresh processes each time:

- the interpreter floor: ``python -c pass`` (the peer: what any Python CLI pays);
- imports: ``import haios.cli.main`` (what every command pays) and
  ``import haios.app`` (the engine, imported lazily by `run` and `state`),
  timed inside the process; median of `--runs`;
- startup: a signed 1-step plan of ``/bin/true`` run end to end through the
  real ``haios run`` CLI, as in bench_engine_overhead.py (``--jobs 1``):
  median wall time, and median CPU time of the whole process tree (engine,
  watchdog, launcher, step), which moves less than wall time on a busy machine;
- with ``--phases``: the same run with a timeline, split into interpreter
  start, imports, the early spawn of the watchdog and the launcher (before
  the engine import; their interpreters start while it imports), policy
  load, lock, history and audit, signer, admission (verification),
  preflight, watchdog start (run cgroup, config, ``ready``), launcher start
  (its greeting), tree watch start, the scheduler (the step), registry,
  closing the helpers, and exit;
  plus the time inside state writes, audit appends and durable writes
  (temp, fsync, rename, fsync dir), which overlap the rows above. The
  timeline wraps those functions by name as their modules load, so it costs
  a little itself; a name that no longer exists is skipped.

Bytecode matters: with PYTHONDONTWRITEBYTECODE set and no ``__pycache__``
under haios/, every run compiles the engine's sources (about 50 ms). The
benchmark says so when the cache is missing (``python3 -m compileall haios``
fills it; a pip install does that itself).

Run as root from the repository root:

    python3 benchmarks/bench_startup.py [--runs 7] [--phases] [--json]

With ``--json``, the table goes to stderr and stdout carries one JSON document.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_engine_overhead import haios_command  # noqa: E402
from tests.support.world import World, plan, step  # noqa: E402

STARTUP_GOAL_MS = 250.0

IMPORT_PROBE = """\
import sys, time
started = time.perf_counter()
import {module}
print((time.perf_counter() - started) * 1000)
"""

# (label, module, attribute path): wrapped when the module is imported. Rows
# marked "overlaps" are inside the others and are shown apart.
PHASES: tuple[tuple[str, str, str], ...] = (
    ("spawn watchdog and launcher", "haios.cli.main", "_spawn_helpers"),
    ("policy load", "haios.app", "load_policy"),
    ("lock: os_root, run area", "haios.osroot", "OsRoot.__init__"),
    ("lock: os_root, run area", "haios.area", "RunArea.acquire"),
    ("history and audit open", "haios.history", "History.open"),
    ("journal ingest", "haios.engine", "ingest_watchdog_journal"),
    ("signer load", "haios.signing", "EngineSigner.load"),
    ("admission (verification)", "haios.engine", "admit"),
    ("preflight", "haios.guard.preflight", "preflight"),
    ("watchdog start: config, ready", "haios.watchdog.client", "Watchdog.start"),
    ("launcher start: greeting", "haios.sandbox.launcher", "PendingLauncher.wait_ready"),
    ("tree watch start", "haios.sandbox.treewatch", "TreeWatch.start"),
    ("scheduler (the step)", "haios.run.scheduler", "Scheduler.run"),
    ("registry write", "haios.engine", "write_registry"),
    ("watchdog close", "haios.watchdog.client", "Watchdog.close"),
    ("launcher close", "haios.sandbox.launcher", "Launcher.close"),
    ("tree watch close", "haios.sandbox.treewatch", "TreeWatch.close"),
    ("metrics write", "haios.app", "_write_metrics"),
    ("overlaps: state writes", "haios.run.keeper", "StateKeeper.commit"),
    ("overlaps: audit appends", "haios.audit.log", "AuditLog.append"),
    ("overlaps: durable writes", "haios._util.safedir", "SafeDir._publish"),
    ("overlaps: durability barriers", "haios._util.durability", "Barrier.flush"),
)

# Runs `haios run` in-process (as the console script does) with PHASES wrapped
# as their modules load, so nothing is imported earlier than the CLI would.
TIMELINE_DRIVER = """\
import time
T0 = time.perf_counter()
import builtins, functools, importlib, json, sys
PHASES = json.loads(sys.argv[1])
out_path = sys.argv[2]
spans = []
pending = {}
for label, module, attr in PHASES:
    pending.setdefault(module, []).append((label, attr))

def wrap(label, function):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spans.append((label, start, time.perf_counter()))
    return timed

def patch(module, label, attr):
    owner = module
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    if owner is None or name not in getattr(owner, "__dict__", {}):
        return
    raw = owner.__dict__[name]
    if isinstance(raw, classmethod):
        setattr(owner, name, classmethod(wrap(label, raw.__func__)))
    elif isinstance(raw, staticmethod):
        setattr(owner, name, staticmethod(wrap(label, raw.__func__)))
    elif callable(raw):
        setattr(owner, name, wrap(label, raw))

real_import = builtins.__import__

def hooked(*args, **kwargs):
    result = real_import(*args, **kwargs)
    for name in [m for m in pending if m in sys.modules]:
        module = sys.modules[name]
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            continue  # still executing: its names are not all bound yet
        for label, attr in pending.pop(name):
            patch(module, label, attr)
    return result

builtins.__import__ = hooked
t_import = time.perf_counter()
import haios.cli.main as cli_main
spans.append(("import haios.cli.main", t_import, time.perf_counter()))
sys.argv = ["haios", *sys.argv[3:]]
code = 0
started = time.perf_counter()
try:
    cli_main.main()
except SystemExit as exc:
    code = exc.code
ended = time.perf_counter()
spans.append(("main()", started, ended))
with open(out_path, "w") as f:
    json.dump({"t0": T0, "end": ended, "code": code, "spans": spans}, f)
cli_main.exit_promptly(code)  # as the console script ends
"""


def median(values: list[float]) -> float:
    """The median (values are never empty here)."""
    return statistics.median(values)


def interpreter_floor(runs: int) -> list[float]:
    """Wall ms of `python -c pass`, `runs` times."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append((time.perf_counter() - started) * 1000)
    return times


def import_times(module: str, runs: int, env: dict[str, str]) -> list[float]:
    """In-process ms of `import module` in fresh interpreters."""
    times = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(module=module)],
                              capture_output=True, text=True, check=True, env=env)
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return times


def bytecode_cached() -> bool:
    """True when the engine's modules have cached bytecode next to them."""
    spec = importlib.util.find_spec("haios.engine")
    if spec is None or spec.origin is None:
        return False
    return Path(importlib.util.cache_from_source(spec.origin)).exists()


class OneStepRuns:
    """Fresh signed 1-step os_roots, each run once through the CLI."""

    def __init__(self, world: World, env: dict[str, str]) -> None:
        self.world = world
        self.env = env
        self.serial = 0

    def root(self) -> Path:
        """A fresh os_root holding a signed 1-step `/bin/true` plan."""
        self.serial += 1
        name = f"startup-{self.serial:04d}"
        return self.world.os_root(plan(name, [step("s0", ["/bin/true"])]), name=name)

    def check(self, root: Path, done: subprocess.CompletedProcess[str]) -> None:
        """Exit 0 and one cost record, or SystemExit; then remove the os_root."""
        if done.returncode != 0:
            raise SystemExit(f"haios run exited {done.returncode}: {done.stderr[-2000:]}")
        records = len(list((root / "cost").glob("*.json")))
        if records != 1:
            raise SystemExit(f"haios run left {records} cost records")
        shutil.rmtree(root, ignore_errors=True)

    def run(self) -> tuple[float, float]:
        """Wall ms and CPU ms (the whole process tree) of one run."""
        root = self.root()
        argv = [*haios_command(), "run", str(root), "--policy", str(self.world.policy)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=self.env)
        wall = (time.perf_counter() - started) * 1000
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.check(root, done)
        cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
        return wall, cpu

    def timeline(self, scratch: Path) -> dict[str, Any]:
        """One run through the timeline driver: spans relative to the process start."""
        root = self.root()
        out = scratch / "timeline.json"
        argv = [sys.executable, "-c", TIMELINE_DRIVER, json.dumps(PHASES), str(out),
                "run", str(root), "--policy", str(self.world.policy)]
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=self.env)
        reaped = time.perf_counter()
        self.check(root, done)
        data = json.loads(out.read_text())
        rows: dict[str, float] = {}
        for label, begin, end in data["spans"]:
            rows[label] = rows.get(label, 0.0) + (end - begin) * 1000
        rows["interpreter start"] = (data["t0"] - started) * 1000
        rows["exit (after main returns)"] = (reaped - data["end"]) * 1000
        rows["wall"] = (reaped - started) * 1000
        return rows


def timeline_table(timelines: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Median ms per timeline row, in flow order; imports are what main() leaves over."""
    labels = ["interpreter start", "import haios.cli.main"]
    labels += list(dict.fromkeys(label for label, _, _ in PHASES))
    labels += ["exit (after main returns)", "wall"]
    table = []
    for label in labels:
        values = [t.get(label, 0.0) for t in timelines]
        table.append((label, median(values)))
    accounted = sum(median([t.get(label, 0.0) for t in timelines]) for label, _, _ in PHASES
                    if not label.startswith("overlaps"))
    main_ms = median([t["main()"] for t in timelines])
    table.insert(2, ("imports inside main, and the rest", main_ms - accounted))
    return table


def report(result: dict[str, Any], out: TextIO) -> None:
    """Print the tables."""
    if not result["bytecode_cached"]:
        print("note: haios/ has no cached bytecode: each run compiles the engine "
              "(python3 -m compileall haios)", file=out)
    print(f"\n{'measure':<44} {'median ms':>10} {'min':>8} {'max':>8}", file=out)
    for name, values in result["series"].items():
        print(f"{name:<44} {median(values):>10.1f} {min(values):>8.1f} {max(values):>8.1f}",
              file=out)
    wall = median(result["series"]["haios run, 1 step: wall"])
    print(f"\n1-step startup {wall:.0f} ms / {STARTUP_GOAL_MS:.0f} ms: "
          f"{wall / STARTUP_GOAL_MS:.2f}x (< 1.0x; "
          f"{'met' if wall < STARTUP_GOAL_MS else 'not met'})", file=out)
    if result.get("timeline"):
        print(f"\ntimeline of one run (median of {result['timeline_runs']})", file=out)
        for label, value in result["timeline"]:
            print(f"  {label:<42} {value:>8.1f} ms", file=out)


def main() -> None:
    """Measure and print (and, with --json, one JSON document on stdout).

    Side Effects:
        Creates keys, a policy and os_roots under a scratch dir in /tmp
        (removed at the end); runs `haios run` many times.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7,
                        help="runs of each measure; medians are reported (default 7)")
    parser.add_argument("--phases", action="store_true",
                        help="also time the flow of one run, --runs times")
    parser.add_argument("--json", action="store_true",
                        help="table to stderr, one JSON document to stdout")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the sandbox needs it")
    out = sys.stderr if args.json else sys.stdout
    # Engine variables from the caller's shell must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
    scratch = Path(tempfile.mkdtemp(prefix="haios-bench-startup-", dir="/tmp"))
    series: dict[str, list[float]] = {}
    result: dict[str, Any] = {"bytecode_cached": bytecode_cached(), "runs": args.runs}
    try:
        runs = OneStepRuns(World(scratch / "world"), env)
        runs.run()  # warm-up: page cache for the interpreter and haios modules
        series["python -c pass (floor)"] = interpreter_floor(args.runs)
        series["import haios.cli.main (in-process)"] = import_times(
            "haios.cli.main", args.runs, env)
        series["import haios.app (in-process)"] = import_times("haios.app", args.runs, env)
        walls, cpus = [], []
        for _ in range(args.runs):
            wall, cpu = runs.run()
            walls.append(wall)
            cpus.append(cpu)
        series["haios run, 1 step: wall"] = walls
        series["haios run, 1 step: CPU, all processes"] = cpus
        if args.phases:
            timelines = [runs.timeline(scratch) for _ in range(args.runs)]
            result["timeline"] = timeline_table(timelines)
            result["timeline_runs"] = args.runs
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["series"] = series
    result["command"] = [*haios_command(), "run", "OS_ROOT", "--policy", "POLICY"]
    report(result, out)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
