# SPDX-License-Identifier: Apache-2.0
"""The system-call rules haios enforces whatever a profile says, as data.

Three tables live here, each with a reason per entry so an auditor can read
them like a policy file:

- `SYMBOLS`: the symbolic names a profile may use in argument filters
  (``AF_UNIX``, ``TIOCSTI``, ``CLONE_NAMESPACE_FLAGS``...), with their x86_64
  values.
- `MANDATORY_REFUSALS`: the escape-relevant calls every compiled filter
  refuses (contract section 12), added by the engine even when a profile
  forgets them; a profile that *allows* one of them is invalid.
- `DANGEROUS_SYSCALLS`: calls a profile may allow, but only in a rule of their
  own whose comment names them (the lint enforces it).

Also here: `masked_cover_excluding`, which expresses "any 32-bit value except
these" as MASKED_EQ comparisons, the only form libseccomp can combine with
other rules for the same call. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterable
from typing import Final

from haios.sandbox import _libc

#: every namespace flag clone(2) accepts (CLONE_NEWTIME is not among them:
#: in clone(2) that bit belongs to the exit-signal field).
CLONE_NAMESPACE_FLAGS: Final = (
    _libc.CLONE_NEWNS
    | _libc.CLONE_NEWCGROUP
    | _libc.CLONE_NEWUTS
    | _libc.CLONE_NEWIPC
    | _libc.CLONE_NEWUSER
    | _libc.CLONE_NEWPID
    | _libc.CLONE_NEWNET
)

#: ioctl(2) commands that inject input into a terminal (CVE-2017-5226,
#: CVE-2019-10063). The kernel reads the command as a 32-bit value, so the
#: filters compare only the low 32 bits.
TIOCSTI: Final = 0x5412
TIOCLINUX: Final = 0x541C
LOW_32_BITS: Final = 0xFFFFFFFF

#: personality(2) values that are not a change: PER_LINUX and the query value.
PERSONALITY_ALLOWED: Final = (0x0, 0xFFFFFFFF)

SYMBOLS: Final[dict[str, int]] = {
    # socket(2) address families (arg 0)
    "AF_UNSPEC": 0,
    "AF_UNIX": 1,
    "AF_INET": 2,
    "AF_INET6": 10,
    "AF_NETLINK": 16,
    "AF_PACKET": 17,
    # clone(2) flags (arg 0)
    "CLONE_NEWNS": _libc.CLONE_NEWNS,
    "CLONE_NEWCGROUP": _libc.CLONE_NEWCGROUP,
    "CLONE_NEWUTS": _libc.CLONE_NEWUTS,
    "CLONE_NEWIPC": _libc.CLONE_NEWIPC,
    "CLONE_NEWUSER": _libc.CLONE_NEWUSER,
    "CLONE_NEWPID": _libc.CLONE_NEWPID,
    "CLONE_NEWNET": _libc.CLONE_NEWNET,
    "CLONE_NAMESPACE_FLAGS": CLONE_NAMESPACE_FLAGS,
    # ioctl(2) commands (arg 1)
    "TIOCSTI": TIOCSTI,
    "TIOCLINUX": TIOCLINUX,
    # personality(2) (arg 0)
    "PER_LINUX": 0x0,
    "PERSONALITY_QUERY": 0xFFFFFFFF,
    # file types in mknod(2) mode bits
    "S_IFMT": 0o170000,
    "S_IFIFO": 0o010000,
    "S_IFREG": 0o100000,
    # masks
    "LOW_32_BITS": LOW_32_BITS,
}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One argument comparison, already numeric (op as in libseccomp)."""

    index: int
    op: str
    value: int
    mask: int = 0


@dataclasses.dataclass(frozen=True)
class MandatoryRule:
    """A refusal the engine compiles into every filter.

    Attributes:
        syscall: the system call name (x86_64).
        errno_value: the errno the caller sees.
        comparisons: conditions (all must hold); empty means always.
        reason: why it is refused (for auditors and evidence).
    """

    syscall: str
    errno_value: int
    comparisons: tuple[Comparison, ...]
    reason: str


def masked_cover_excluding(excluded: Iterable[int], bits: int = 32) -> tuple[tuple[int, int], ...]:
    """(mask, value) pairs matching exactly the `bits`-wide values not in `excluded`.

    A value v matches a pair when ``v & mask == value``. The pairs are the
    siblings of the paths to each excluded value in the binary trie of all
    values, so they are disjoint and cover everything else: at most
    ``bits * len(excluded)`` pairs.

    Args:
        excluded: values to leave out (each below ``2**bits``).
        bits: the width of the values compared.

    Returns:
        The (mask, value) pairs, most significant prefixes first.

    Raises:
        ValueError: an excluded value does not fit in `bits`.
    """
    members = sorted(set(excluded))
    if any(value < 0 or value >= 1 << bits for value in members):
        raise ValueError("excluded value out of range")
    pairs: list[tuple[int, int]] = []
    frontier: list[tuple[int, int, list[int]]] = [(0, 0, members)]
    while frontier:
        prefix, length, inside = frontier.pop(0)
        if length == bits:
            continue
        shift = bits - length - 1
        mask = ((1 << (length + 1)) - 1) << shift
        for bit in (0, 1):
            child = (prefix << 1) | bit
            matching = [value for value in inside if value >> shift == child]
            if matching:
                frontier.append((child, length + 1, matching))
            else:
                pairs.append((mask, child << shift))
    return tuple(pairs)


def _always(name: str, reason: str, errno_value: int = errno.EPERM) -> MandatoryRule:
    return MandatoryRule(name, errno_value, (), reason)


_UNCONDITIONAL: Final[tuple[MandatoryRule, ...]] = (
    _always("ptrace", "reads and rewrites other processes (T-S05)"),
    _always("process_vm_readv", "reads another process's memory (T-S05)"),
    _always("process_vm_writev", "writes another process's memory (T-S05)"),
    _always("pidfd_getfd", "steals a descriptor from another process (T-S05)"),
    _always("kcmp", "compares kernel objects of other processes; ptrace-class probe"),
    _always("mount", "changes the filesystem view (T-S02)"),
    _always("umount2", "uncovers what the view hides (T-S02)"),
    _always("pivot_root", "changes the filesystem root (T-S02)"),
    _always("chroot", "classic chroot escape primitive (T-S02)"),
    _always("open_tree", "new mount API: clones mounts (T-S02)"),
    _always("move_mount", "new mount API: attaches mounts (T-S02)"),
    _always("fsopen", "new mount API: creates filesystems (T-S02)"),
    _always("fsconfig", "new mount API: configures filesystems (T-S02)"),
    _always("fsmount", "new mount API: creates mounts (T-S02)"),
    _always("fspick", "new mount API: reconfigures mounts (T-S02)"),
    _always("mount_setattr", "new mount API: clears read-only flags (T-S02)"),
    _always("unshare", "creates namespaces, incl. user namespaces (T-S03)"),
    _always("setns", "enters other namespaces (T-S03)"),
    _always("bpf", "eBPF verifier is a large kernel attack surface (T-S06)"),
    _always("perf_event_open", "perf subsystem: kernel attack surface and side channels (T-S06)"),
    _always("userfaultfd", "stalls kernel page faults; race-exploit primitive (T-S06)"),
    _always("keyctl", "kernel keyring is not namespaced (T-S06)"),
    _always("add_key", "kernel keyring is not namespaced (T-S06)"),
    _always("request_key", "kernel keyring is not namespaced (T-S06)"),
    _always("kexec_load", "replaces the running kernel (T-S06)"),
    _always("kexec_file_load", "replaces the running kernel (T-S06)"),
    _always("init_module", "loads kernel code (T-S06)"),
    _always("finit_module", "loads kernel code (T-S06)"),
    _always("delete_module", "unloads kernel code (T-S06)"),
    _always("open_by_handle_at", "opens files outside the view by handle (shocker, T-S02)"),
    _always("name_to_handle_at", "companion of open_by_handle_at (T-S02)"),
    _always("io_uring_setup", "io_uring operations bypass seccomp (T-S06)"),
    _always("io_uring_enter", "io_uring operations bypass seccomp (T-S06)"),
    _always("io_uring_register", "io_uring operations bypass seccomp (T-S06)"),
    _always("swapon", "host administration"),
    _always("swapoff", "host administration"),
    _always("reboot", "host administration"),
    _always("acct", "host administration"),
    _always("quotactl", "host administration"),
    _always("syslog", "reads the kernel log (address leaks)"),
    _always("vhangup", "terminal takeover"),
    _always("iopl", "raw I/O port access"),
    _always("ioperm", "raw I/O port access"),
    _always("modify_ldt", "16-bit segment tricks; historical kernel bugs"),
    _always("uselib", "obsolete loader call"),
    _always("settimeofday", "changes the host clock"),
    _always("clock_settime", "changes the host clock"),
    _always("clock_adjtime", "changes the host clock"),
    _always("adjtimex", "changes the host clock"),
    _always("sethostname", "UTS is private, but there is no reason to rename"),
    _always("setdomainname", "UTS is private, but there is no reason to rename"),
    _always("fanotify_init", "filesystem-wide monitoring"),
    _always("lookup_dcookie", "kernel profiling interface"),
    _always(
        "clone3",
        "flags sit behind a pointer seccomp cannot read; ENOSYS makes glibc fall back to clone",
        errno.ENOSYS,
    ),
)


def _clone_namespace_rules() -> tuple[MandatoryRule, ...]:
    flags = ("NEWNS", "NEWCGROUP", "NEWUTS", "NEWIPC", "NEWUSER", "NEWPID", "NEWNET")
    return tuple(
        MandatoryRule(
            "clone",
            errno.EPERM,
            (Comparison(0, "masked_eq", SYMBOLS[f"CLONE_{flag}"], SYMBOLS[f"CLONE_{flag}"]),),
            f"clone with CLONE_{flag} creates a namespace (T-S03)",
        )
        for flag in flags
    )


def _tty_injection_rules() -> tuple[MandatoryRule, ...]:
    return tuple(
        MandatoryRule(
            "ioctl",
            errno.EPERM,
            (Comparison(1, "masked_eq", value, LOW_32_BITS),),
            f"{name} injects input into a terminal (CVE-2017-5226, CVE-2019-10063; T-S07)",
        )
        for name, value in (("TIOCSTI", TIOCSTI), ("TIOCLINUX", TIOCLINUX))
    )


def _personality_rules() -> tuple[MandatoryRule, ...]:
    reason = (
        "personality changes (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE...) weaken exploits' barriers"
    )
    high = MandatoryRule("personality", errno.EPERM, (Comparison(0, "gt", LOW_32_BITS),), reason)
    cover = tuple(
        MandatoryRule(
            "personality", errno.EPERM, (Comparison(0, "masked_eq", value, mask),), reason
        )
        for mask, value in masked_cover_excluding(PERSONALITY_ALLOWED)
    )
    return (high, *cover)


#: Every refusal the engine compiles into the profile filter and the floor
#: filter, whatever the profile says.
MANDATORY_REFUSALS: Final[tuple[MandatoryRule, ...]] = (
    *_UNCONDITIONAL,
    *_clone_namespace_rules(),
    *_tty_injection_rules(),
    *_personality_rules(),
)

#: Calls that may never appear in an allow rule (they are refused outright).
FORBIDDEN_SYSCALLS: Final[frozenset[str]] = frozenset(rule.syscall for rule in _UNCONDITIONAL)

#: Calls a profile may allow only in a rule of their own whose comment names
#: them, so the justification is specific to the call.
DANGEROUS_SYSCALLS: Final[dict[str, str]] = {
    "ioctl": "device control; the engine refuses TIOCSTI/TIOCLINUX on top",
    "prctl": "process attributes; privileged options need capabilities the step lacks",
    "clone": "must carry the CLONE_NAMESPACE_FLAGS mask (namespace creation)",
    "personality": "must be limited to PER_LINUX and the query value",
    "socket": "address families decide what the step can talk to",
    "kill": "signals; the PID namespace and uid bound the targets",
    "tkill": "signals to threads",
    "tgkill": "signals to threads",
    "prlimit64": "other processes' limits; should be limited to pid 0 (self)",
    "mknod": "device nodes; should be limited to FIFOs",
    "mknodat": "device nodes; should be limited to FIFOs",
    "memfd_create": "anonymous executable files",
    "arch_prctl": "CPU state (TLS base, CET)",
    "execveat": "execution from a descriptor",
    "seccomp": "adds filters; can only restrict further",
}

#: Calls the sandbox's init makes after the profile filter is loaded
#: (posix_spawn of the step, reaping, reporting); a profile must allow them
#: unconditionally. clone is required too, with the namespace-flag mask.
REQUIRED_SYSCALLS: Final[tuple[str, ...]] = (
    "execve",
    "exit_group",
    "write",
    "wait4",
    "brk",
    "mmap",
    "munmap",
    "rt_sigprocmask",
    "rt_sigaction",
    "dup2",
    "close",
)

#: The errno names a profile may use.
ERRNO_NAMES: Final[frozenset[str]] = frozenset(errno.errorcode.values())
