# SPDX-License-Identifier: Apache-2.0
"""Dropping privileges in the child: groups, gid, uid, capabilities, no_new_privs.

The order is fixed by the kernel's rules (see `_child.py` for where it sits):

1. `drop_capability_sets`: empty the bounding set (PR_CAPBSET_DROP needs
   CAP_SETPCAP, so before the uid change) and the ambient set.
2. `apply_identity`: setgroups([]) (needs CAP_SETGID), then setresgid (needs
   CAP_SETGID, lost with the uid change), then setresuid.
3. `clear_capabilities`: capset to zero; the uid change clears the effective
   and permitted sets but not the inheritable one.
4. `verify_dropped`: read everything back; a mismatch is a setup failure.
5. `apply_no_new_privs`: exec can never add privileges again (setuid bits,
   file capabilities); it is also what lets an unprivileged process load
   seccomp filters.

No I/O; every function changes the calling process's credentials.
"""

from __future__ import annotations

import errno
import os

from haios.sandbox import _libc


def drop_capability_sets(cap_last_cap: int) -> None:
    """Empty the bounding and ambient capability sets.

    Args:
        cap_last_cap: highest capability number the kernel knows
            (/proc/sys/kernel/cap_last_cap, read by the engine).

    Raises:
        OSError: a capability could not be dropped.

    Side Effects:
        Changes the calling thread's capability sets.
    """
    for cap in range(cap_last_cap + 1):
        _libc.prctl(_libc.PR_CAPBSET_DROP, cap)
    _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL)


def apply_identity(uid: int, gid: int) -> None:
    """No supplementary groups, then gid, then uid (real, effective, saved).

    Raises:
        OSError: the kernel refused a change.

    Side Effects:
        Changes the calling process's credentials for good.
    """
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def clear_capabilities() -> None:
    """capset(2) to empty effective, permitted and inheritable sets.

    Raises:
        OSError: capset failed.

    Side Effects:
        Changes the calling thread's capability sets.
    """
    _libc.capset_zero()


def verify_dropped(uid: int, gid: int) -> None:
    """Read back uid, gid, groups and capabilities; refuse any mismatch.

    Raises:
        OSError: (EPERM) a credential is not what was set.
    """
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise OSError(errno.EPERM, "credentials differ from the requested uid/gid")
    if _libc.capget_self() != (0, 0, 0):
        raise OSError(errno.EPERM, "capabilities remain after the drop")


def apply_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS = 1.

    Raises:
        OSError: prctl failed.

    Side Effects:
        Irreversibly forbids privilege gain on exec for the process and its children.
    """
    _libc.prctl(_libc.PR_SET_NO_NEW_PRIVS, 1)
