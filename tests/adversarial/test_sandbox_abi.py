# SPDX-License-Identifier: Apache-2.0
"""Non-native ABIs and unknown system calls kill the step (T-S06).

The attacker calls the kernel through an ABI the allowlist does not
describe: x32 numbers (bit 30 set, same x86_64 arch token), the i386 ABI
through ``int 0x80``, or a number no rule mentions. seccomp's x86_64 filters
send all of these to KILL_PROCESS; the engine records violation "seccomp".
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from haios.sandbox.runner import NamespaceRunner
from tests.support.sandbox import (
    run_python_probe,
    workspace_path,
)

X32_SYSCALL_BIT = 0x40000000
STARTED = "open('/haios/work/started', 'w').close()\n"

# mov eax, 26 (i386 ptrace); int 0x80; ret. Executed from an anonymous
# executable mapping; the arch token of an int 0x80 entry is AUDIT_ARCH_I386.
INT80_PTRACE = (
    "import mmap\n"
    "code = bytes([0xB8, 0x1A, 0, 0, 0, 0xCD, 0x80, 0xC3])\n"
    "page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
    "page.write(code)\n"
    "address = ctypes.addressof(ctypes.c_char.from_buffer(page))\n"
    "open('/haios/work/started', 'w').close()\n"
    "ctypes.CFUNCTYPE(ctypes.c_long)(address)()\n"
    "save()\n"
)


@pytest.mark.parametrize(
    ("name", "body"),
    [
        (
            "x32_getpid",
            f"{STARTED}try_syscall({X32_SYSCALL_BIT | 39})\nsave()",
        ),
        (
            "x32_ptrace",
            f"{STARTED}try_syscall({X32_SYSCALL_BIT | 521}, 16, 1)\nsave()",
        ),
        ("unknown_1000", "open('/haios/work/started', 'w').close()\ntry_syscall(1000)\nsave()"),
        ("i386_int80", INT80_PTRACE),
    ],
)
def test_foreign_abi_or_unknown_call_kills_the_step(tmp_path: Path, name: str, body: str) -> None:
    probe = run_python_probe(NamespaceRunner(), tmp_path, body, name=name)
    assert (workspace_path(probe.spec) / "started").exists(), probe.stderr
    assert probe.results == {}
    assert probe.outcome.signal == signal.SIGSYS
    assert probe.outcome.violation == "seccomp"
    assert probe.outcome.exit_code is None
