# SPDX-License-Identifier: Apache-2.0
"""Entry point of the watchdog process: `python -m haios.watchdog`.

The engine starts it through `haios.watchdog.client.Watchdog.start`, never by
hand: its stdin and stdout are the protocol pipes (see `protocol.py`), and
its first input line is its configuration. It imports only the standard
library and the small `haios.watchdog` modules (no pydantic, no in-toto), so
it is watching within tens of milliseconds.

What it does not do: parse command-line options (there are none). I/O: all of
`_daemon.run`.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from haios.watchdog._daemon import run


def main() -> int:
    """Run the watchdog and return its exit status.

    Side Effects:
        See `haios.watchdog._daemon.run`.
    """
    return run()


def exit_process(status: int) -> NoReturn:
    """Exit with `status` without tearing the interpreter down.

    `run` has closed and synced its journal; the protocol goes straight to
    the descriptors. Skipping the teardown (about 5 ms) shortens every
    run's close, which waits for this process to exit.

    Side Effects:
        Flushes stdout and stderr, ends the process.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_process(main())
