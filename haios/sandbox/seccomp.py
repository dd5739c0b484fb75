# SPDX-License-Identifier: Apache-2.0
"""Compile profiles into seccomp BPF once per run, and load it in the child.

Two classic-BPF programs are stacked on every step; the kernel runs both and
applies the most restrictive answer:

1. the **floor** filter: default ALLOW, refusing only
   `syscall_policy.MANDATORY_REFUSALS` (ptrace, mount, unshare, bpf,
   io_uring, TIOCSTI, clone with namespace flags, clone3 -> ENOSYS, ...). It is
   the same for every profile, so a profile that allowed one of those calls
   would still be refused (the profile loader rejects such a profile anyway).
2. the **profile** filter: default DENY (the profile's action), the profile's
   allow and deny rules, plus the mandatory refusals again so that refused
   calls get their errno instead of the default kill.

Both are pinned to the native x86_64 ABI: any other architecture (i386 through
``int 0x80``) and any x32 call number (bit 30 set) takes the bad-architecture
action, KILL_PROCESS. `compile_*` verifies that guard in the emitted program.

Compilation uses libseccomp through pyseccomp and happens in the engine (no
file I/O; the BPF is exported through a memfd). Programs are cached by
profile digest. The child only calls seccomp(2) with the precompiled bytes
(`haios.sandbox._child`), which keeps its work to two system calls.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import struct
import threading
from types import ModuleType
from typing import Any, Final, Protocol

from haios.errors import PolicyLoadError, SandboxSetupError
from haios.sandbox import syscall_policy
from haios.sandbox.seccomp_rules import SeccompPolicy


class Profile(Protocol):
    """What the compiler reads of a sandbox profile (haios/sandbox/profile.py)."""

    @property
    def name(self) -> str:
        """The profile's name, for messages."""
        ...

    @property
    def digest(self) -> str:
        """The digest of the profile's file, the compile cache's key."""
        ...

    @property
    def seccomp(self) -> SeccompPolicy:
        """The profile's seccomp rules."""
        ...

AUDIT_ARCH_X86_64: Final = 0xC000003E
X32_SYSCALL_BIT: Final = 0x40000000
BPF_INSTRUCTION_BYTES: Final = 8
BPF_MAX_INSTRUCTIONS: Final = 4096

# classic BPF opcodes appearing in the guard libseccomp emits
_BPF_LD_W_ABS: Final = 0x20
_BPF_JMP_JEQ_K: Final = 0x15
_BPF_JMP_JGE_K: Final = 0x35
_SECCOMP_DATA_NR: Final = 0
_SECCOMP_DATA_ARCH: Final = 4


@dataclasses.dataclass(frozen=True)
class SeccompProgram:
    """One exported classic-BPF program.

    Attributes:
        bpf: the `struct sock_filter` array, as seccomp(2) takes it.
        sha256: hex SHA-256 of `bpf` (recorded in the step's evidence).
        rules: how many libseccomp rules went into it.
    """

    bpf: bytes
    sha256: str
    rules: int


def _pyseccomp() -> ModuleType:
    """Import pyseccomp, translating a missing libseccomp into our error.

    Raises:
        SandboxSetupError: pyseccomp or libseccomp.so.2 is not available.
    """
    try:
        import pyseccomp  # type: ignore[import-untyped,unused-ignore]  # no stubs
    except (ImportError, OSError, RuntimeError) as exc:
        raise SandboxSetupError(f"libseccomp is not available ({exc})") from exc
    module: ModuleType = pyseccomp
    return module


def _arg(sc: ModuleType, comparison: syscall_policy.Comparison) -> Any:
    ops = {"eq": sc.EQ, "ne": sc.NE, "lt": sc.LT, "le": sc.LE, "gt": sc.GT, "ge": sc.GE}
    if comparison.op == "masked_eq":
        return sc.Arg(comparison.index, sc.MASKED_EQ, comparison.mask, comparison.value)
    return sc.Arg(comparison.index, ops[comparison.op], comparison.value)


def _new_filter(sc: ModuleType, default_action: int) -> Any:
    flt = sc.SyscallFilter(default_action)
    # Native x86_64 only (libseccomp adds just the native arch by default);
    # anything else, and x32 numbers, take the bad-arch action.
    if (
        not flt.exist_arch(sc.Arch.X86_64)
        or flt.exist_arch(sc.Arch.X32)
        or flt.exist_arch(sc.Arch.X86)
    ):
        raise SandboxSetupError("libseccomp native architecture is not x86_64 alone")
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    # Binary-tree dispatch keeps long allowlists fast (libseccomp >= 2.5).
    flt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
    return flt


def _resolve(sc: ModuleType, name: str) -> int:
    number = int(sc.resolve_syscall(sc.Arch.NATIVE, name))
    if number < 0:
        raise PolicyLoadError(f"unknown x86_64 system call {name!r}")
    return number


def _add(
    sc: ModuleType,
    flt: Any,
    action: int,
    name: str,
    comparisons: tuple[syscall_policy.Comparison, ...],
) -> None:
    try:
        flt.add_rule_exactly(action, _resolve(sc, name), *(_arg(sc, c) for c in comparisons))
    except OSError as exc:
        raise PolicyLoadError(
            f"seccomp rule for {name} rejected by libseccomp ({exc.strerror})"
        ) from exc


def _export(flt: Any, rules: int) -> SeccompProgram:
    fd = os.memfd_create("haios-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "w+b", closefd=False) as handle:
            flt.export_bpf(handle)
            handle.seek(0)
            bpf = handle.read()
    finally:
        os.close(fd)
    _verify_bpf(bpf)
    return SeccompProgram(bpf, hashlib.sha256(bpf).hexdigest(), rules)


def _verify_bpf(bpf: bytes) -> None:
    """Check size and the architecture/x32 guard at the top of the program.

    libseccomp starts every single-arch program with: load arch; if arch !=
    x86_64 goto bad-arch; load nr; if nr >= X32_SYSCALL_BIT goto (bad-arch
    unless nr == -1). We refuse a program that lacks it rather than trust it.

    Raises:
        SandboxSetupError: the program is malformed or lacks the guard.
    """
    count, rest = divmod(len(bpf), BPF_INSTRUCTION_BYTES)
    if rest or not 4 <= count <= BPF_MAX_INSTRUCTIONS:
        raise SandboxSetupError(f"seccomp program has a bad size ({len(bpf)} bytes)")
    head = [struct.unpack_from("<HBBI", bpf, i * BPF_INSTRUCTION_BYTES) for i in range(4)]
    expected = (
        (_BPF_LD_W_ABS, _SECCOMP_DATA_ARCH),
        (_BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64),
        (_BPF_LD_W_ABS, _SECCOMP_DATA_NR),
        (_BPF_JMP_JGE_K, X32_SYSCALL_BIT),
    )
    if [(code, k) for code, _jt, _jf, k in head] != list(expected):
        raise SandboxSetupError("seccomp program lacks the x86_64/x32 architecture guard")


def _errno_value(name: str) -> int:
    value = getattr(errno, name, None)
    if not isinstance(value, int):
        raise PolicyLoadError(f"unknown errno name {name!r}")
    return value


def _unconditional_allows(profile: Profile) -> set[str]:
    return {name for rule in profile.seccomp.allow if not rule.args for name in rule.syscalls}


def _unconditional_denies(profile: Profile) -> set[str]:
    return {name for rule in profile.seccomp.deny if not rule.args for name in rule.syscalls}


def compile_profile_filter(profile: Profile) -> SeccompProgram:
    """Build the profile's default-deny filter.

    Args:
        profile: a validated profile.

    Returns:
        The exported program.

    Raises:
        PolicyLoadError: an unknown system call or errno name, a rule
            libseccomp refuses, or an allow rule for a refused call.
        SandboxSetupError: libseccomp is missing or emits no arch guard.
    """
    sc = _pyseccomp()
    policy = profile.seccomp
    if policy.default_action == "kill_process":
        default = sc.KILL_PROCESS
    elif policy.default_action == "errno" and policy.default_errno is not None:
        default = sc.ERRNO(_errno_value(policy.default_errno))
    else:
        # Never fall back to a permissive default (model_construct bypass).
        raise PolicyLoadError(f"profile {profile.name}: default action must deny")
    flt = _new_filter(sc, default)
    rules = 0
    for allow in policy.allow:
        for name in allow.syscalls:
            if name in syscall_policy.FORBIDDEN_SYSCALLS:
                raise PolicyLoadError(
                    f"profile {profile.name}: allows {name}, which haios always refuses"
                )
            _add(sc, flt, sc.ALLOW, name, tuple(a.comparison() for a in allow.args))
            rules += 1
    for deny in policy.deny:
        for name in deny.syscalls:
            _add(
                sc,
                flt,
                sc.ERRNO(_errno_value(deny.errno)),
                name,
                tuple(a.comparison() for a in deny.args),
            )
            rules += 1
    rules += _add_mandatory(
        sc, flt, skip=_unconditional_allows(profile) | _unconditional_denies(profile)
    )
    return _export(flt, rules)


def _add_mandatory(sc: ModuleType, flt: Any, skip: set[str]) -> int:
    """Add every mandatory refusal except for calls in `skip`.

    A call the profile allows or denies unconditionally is skipped: libseccomp
    would merge the two rules and drop the condition. Allowed ones (ioctl)
    are still refused by the floor filter, whose ERRNO beats ALLOW.
    """
    added = 0
    for rule in syscall_policy.MANDATORY_REFUSALS:
        if rule.syscall in skip:
            continue
        _add(sc, flt, sc.ERRNO(rule.errno_value), rule.syscall, rule.comparisons)
        added += 1
    return added


def compile_floor_filter() -> SeccompProgram:
    """Build the profile-independent floor filter (default ALLOW + mandatory refusals).

    Raises:
        SandboxSetupError: libseccomp is missing or emits no arch guard.
    """
    sc = _pyseccomp()
    flt = _new_filter(sc, sc.ALLOW)
    rules = _add_mandatory(sc, flt, skip=set())
    return _export(flt, rules)


_cache_lock = threading.Lock()
_profile_cache: dict[str, tuple[Profile, SeccompProgram]] = {}
_floor_cache: list[SeccompProgram] = []


def floor_program() -> SeccompProgram:
    """The floor filter, compiled once per process.

    Raises:
        SandboxSetupError: as `compile_floor_filter`.
    """
    with _cache_lock:
        if not _floor_cache:
            _floor_cache.append(compile_floor_filter())
        return _floor_cache[0]


def profile_program(profile: Profile) -> SeccompProgram:
    """The profile's filter, compiled once per profile digest and process.

    A cached entry is reused only for an equal profile, so two different
    models carrying the same digest (built in code) never share a program.

    Raises:
        PolicyLoadError: as `compile_profile_filter`.
        SandboxSetupError: as `compile_profile_filter`.
    """
    with _cache_lock:
        cached = _profile_cache.get(profile.digest)
        if cached is not None and (cached[0] is profile or cached[0] == profile):
            return cached[1]
    program = compile_profile_filter(profile)
    with _cache_lock:
        _profile_cache[profile.digest] = (profile, program)
    return program

