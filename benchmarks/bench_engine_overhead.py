# SPDX-License-Identifier: Apache-2.0
"""Engine overhead per step: a plan of N trivial steps, with and without metrics serving.

Overhead per step = (total wall time of `haios run` - the steps' own wall
time from their cost records) / N. Both variants run in the same process
invocation of this script, back to back, on fresh os_roots; the ratio
"with metrics / without" is printed.

Run: python3 benchmarks/bench_engine_overhead.py [--steps 1000] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.world import World, plan, step


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(world: World, steps: int, jobs: int, name: str, metrics: bool) -> dict[str, float]:
    document = plan("overhead", [step(f"s{i:04d}", ["/bin/true"]) for i in range(steps)])
    root = world.os_root(document, name=name)
    args = [sys.executable, "-m", "haios", "run", str(root), "--policy", str(world.policy),
            "--jobs", str(jobs)]
    if metrics:
        args += ["--metrics-addr", f"127.0.0.1:{_port()}"]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"haios run failed ({done.returncode}): {done.stderr[-2000:]}")
    own = sum(json.loads(p.read_text())["measured"]["wall_seconds"]
              for p in (root / "cost").glob("*.json"))
    return {"total_s": round(total, 3), "steps_own_wall_s": round(own, 3),
            "overhead_ms_per_step": round((total - own) / steps * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="haios-bench-overhead-"))
    try:
        world = World(base / "world")
        without = measure(world, args.steps, args.jobs, "plain", metrics=False)
        served = measure(world, args.steps, args.jobs, "served", metrics=True)
        print(json.dumps({
            "steps": args.steps, "jobs": args.jobs,
            "without_metrics": without, "with_metrics_served": served,
            "ratio_with_to_without": round(served["overhead_ms_per_step"]
                                           / without["overhead_ms_per_step"], 3),
        }, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
