# SPDX-License-Identifier: Apache-2.0
"""Shrinking what the watchdog process can do, right after it starts.

The watchdog must stay uid 0 (it writes root-owned `cgroup.kill` files and
removes root-owned cgroup directories, which needs no capability as their
owner), but it needs almost none of root's capabilities. `harden_process`:

1. closes every inherited descriptor above stderr (nothing it was not given);
2. sets umask 077 and cwd "/" (holds no mount busy);
3. disables core dumps and marks itself non-dumpable, so no other process of
   a lower privilege can ptrace it or read its memory through /proc;
4. asks for `oom_score_adj` -1000, so the OOM killer picks a step, not the
   process that must kill steps (attack catalog case 111). This needs
   CAP_SYS_RESOURCE, which a container may withhold; without it the
   watchdog runs unprotected from the OOM killer and says so (the engine
   still fails closed if the watchdog dies);
5. drops every capability from the bounding, inheritable and ambient sets and
   keeps only CAP_KILL (the freeze fallback signals step uids) and
   CAP_DAC_READ_SEARCH (lstat and watch flags in a client-owned `control/`)
   in the permitted and effective sets;
6. sets no_new_privs (it never executes anything; this makes sure of it).

It deliberately does not set PR_SET_PDEATHSIG: the watchdog must outlive the
engine to kill the step trees when the engine dies (docs/watchdog.md).

I/O: prctl, capset, setrlimit, a /proc write, close.
"""

from __future__ import annotations

import ctypes
import os
import resource
from pathlib import Path
from typing import Final

from haios.errors import EnvironmentUnavailableError

_PR_SET_DUMPABLE: Final = 4
_PR_CAPBSET_DROP: Final = 24
_PR_SET_NO_NEW_PRIVS: Final = 38
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522

CAP_DAC_READ_SEARCH: Final = 2
CAP_KILL: Final = 5
#: the capabilities the watchdog keeps (see the module docstring, item 5)
KEPT_CAPABILITIES: Final = frozenset({CAP_DAC_READ_SEARCH, CAP_KILL})

# stdin and stdout are the protocol pipes, stderr the engine's diagnostics.
_LAST_STD_FD: Final = 2
_CAP_WORD_BITS: Final = 32
_CAP_LAST_CAP: Final = Path("/proc/sys/kernel/cap_last_cap")
_OOM_SCORE_ADJ: Final = Path("/proc/self/oom_score_adj")


class _CapHeader(ctypes.Structure):
    """struct __user_cap_header_struct (linux/capability.h)."""

    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    """struct __user_cap_data_struct (linux/capability.h)."""

    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _libc() -> ctypes.CDLL:
    """Return the interpreter's own libc (no ctypes.util import)."""
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, arg2: int = 0) -> None:
    """Call prctl(option, arg2, 0, 0, 0); raise EnvironmentUnavailableError on failure."""
    zero = ctypes.c_ulong(0)
    result = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), zero, zero, zero)
    if result != 0:
        err = ctypes.get_errno()
        raise EnvironmentUnavailableError(f"prctl({option}) failed: {os.strerror(err)}")


def _capability_words(caps: frozenset[int]) -> tuple[int, int]:
    """Split a capability set into the two 32-bit words capset(2) takes."""
    low = sum(1 << c for c in caps if c < _CAP_WORD_BITS)
    high = sum(1 << (c - _CAP_WORD_BITS) for c in caps if c >= _CAP_WORD_BITS)
    return low, high


def _drop_capabilities(libc: ctypes.CDLL, keep: frozenset[int]) -> None:
    """Keep only `keep` in every capability set of this process."""
    last_cap = int(_CAP_LAST_CAP.read_text(encoding="ascii"))
    # The bounding set first: dropping from it needs CAP_SETPCAP, which the
    # capset below removes.
    for cap in range(last_cap + 1):
        if cap not in keep:
            _prctl(libc, _PR_CAPBSET_DROP, cap)
    _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    low, high = _capability_words(keep)
    data = (_CapData * 2)(_CapData(low, low, 0), _CapData(high, high, 0))
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        err = ctypes.get_errno()
        raise EnvironmentUnavailableError(f"capset failed: {os.strerror(err)}")


def _close_inherited_fds() -> None:
    """Close every descriptor above stderr."""
    # subprocess already passes only 0-2, but the watchdog must not depend on
    # its parent's discipline to hold no other descriptor.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > _LAST_STD_FD:
            try:
                os.close(fd)
            except OSError:
                continue  # the listing's own descriptor, already closed


def _protect_from_oom() -> bool:
    """Ask for oom_score_adj -1000; False when the kernel refuses (EACCES)."""
    try:
        _OOM_SCORE_ADJ.write_text("-1000", encoding="ascii")
    except PermissionError:
        return False
    except OSError as e:
        raise EnvironmentUnavailableError(f"cannot set oom_score_adj: {e.strerror}") from e
    return True


def harden_process() -> bool:
    """Reduce the watchdog's own privileges; see the module docstring.

    Returns:
        True when the OOM killer will spare the watchdog (item 4), False when
        the kernel refused (no CAP_SYS_RESOURCE).

    Raises:
        EnvironmentUnavailableError: a step failed (not root, no prctl or
            capset): the watchdog refuses to run rather than run stronger
            than designed.

    Side Effects:
        Changes this process's fds, umask, cwd, rlimits, dumpable flag,
        oom_score_adj, capability sets and no_new_privs.
    """
    _close_inherited_fds()
    os.umask(0o077)
    os.chdir("/")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except OSError as e:
        raise EnvironmentUnavailableError(f"cannot disable core dumps: {e}") from e
    oom_protected = _protect_from_oom()
    libc = _libc()
    _prctl(libc, _PR_SET_DUMPABLE, 0)
    _drop_capabilities(libc, KEPT_CAPABILITIES)
    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
    return oom_protected
