# SPDX-License-Identifier: Apache-2.0
"""Descriptors and signals in the child: close what was inherited, reset signal state.

A forked child inherits every descriptor of the engine (state files, the
policy directory, Vault connections, other steps' pipes) and its signal
state (Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored
across execve). Both must be reset before the step runs (runc
CVE-2024-21626 is the leaked-descriptor class; T-S08).

No I/O beyond the descriptor and signal calls themselves.
"""

from __future__ import annotations

import errno
import signal
from typing import Final

from haios.sandbox import _libc

#: the highest descriptor close_range(2) accepts (~0U)
MAX_FD: Final = 0xFFFFFFFF
#: signals glibc reserves for itself (SIGCANCEL, SIGSETXID); libc refuses them
_GLIBC_RESERVED: Final = frozenset({32, 33})
_UNCATCHABLE: Final = frozenset({signal.SIGKILL, signal.SIGSTOP})


def close_fds_except(keep: tuple[int, ...]) -> None:
    """Close every descriptor from 3 up except those in `keep`.

    Args:
        keep: descriptors to leave open (each >= 3).

    Raises:
        OSError: close_range failed.

    Side Effects:
        Closes descriptors of the calling process.
    """
    start = 3
    for fd in sorted(set(keep)):
        if fd > start:
            _libc.close_range(start, fd - 1)
        start = max(start, fd + 1)
    _libc.close_range(start, MAX_FD)


def _non_default_signals() -> range | set[int]:
    """Signals whose disposition is not SIG_DFL, from /proc/self/status.

    Reading the two masks costs one small file read instead of ~60 calls; if
    the file cannot be read, every signal is treated as non-default.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            text = status.read()
    except OSError:
        return range(1, signal.NSIG)
    masks = 0
    for line in text.splitlines():
        if line.startswith((b"SigIgn:", b"SigCgt:")):
            masks |= int(line.split()[1], 16)
    return {signum for signum in range(1, signal.NSIG) if masks >> (signum - 1) & 1}


def reset_signals() -> None:
    """Every caught or ignored signal to SIG_DFL, then an empty signal mask.

    Dispositions first: a signal pending under the old mask must meet the
    default action, not an inherited handler or SIG_IGN.

    Raises:
        OSError: a disposition or the mask could not be set.

    Side Effects:
        Changes the calling process's signal dispositions and mask.
    """
    for signum in _non_default_signals():
        if signum in _UNCATCHABLE or signum in _GLIBC_RESERVED:
            continue
        try:
            _libc.reset_signal_disposition(signum)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
