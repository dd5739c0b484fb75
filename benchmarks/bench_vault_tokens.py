# SPDX-License-Identifier: Apache-2.0
"""Per-step Vault token overhead: haios vs a bare hvac create+revoke loop.

Starts an OpenBao dev server (tests/support/openbao.py), then measures, in the same
run and interleaved in blocks so drift hits both alike:

- bare:  hvac `auth.token.create` (the same request haios sends) followed by
         `revoke_accessor`, on one hvac client (one HTTP session);
- haios: `HvacProvider.issue` + `write_token_into` (fresh secret tmpfs) +
         `HvacProvider.revoke`, on one provider (one HTTP session);
- haios without the file, to show what the file costs.

Goal (issue 4): haios within 1.1x of bare.

Run from the repository root:

    python -m benchmarks.bench_vault_tokens [--iterations 200] [--block 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from haios.sandbox.stepfs import StepMounts
from haios.secrets import (
    HvacProvider,
    ScopeGrant,
    SecretProvider,
    write_token_into,
)
from tests.support.openbao import ENGINE_POLICY, REPORTS_POLICY, OpenBaoServer

GRANT = ScopeGrant((REPORTS_POLICY,), ttl_seconds=120)
TTL_SECONDS = 60
STEP_IDS = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())


def _bare_step(client: Any, step: int) -> None:
    """One create+revoke with plain hvac, same request as HvacProvider.issue."""
    response = client.auth.token.create(
        policies=list(GRANT.policies),
        meta={"step_id": f"s{step}"},
        no_parent=False,
        no_default_policy=True,
        renewable=False,
        ttl=f"{TTL_SECONDS}s",
        explicit_max_ttl=f"{TTL_SECONDS}s",
        type="service",
        display_name=f"haios-s{step}",
        num_uses=GRANT.num_uses,
    )
    client.auth.token.revoke_accessor(response["auth"]["accessor"])


def _haios_step(provider: SecretProvider, secret_root: Path, step: int) -> None:
    """One step's token life in haios: issue, hand over in the step's secret
    filesystem (a fresh detached tmpfs), drop it, revoke."""
    del secret_root  # nothing of the token lives under a host path
    issued = provider.issue(f"s{step}", GRANT, ttl_seconds=TTL_SECONDS)
    mounts = StepMounts.create(*STEP_IDS, workspace_bytes=1 << 20, workspace_inodes=64,
                               with_secret=True)
    try:
        assert mounts.secret is not None
        write_token_into(mounts.secret.dir.fd, issued, *STEP_IDS)
    finally:
        mounts.close()
    provider.revoke(issued.accessor)


def _haios_no_file_step(provider: SecretProvider, step: int) -> None:
    """issue + revoke only."""
    provider.revoke(provider.issue(f"s{step}", GRANT, ttl_seconds=TTL_SECONDS).accessor)


def _measure(
    loops: dict[str, Callable[[int], None]], iterations: int, block: int
) -> dict[str, list[float]]:
    """Run each loop `iterations` times in alternating blocks; seconds per step."""
    samples: dict[str, list[float]] = {name: [] for name in loops}
    step = 0
    while min(len(s) for s in samples.values()) < iterations:
        for name, run in loops.items():
            for _ in range(min(block, iterations - len(samples[name]))):
                step += 1
                started = time.perf_counter()
                run(step)
                samples[name].append(time.perf_counter() - started)
    return samples


def _report(samples: dict[str, list[float]]) -> None:
    """Print ms per step and ratios against the bare loop."""
    bare_mean = statistics.fmean(samples["bare hvac"])
    bare_median = statistics.median(samples["bare hvac"])
    print(f"{'loop':<24} {'mean ms':>8} {'median':>8} {'p95':>8} {'x bare (mean/median)':>22}")
    for name, values in samples.items():
        ordered = sorted(values)
        mean = statistics.fmean(values)
        median = statistics.median(values)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        print(
            f"{name:<24} {mean * 1e3:8.3f} {median * 1e3:8.3f} {p95 * 1e3:8.3f} "
            f"{mean / bare_mean:10.3f} / {median / bare_median:.3f}"
        )


def main() -> None:
    """Start a dev server, warm up, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    shm = Path("/dev/shm")  # tmpfs, as docs/vault.md recommends for secret dirs
    with (
        tempfile.TemporaryDirectory(prefix="haios-bench-") as work,
        tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as secret_root,
        OpenBaoServer(Path(work)) as server,
    ):
        server.provision()
        engine_token = server.create_token([ENGINE_POLICY])
        client = server.client(engine_token)
        engine = HvacProvider(server.addr, engine_token)
        engine.preflight([GRANT])
        session = engine.open_session("bench")  # as the engine runs a plan
        provider = session.provider
        loops: dict[str, Callable[[int], None]] = {
            "bare hvac": lambda i: _bare_step(client, i),
            "haios issue+file+revoke": lambda i: _haios_step(provider, Path(secret_root), i),
            "haios issue+revoke": lambda i: _haios_no_file_step(provider, i),
        }
        _measure(loops, args.warmup, args.warmup)
        samples = _measure(loops, args.iterations, args.block)
        provider.close()
        engine.revoke(session.accessor)
        engine.close()
    print(f"OpenBao dev server, {args.iterations} steps per loop, blocks of {args.block}")
    _report(samples)


if __name__ == "__main__":
    main()
