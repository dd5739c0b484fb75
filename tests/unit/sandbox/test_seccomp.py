# SPDX-License-Identifier: Apache-2.0
"""The compiled filters: mandatory refusals, architecture pinning, caching.

Threat T-S06: a filter that lets a refused call through, accepts a foreign
ABI, or differs from what the profile says. These tests read the compiled
BPF and the rule tables; the adversarial suite checks the same from inside a
step.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from haios.errors import SandboxSetupError
from haios.sandbox import seccomp, syscall_policy
from haios.sandbox.profile import load_profile
from tests.support.sandbox import POLICY_DIR


@given(
    excluded=st.sets(st.integers(min_value=0, max_value=2**32 - 1), max_size=4),
    probe=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_masked_cover_matches_exactly_the_values_not_excluded(
    excluded: set[int], probe: int
) -> None:
    pairs = syscall_policy.masked_cover_excluding(excluded)
    matches = [1 for mask, value in pairs if probe & mask == value]
    assert len(matches) == (0 if probe in excluded else 1)  # disjoint and complete


def test_personality_cover_leaves_only_the_default_and_the_query() -> None:
    pairs = syscall_policy.masked_cover_excluding(syscall_policy.PERSONALITY_ALLOWED)
    for value in (0x0, 0xFFFFFFFF):
        assert not any(value & mask == match for mask, match in pairs)
    for value in (0x0400000, 0x0040000, 0x0008, 0xFFFFFFFE, 1):
        assert any(value & mask == match for mask, match in pairs)


def test_mandatory_refusals_cover_the_contract_list() -> None:
    contract = {
        "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "unshare", "setns",
        "pivot_root", "chroot", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key",
        "request_key", "kexec_load", "kexec_file_load", "init_module", "finit_module",
        "delete_module", "open_by_handle_at", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "clone3",
    }  # fmt: skip
    assert contract <= syscall_policy.FORBIDDEN_SYSCALLS
    conditional = {rule.syscall for rule in syscall_policy.MANDATORY_REFUSALS if rule.comparisons}
    assert conditional == {"clone", "ioctl", "personality"}
    assert all(rule.reason for rule in syscall_policy.MANDATORY_REFUSALS)


def _instructions(bpf: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack_from("<HBBI", bpf, offset) for offset in range(0, len(bpf), 8)]


@pytest.mark.parametrize("name", ["default", "network"])
def test_filters_start_with_the_architecture_and_x32_guard(name: str) -> None:
    profile = load_profile(POLICY_DIR, name)
    for program in (seccomp.profile_program(profile), seccomp.floor_program()):
        head = _instructions(program.bpf)[:4]
        assert [(code, k) for code, _jt, _jf, k in head] == [
            (0x20, 4),  # load arch
            (0x15, seccomp.AUDIT_ARCH_X86_64),  # only x86_64
            (0x20, 0),  # load nr
            (0x35, seccomp.X32_SYSCALL_BIT),  # nr >= 0x40000000 -> bad arch
        ]
        # The bad-arch target is KILL_PROCESS.
        assert (0x06, 0, 0, 0x80000000) in _instructions(program.bpf)


def test_a_program_without_the_guard_is_rejected() -> None:
    allow_all = struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000) * 4
    with pytest.raises(SandboxSetupError, match="architecture guard"):
        seccomp._verify_bpf(allow_all)


def test_default_action_kills_the_process() -> None:
    program = seccomp.profile_program(load_profile(POLICY_DIR, "default"))
    assert (0x06, 0, 0, 0x80000000) in _instructions(program.bpf)


def test_programs_are_compiled_once_per_digest() -> None:
    profile = load_profile(POLICY_DIR, "default")
    again = load_profile(POLICY_DIR, "default")
    assert seccomp.profile_program(profile) is seccomp.profile_program(again)
    assert seccomp.floor_program() is seccomp.floor_program()


def test_compilation_is_deterministic() -> None:
    profile = load_profile(POLICY_DIR, "network")
    assert seccomp.compile_profile_filter(profile).sha256 == seccomp.profile_program(profile).sha256


def test_floor_allows_by_default_but_denies_mandatory_calls() -> None:
    floor = seccomp.floor_program()
    actions = {k for code, _jt, _jf, k in _instructions(floor.bpf) if code == 0x06}
    assert 0x7FFF0000 in actions  # ALLOW (default of the floor only)
    assert 0x00050000 | 1 in actions  # ERRNO(EPERM)
    assert 0x00050000 | 38 in actions  # ERRNO(ENOSYS) for clone3
