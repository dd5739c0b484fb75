# SPDX-License-Identifier: Apache-2.0
"""Reaping a helper process (watchdog, launcher) the moment it exits."""

from __future__ import annotations

import os
import select
import subprocess


def wait_exited(process: subprocess.Popen[bytes], timeout_seconds: float) -> bool:
    """Reap `process` as soon as it exits; False if it still runs after the timeout.

    `Popen.wait(timeout)` polls in sleeps doubling up to 50 ms, so it sees an
    exit up to that late; a pidfd is readable the moment the process exits.

    Side Effects:
        Waits; reaps the process.
    """
    if process.poll() is not None:
        return True
    try:
        # Unreaped (poll above) and reaped only through `process`: the pid
        # still names this child.
        pidfd = os.pidfd_open(process.pid)
    except OSError:
        pidfd = -1  # reaped meanwhile through `process`: its wait returns at once
    if pidfd >= 0:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(timeout_seconds * 1000):
                return False
        finally:
            os.close(pidfd)
    try:
        process.wait(timeout_seconds)
    except subprocess.TimeoutExpired:
        return False
    return True
