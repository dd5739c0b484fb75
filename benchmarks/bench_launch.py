# SPDX-License-Identifier: Apache-2.0
"""Launch overhead per step: the haios sandbox vs plain and peer tools, in one run.

Each launcher runs ``/bin/true`` `--count` times (default 200), interleaved in
rounds so that background noise hits every tool alike:

- subprocess: ``subprocess.run(["/bin/true"])``, no confinement (the floor);
- haios-direct: `NamespaceRunner()` forking from this (engine) process;
- haios-launcher: `NamespaceRunner(launcher=Launcher.start())`, forking from
  the small pre-started launcher process; back to back, so each step's init
  was forked while the previous step ran;
- haios-launcher-cold: the same after the launcher has been idle longer than
  it keeps a forked-ahead init (only `--count-slow` launches): the init is
  forked on request, as for the first step after a long one;
- haios-full: haios-launcher plus everything else the engine now does per
  step around the launch: a uid lease from the host pool and the step's
  memory/pids cgroups (created, joined, removed);
- stepfs-only, cgroups-only, uid-lease-only: those per-step costs alone,
  without a launch (each haios launch already includes a fresh detached
  workspace and cost tmpfs and two memfd captures);
- bwrap: ``bwrap --unshare-all --die-with-parent --ro-bind / / true``;
- firejail: ``firejail --noprofile --quiet true``;
- in-toto-run: ``in-toto-run -n bench --signing-key KEY -d DIR -- /bin/true``
  with a throw-away Ed25519 key (only `--count-slow` launches: it takes
  hundreds of milliseconds each).

The haios runs use the full `default` profile (PID, mount, IPC, UTS, cgroup
and network namespaces, view + pivot_root, uid drop, no capabilities,
no_new_privs, rlimits, two seccomp filters). They are measured twice: with
this process at its natural size (~40 MiB) and after it grows to ~500 MiB
resident, which is where forking from the engine gets expensive and the
launcher does not. Tools that are not installed are skipped with a reason.

Run as root from the repository root:

    python -m benchmarks.bench_launch [--count 200] [--count-slow 10] [--json]
        [--only haios-launcher,bwrap,subprocess]
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

# Started before the heavy imports below, as the engine would do it.
from haios.sandbox.launcher import Launcher

LAUNCHER = Launcher.start()

from haios._util.safedir import SafeDir  # noqa: E402
from haios.sandbox._launcher_main import WAITING_MAX_SECONDS  # noqa: E402
from haios.sandbox.cglimits import StepLimits  # noqa: E402
from haios.sandbox.profile import load_profile  # noqa: E402
from haios.sandbox.runner import NamespaceRunner  # noqa: E402
from haios.sandbox.spec import StepSpec  # noqa: E402
from haios.sandbox.stepfs import StepMounts, open_capture  # noqa: E402
from haios.sandbox.uidpool import UidPool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 4
BIG_RSS_BYTES = 460 * 1024 * 1024
UID = 190_001  # the start of a 64-uid pool for the leases

Launch = Callable[[], object]


def rss_mib() -> float:
    """This process's resident set size in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class HaiosLaunches:
    """Specs for repeated /bin/true steps under the default profile."""

    def __init__(self, scratch: Path) -> None:
        self.profile = load_profile(REPO / "policy", "default")
        lease_dir = scratch / "uids"
        lease_dir.mkdir(mode=0o700)
        self.pool = UidPool(SafeDir.open(lease_dir), UID, 64)
        self.counter = 0

    def mounts(self, uid: int) -> StepMounts:
        """The step's fresh workspace and cost filesystems, as the engine makes them."""
        fs = self.profile.filesystem
        return StepMounts.create(uid, uid, workspace_bytes=fs.workspace_size_bytes,
                                 workspace_inodes=fs.workspace_inodes, with_secret=False)

    def spec(self, uid: int, stack: contextlib.ExitStack,
             limit_cgroups: tuple[Path, ...] = ()) -> StepSpec:
        """A fresh spec (new filesystems and captures) for one launch."""
        self.counter += 1
        step_fs = stack.enter_context(contextlib.closing(self.mounts(uid)))
        captures = (open_capture("out"), open_capture("err"))
        for fd in captures:
            stack.callback(os.close, fd)
        return StepSpec(
            plan_id="bench",
            step_id="true",
            argv=("/bin/true",),
            env={"PATH": "/usr/bin:/bin", "HOME": "/haios/work"},
            mounts=step_fs,
            profile=self.profile,
            uid=uid,
            gid=uid,
            timeout_seconds=30.0,
            cpu_seconds_limit=None,
            stdout_fd=captures[0],
            stderr_fd=captures[1],
            output_limit_bytes=4096,
            cgroup=None,
            limit_cgroups=limit_cgroups,
        )

    def runner(self, runner: NamespaceRunner, *, full: bool = False) -> Launch:
        """A launch function that checks the step really ran.

        With `full`, the uid is leased and the memory/pids cgroups are made
        and removed around the launch, as the engine does for every step.
        """

        def launch() -> object:
            with contextlib.ExitStack() as stack:
                uid = UID
                limits: tuple[Path, ...] = ()
                if full:
                    lease = self.pool.lease(5.0)
                    stack.callback(lease.release)
                    uid = lease.uid
                    bounds = self.bounds()
                    stack.callback(bounds.remove)
                    limits = bounds.directories
                outcome = runner.run(self.spec(uid, stack, limits))
                if outcome.exit_code != 0:
                    raise RuntimeError(f"sandboxed /bin/true failed: {outcome}")
                return outcome

        return launch

    def bounds(self) -> StepLimits:
        """The step's memory and pids cgroups from the profile."""
        limits = self.profile.cgroup
        return StepLimits.create("bench", f"true-{self.counter}", limits.memory_max_bytes,
                                 limits.pids_max)

    def stepfs_only(self) -> object:
        """Create and drop the step's filesystems and captures, no launch."""
        with contextlib.ExitStack() as stack:
            return self.spec(UID, stack)

    def cgroups_only(self) -> object:
        """Create and remove the step's limit cgroups, no launch."""
        self.counter += 1
        bounds = self.bounds()
        bounds.remove()
        return bounds

    def lease_only(self) -> object:
        """Lease and release one uid from the pool (scans /proc), no launch."""
        lease = self.pool.lease(5.0)
        lease.release()
        return lease


class ColdLaunch:
    """A launch preceded, untimed, by an idle pause past the waiting init's life."""

    def __init__(self, launch: Launch) -> None:
        """Wrap `launch`."""
        self.launch = launch

    def settle(self) -> None:
        """Let the launcher's forked-ahead init expire."""
        time.sleep(WAITING_MAX_SECONDS + 0.1)

    def __call__(self) -> object:
        """Launch."""
        return self.launch()


def command(argv: list[str]) -> Launch:
    """A launch function running `argv` and checking its exit status."""

    def launch() -> object:
        return subprocess.run(
            argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    return launch


@contextlib.contextmanager
def in_toto_command(scratch: Path) -> Iterator[list[str] | None]:
    """in-toto-run with a throw-away Ed25519 key, or None with a reason printed."""
    tool = shutil.which("in-toto-run")
    if tool is None:
        print("skip in-toto-run: not installed (pip install in-toto)", file=sys.stderr)
        yield None
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = scratch / "bench.key"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    links = scratch / "links"
    links.mkdir()
    yield [
        tool,
        "-n",
        "bench",
        "--signing-key",
        str(key),
        "-d",
        str(links),
        "-q",
        "--",
        "/bin/true",
    ]


def measure(launches: dict[str, Launch], counts: dict[str, int]) -> dict[str, list[float]]:
    """Per-launch wall times, interleaving the tools over `ROUNDS` rounds."""
    times: dict[str, list[float]] = {name: [] for name in launches}
    for name, launch in launches.items():
        launch()  # warm-up: caches, first compilation
        del name
    for _ in range(ROUNDS):
        for name, launch in launches.items():
            for _ in range(max(1, counts.get(name, 0) // ROUNDS)):
                settle = getattr(launch, "settle", None)
                if settle is not None:
                    settle()
                started = time.perf_counter()
                launch()
                times[name].append(time.perf_counter() - started)
    return times


def report(title: str, times: dict[str, list[float]]) -> list[dict[str, object]]:
    """Print ms per launch (mean, median) and ratios; return the rows."""
    means = {name: statistics.mean(values) * 1000 for name, values in times.items()}
    base = means.get("subprocess")
    bwrap = means.get("bwrap")
    print(f"\n{title}")
    header = ("launcher", "n", "mean ms", "median ms", "x subprocess", "x bwrap")
    print("{:<20} {:>5} {:>9} {:>10} {:>13} {:>8}".format(*header))
    rows: list[dict[str, object]] = []
    for name, values in times.items():
        mean = means[name]
        median = statistics.median(values) * 1000
        vs_base = mean / base if base else float("nan")
        vs_bwrap = mean / bwrap if bwrap else float("nan")
        cells = (name, len(values), mean, median, vs_base, vs_bwrap)
        print("{:<20} {:>5} {:>9.2f} {:>10.2f} {:>13.2f} {:>8.2f}".format(*cells))
        rows.append({"launcher": name, "n": len(values), "mean_ms": mean, "median_ms": median})
    return rows


def main() -> None:
    """Run the benchmark and print the table(s).

    Side Effects:
        Forks thousands of short processes; creates and removes a scratch dir.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="launches per tool (default 200)")
    parser.add_argument(
        "--count-slow",
        type=int,
        default=10,
        help="launches of in-toto-run and haios-launcher-cold (default 10)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document at the end")
    parser.add_argument(
        "--only", default="", help="comma-separated rows to run (default: all available)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the sandbox needs it")
    scratch = Path(tempfile.mkdtemp(prefix="haios-bench-launch-"))
    results: dict[str, object] = {}
    try:
        haios = HaiosLaunches(scratch)
        launches: dict[str, Launch] = {
            "subprocess": command(["/bin/true"]),
            "haios-direct": haios.runner(NamespaceRunner()),
            "haios-launcher": haios.runner(NamespaceRunner(launcher=LAUNCHER)),
            "haios-launcher-cold": ColdLaunch(haios.runner(NamespaceRunner(launcher=LAUNCHER))),
            "haios-full": haios.runner(NamespaceRunner(launcher=LAUNCHER), full=True),
            "stepfs-only": haios.stepfs_only,
            "cgroups-only": haios.cgroups_only,
            "uid-lease-only": haios.lease_only,
        }
        counts = dict.fromkeys(launches, args.count)
        counts["haios-launcher-cold"] = args.count_slow
        for tool, argv in (
            (
                "bwrap",
                ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
            ),
            ("firejail", ["firejail", "--noprofile", "--quiet", "true"]),
        ):
            if shutil.which(argv[0]) is None:
                package = "bubblewrap" if tool == "bwrap" else tool
                print(f"skip {tool}: not installed (apt-get install {package})", file=sys.stderr)
                continue
            launches[tool] = command(argv)
            counts[tool] = args.count
        with in_toto_command(scratch) as in_toto:
            if in_toto is not None:
                launches["in-toto-run"] = command(in_toto)
                counts["in-toto-run"] = args.count_slow
            if args.only:
                wanted = set(args.only.split(","))
                launches = {name: run for name, run in launches.items() if name in wanted}
            small = rss_mib()
            results["small"] = {
                "rss_mib": small,
                "rows": report(
                    f"engine RSS {small:.0f} MiB, {args.count} launches of /bin/true",
                    measure(launches, counts),
                ),
            }
            ballast = bytearray(BIG_RSS_BYTES)
            for offset in range(0, len(ballast), 4096):
                ballast[offset] = 1
            big = rss_mib()
            haios_only: dict[str, Launch] = {
                name: launches[name]
                for name in ("subprocess", "haios-direct", "haios-launcher")
                if name in launches
            }
            if "bwrap" in launches:
                haios_only["bwrap"] = launches["bwrap"]
            results["big"] = {
                "rss_mib": big,
                "rows": report(
                    f"engine RSS {big:.0f} MiB (ballast), same launches",
                    measure(haios_only, counts),
                ),
            }
            del ballast
    finally:
        LAUNCHER.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
