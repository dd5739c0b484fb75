# SPDX-License-Identifier: Apache-2.0
"""Report time for a 1,000-step os_root (goal: under 5 s on the CI machine).

Builds the os_root once with the real engine (a plan of N trivial steps,
each making one small product from the previous step's, so every link,
signature and layout rule has work to do), then times `haios-client report`
end to end in a fresh process (`--json` and `-o FILE.html`), three times,
and prints the figures. Its peer in the same run is `haios state` over the
same os_root (the engine's own, narrower verification).

Run: python3 benchmarks/bench_report.py [--steps 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.world import World, plan, sh, step

GOAL_SECONDS = 5.0


def chain_plan(steps: int) -> dict[str, object]:
    """Step i copies step i-1's product (a chain, so every MATCH rule is exercised)."""
    items = [step("s0000", sh("echo 0 > p0000"), products=["p0000"])]
    for i in range(1, steps):
        items.append(step(f"s{i:04d}", sh(f"cat p{i - 1:04d} > p{i:04d}"),
                          needs=[f"s{i - 1:04d}"], materials=[f"p{i - 1:04d}"],
                          products=[f"p{i:04d}"]))
    return plan("bench-report", items)


def timed(args: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the os_root and print it")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="haios-bench-report-"))
    try:
        world = World(base / "world")
        root = world.os_root(chain_plan(args.steps))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "HAIOS_"))}
        started = time.perf_counter()
        built = subprocess.run([sys.executable, "-m", "haios", "run", str(root), "--policy",
                                str(world.policy)], capture_output=True, text=True, env=env,
                               check=False)
        build_s = time.perf_counter() - started
        if built.returncode != 0:
            raise SystemExit(f"haios run failed ({built.returncode}): {built.stderr[-2000:]}")
        client = str(Path(sys.executable).with_name("haios-client"))
        report = [client, "report", str(root), "--policy", str(world.policy), "--json",
                  "-o", str(base / "report.html")]
        state = [sys.executable, "-m", "haios", "state", str(root), "--policy",
                 str(world.policy), "--json"]
        report_s, state_s = [], []
        findings: dict[str, object] = {}
        for _ in range(args.repeat):
            seconds, done = timed(report)
            if done.returncode != 0:
                raise SystemExit(f"report failed ({done.returncode}): {done.stderr[-2000:]}")
            report_s.append(seconds)
            findings = json.loads(done.stdout)
            seconds, done = timed(state)
            state_s.append(seconds)
        summary = findings["summary"]
        median = statistics.median(report_s)
        print(json.dumps({
            "steps": args.steps,
            "build_with_engine_s": round(build_s, 1),
            "report_s": [round(s, 3) for s in report_s],
            "report_median_s": round(median, 3),
            "goal_s": GOAL_SECONDS,
            "within_goal": median < GOAL_SECONDS,
            "checks": summary,
            "audit_records": findings["audit"]["records"],  # type: ignore[index]
            "html_bytes": (base / "report.html").stat().st_size,
            "peer_haios_state_median_s": round(statistics.median(state_s), 3),
        }, indent=2))
    finally:
        if args.keep:
            print(f"kept: {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
