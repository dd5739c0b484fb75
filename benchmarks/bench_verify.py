# SPDX-License-Identifier: Apache-2.0
"""Verification throughput for a plan with 1,000 inputs, beside `openssl dgst -sha256`.

Prints artefacts/s, MB/s of hashing (per file in a fresh process, and across
files with the engine's thread pool), DSSE envelope verifications/s, link
verifications/s, whole-plan verification time of a 10-step plan, and the
ratios to openssl over the same files in the same run.

Run: python3 benchmarks/bench_verify.py [--inputs 1000] [--size-kib 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haios import events as ev
from haios._util.safedir import sha256_fd
from haios.intake import verify_inputs, verify_plan
from haios.load.parse import parse_model
from haios.load.policy import load_policy
from haios.models.plan import ExecPlan
from haios.osroot import OsRoot
from haios.verify.dsse import verify_detached
from haios.verify.links import verify_link
from tests.support.world import World, plan, sh, step


def build(base: Path, inputs: int, size: int) -> tuple[World, Path]:
    world = World(base / "world")
    data = {f"in-{i:04d}.bin": os.urandom(size) for i in range(inputs)}
    steps = [step(f"s{i}", sh("true"), materials=[f"in-{i:04d}.bin"]) for i in range(10)]
    root = world.os_root(plan("bench", steps, data), data)
    return world, root


def time_openssl(files: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", *map(str, files)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def fresh_process_hash_rate(path: Path) -> float:
    code = ("import os,sys,time;from haios._util.safedir import sha256_fd;"
            "fd=os.open(sys.argv[1],os.O_RDONLY);n=os.fstat(fd).st_size;t=time.perf_counter();"
            "sha256_fd(fd,n);print(n/(time.perf_counter()-t))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True,
                         capture_output=True, text=True).stdout
    return float(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--size-kib", type=int, default=256)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="haios-bench-verify-"))
    try:
        world, root = build(base, args.inputs, args.size_kib * 1024)
        policy = load_policy(world.policy)
        files = sorted((root / "inbox").glob("*.bin"))
        total = sum(p.stat().st_size for p in files)
        for path in files:  # warm the page cache for both contenders
            path.read_bytes()
        openssl = min(time_openssl(files) for _ in range(3))

        big = base / "big.bin"
        big.write_bytes(os.urandom(256 << 20))
        single = fresh_process_hash_rate(big)
        big_fd = os.open(big, os.O_RDONLY)
        started = time.perf_counter()
        sha256_fd(big_fd, big.stat().st_size)
        in_process = (256 << 20) / (time.perf_counter() - started)
        os.close(big_fd)
        started = time.perf_counter()
        subprocess.run(["openssl", "dgst", "-sha256", str(big)], check=True,
                       stdout=subprocess.DEVNULL)
        openssl_big = (256 << 20) / (time.perf_counter() - started)

        osr = OsRoot(root)
        raw = (root / "exec_plan.json").read_bytes()
        bus = ev.EventBus()
        verified = verify_plan(osr, policy, raw, __import__("datetime").datetime.now(
            __import__("datetime").UTC), bus)
        store = osr.private().sub("store", create=True, mode=0o700)
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            verify_inputs(osr, policy, verified.plan, store, policy.engine_key.keyid, bus)
            runs.append(time.perf_counter() - started)
        engine = min(runs)

        sigs = [(p.name, (root / "inbox" / f"{p.name}.sig").read_bytes(),
                 hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
        started = time.perf_counter()
        for name, sig, digest in sigs:
            verify_detached(sig, policy.functionary, name=name, sha256=digest, max_depth=32)
        dsse_rate = len(sigs) / (time.perf_counter() - started)

        link = next((root / "links").glob("*.link")).read_bytes()
        verify_link(link, policy.functionary, label="l", max_depth=32)  # import in-toto once
        started = time.perf_counter()
        for _ in range(50):
            verify_link(link, policy.functionary, label="l", max_depth=32)
        link_rate = 50 / (time.perf_counter() - started)

        small_world, small_root = build(base / "small", 10, 4096)
        small_policy = load_policy(small_world.policy)
        small_osr = OsRoot(small_root)
        small_store = small_osr.private().sub("store", create=True, mode=0o700)
        small_raw = (small_root / "exec_plan.json").read_bytes()
        timings = []
        for _ in range(20):
            started = time.perf_counter()
            vp = verify_plan(small_osr, small_policy, small_raw,
                             __import__("datetime").datetime.now(__import__("datetime").UTC), bus)
            verify_inputs(small_osr, small_policy, vp.plan, small_store,
                          small_policy.engine_key.keyid, bus)
            timings.append(time.perf_counter() - started)
        parse_model(ExecPlan, small_raw, label="p", max_depth=32)
        whole = sorted(timings)[len(timings) // 2]

        mb = total / 1e6
        report = {
            "inputs": len(files), "bytes": total,
            "engine_verify_inputs_s": round(engine, 4),
            "engine_artefacts_per_s": round(len(files) / engine, 1),
            "engine_MB_per_s_incl_copy_sig_link": round(mb / engine, 1),
            "openssl_dgst_s": round(openssl, 4),
            "openssl_MB_per_s": round(mb / openssl, 1),
            "ratio_engine_to_openssl_throughput": round(openssl / engine, 3),
            "hash_single_file_fresh_process_MB_per_s": round(single / 1e6, 1),
            "hash_single_file_in_process_MB_per_s": round(in_process / 1e6, 1),
            "openssl_single_file_MB_per_s": round(openssl_big / 1e6, 1),
            "ratio_fresh_process_hash_to_openssl": round(single / openssl_big, 3),
            "dsse_verifications_per_s": round(dsse_rate, 1),
            "link_verifications_per_s": round(link_rate, 1),
            "whole_plan_10_steps_median_ms": round(whole * 1000, 2),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
