# SPDX-License-Identifier: Apache-2.0
"""The console entry point's prompt exit (`haios.cli.main.console`).

Whether the prompt exit was taken is seen from outside: it skips the
interpreter's teardown, so an atexit handler registered before it never
runs; the normal exit runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

DRIVER = """\
import atexit, sys, threading
atexit.register(lambda: sys.stderr.write("teardown ran\\n"))
mode, args = sys.argv[1], sys.argv[2:]
if mode in ("thread", "daemon"):
    threading.Thread(target=threading.Event().wait, args=(0.3,), daemon=mode == "daemon").start()
sys.argv = ["haios", *args]
from haios.cli.main import console
console()
"""


def _console(mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", DRIVER, mode, *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_prompt_exit_keeps_output_and_code() -> None:
    done = _console("alone", "--help")
    assert done.returncode == 0, done.stderr
    assert "Exit codes:" in done.stdout  # buffered output reached the pipe before the exit
    assert "teardown ran" not in done.stderr


@pytest.mark.parametrize("args,code", [(("no-such-command",), 2),
                                       (("state", "/nonexistent/os_root",
                                         "--policy", "/nonexistent/policy"), 6)])
def test_prompt_exit_keeps_failure_codes(args: tuple[str, ...], code: int) -> None:
    done = _console("alone", *args)
    assert done.returncode == code, done.stderr
    assert done.stderr.startswith(("Usage:", "haios: ")), done.stderr
    assert "teardown ran" not in done.stderr


def test_a_live_daemon_thread_does_not_hold_the_exit() -> None:
    """The normal exit would not wait for it either (an import warming up is one)."""
    done = _console("daemon", "--help")
    assert done.returncode == 0, done.stderr
    assert "Exit codes:" in done.stdout
    assert "teardown ran" not in done.stderr


def test_a_live_thread_gets_the_normal_exit() -> None:
    done = _console("thread", "--help")
    assert done.returncode == 0, done.stderr
    assert "Exit codes:" in done.stdout
    assert "teardown ran" in done.stderr


def test_a_closed_stdout_still_exits_with_the_code() -> None:
    """fd 1 closed at start (sys.stdout is None): the prompt exit skips it, the code stays."""
    done = subprocess.run([sys.executable, "-c", DRIVER, "alone", "no-such-command"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=60, check=False, preexec_fn=lambda: os.close(1))
    assert done.returncode == 2, done.stderr
    assert "teardown ran" not in done.stderr
