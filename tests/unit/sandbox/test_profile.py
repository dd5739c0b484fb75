# SPDX-License-Identifier: Apache-2.0
"""Profile loading and lint: every invalid profile is PolicyLoadError (exit 6).

Threat T-S11 (a weakened or ambiguous profile): an operator typo, an
allow-by-default filter, an unjustified dangerous call, a duplicate rule
libseccomp would silently merge, or a symlink planted in the policy folder
must stop the run before any step starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from haios.errors import EXIT_ENVIRONMENT, PolicyLoadError
from haios.sandbox.profile import Profile, lint_profile, lint_profile_result, load_profile
from tests.support.sandbox import MINIMAL_PROFILE as MINIMAL
from tests.support.sandbox import POLICY_DIR, write_profile


def test_minimal_profile_loads(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, MINIMAL), "test")
    assert profile.name == "test"
    assert profile.rlimits.cpu_seconds == 60
    assert profile.rlimits.processes == 256  # documented default
    assert len(profile.digest) == 64


@pytest.mark.parametrize("name", ["default", "network"])
def test_shipped_profiles_load_and_lint_clean(name: str) -> None:
    profile = load_profile(POLICY_DIR, name)
    assert lint_profile_result(profile) == ()
    assert profile.egress == (("vault",) if name == "network" else ())
    assert profile.unsafe_host_network is False


def test_digest_is_the_sha256_of_the_file_bytes(tmp_path: Path) -> None:
    import hashlib

    policy = write_profile(tmp_path, MINIMAL)
    profile = load_profile(policy, "test")
    assert (
        profile.digest
        == hashlib.sha256((policy / "profiles" / "test.toml").read_bytes()).hexdigest()
    )


INVALID = {
    "unknown_top_level_field": (MINIMAL + '\nextra = "x"\n', "extra"),
    "unknown_rlimit": (
        MINIMAL.replace("cpu_seconds = 60", "cpu_seconds = 60\nstack_bytes = 1"),
        "stack_bytes",
    ),
    "allow_by_default": (
        MINIMAL.replace('default_action = "kill_process"', 'default_action = "allow"'),
        "default_action",
    ),
    "log_by_default": (
        MINIMAL.replace('default_action = "kill_process"', 'default_action = "log"'),
        "default_action",
    ),
    "errno_default_without_errno": (MINIMAL.replace('"kill_process"', '"errno"'), "default_errno"),
    "missing_comment": (
        MINIMAL.replace('comment = "Polite refusal for the tests."\n', ""),
        "comment",
    ),
    "empty_comment": (MINIMAL.replace('"Programs and libraries."', '"  "'), "comment"),
    "wrong_schema": (MINIMAL.replace("haios/profile/v1", "haios/profile/v2"), "schema"),
    "string_for_int": (MINIMAL.replace("cpu_seconds = 60", 'cpu_seconds = "60"'), "cpu_seconds"),
    "bool_for_int": (MINIMAL.replace("cpu_seconds = 60", "cpu_seconds = true"), "cpu_seconds"),
    "zero_cpu": (MINIMAL.replace("cpu_seconds = 60", "cpu_seconds = 0"), "cpu_seconds"),
    "relative_path": (MINIMAL.replace('path = "/usr"', 'path = "usr"'), "absolute"),
    "dotdot_path": (MINIMAL.replace('path = "/usr"', 'path = "/usr/../etc"'), "normalised"),
    "reserved_path": (MINIMAL.replace('path = "/usr"', 'path = "/proc"'), "built by the sandbox"),
    "workspace_path": (
        MINIMAL.replace('path = "/usr"', 'path = "/haios/work"'),
        "built by the sandbox",
    ),
    "name_in_file": ('name = "other"\n' + MINIMAL, "set by the engine"),
    "digest_in_file": ('digest = "00"\n' + MINIMAL, "set by the engine"),
    "invalid_toml": (MINIMAL + "\n[[[", "invalid TOML"),
    "forbidden_allowed": (
        MINIMAL.replace('"execve", "exit_group"', '"ptrace", "execve", "exit_group"'),
        "always refuses",
    ),
    "io_uring_allowed": (
        MINIMAL.replace('"execve", "exit_group"', '"io_uring_setup", "execve", "exit_group"'),
        "always refuses",
    ),
    "unjustified_dangerous": (
        MINIMAL.replace('"execve", "exit_group"', '"ioctl", "execve", "exit_group"'),
        "dangerous ioctl",
    ),
    "clone_without_mask": (
        MINIMAL.replace(
            'args = [{ index = 0, op = "masked_eq", mask = "CLONE_NAMESPACE_FLAGS", value = 0 }]',
            "",
        ),
        "CLONE_NAMESPACE_FLAGS",
    ),
    "clone_mask_misses_newuser": (
        MINIMAL.replace('mask = "CLONE_NAMESPACE_FLAGS"', 'mask = "CLONE_NEWNS|CLONE_NEWPID"'),
        "CLONE_NAMESPACE_FLAGS",
    ),
    "personality_unconditional": (
        MINIMAL
        + '\n[[seccomp.allow]]\ncomment = "personality for all"\nsyscalls = ["personality"]\n',
        "personality must be limited",
    ),
    "duplicate_rule": (
        MINIMAL + '\n[[seccomp.allow]]\ncomment = "write again"\nsyscalls = ["write"]\n',
        "duplicate rule",
    ),
    "unconditional_and_conditional": (
        MINIMAL
        + '\n[[seccomp.deny]]\ncomment = "write to fd 9"\nsyscalls = ["write"]\nerrno = "EPERM"\n'
        + 'args = [{ index = 0, op = "eq", value = 9 }]\n',
        "also listed unconditionally",
    ),
    "same_call_twice_in_rule": (
        MINIMAL.replace('"execve", "exit_group"', '"execve", "execve", "exit_group"'),
        "twice",
    ),
    "duplicate_path": (
        MINIMAL.replace(
            "[seccomp]", '[[filesystem.read_only]]\npath = "/usr"\ncomment = "again"\n\n[seccomp]'
        ),
        "duplicate path",
    ),
    "nested_path": (
        MINIMAL.replace(
            "[seccomp]",
            '[[filesystem.read_only]]\npath = "/usr/share"\ncomment = "nested"\n\n[seccomp]',
        ),
        "inside /usr",
    ),
    "required_call_missing": (MINIMAL.replace('"wait4", ', ""), "must include wait4"),
    "unknown_errno": (MINIMAL.replace('errno = "EPERM"', 'errno = "EWHATEVER"'), "errno"),
    "unknown_symbol": (MINIMAL.replace("CLONE_NAMESPACE_FLAGS", "CLONE_EVERYTHING"), "symbol"),
    "masked_eq_without_mask": (MINIMAL.replace('mask = "CLONE_NAMESPACE_FLAGS", ', ""), "mask"),
    "mask_without_masked_eq": (
        MINIMAL.replace('op = "masked_eq", mask = "CLONE_NAMESPACE_FLAGS"', 'op = "eq", mask = 1'),
        "mask",
    ),
    "arg_index_out_of_range": (MINIMAL.replace("index = 0", "index = 6"), "index"),
    "unknown_syscall_name": (
        MINIMAL.replace('syscalls = ["sync"]', 'syscalls = ["frobnicate"]'),
        "unknown x86_64 system call",
    ),
    "workspace_too_small": (
        MINIMAL.replace("[filesystem]", "[filesystem]\nworkspace_size_bytes = 1048575"),
        "workspace_size_bytes",
    ),
    "workspace_too_large": (
        MINIMAL.replace("[filesystem]", "[filesystem]\nworkspace_size_bytes = 68719476737"),
        "workspace_size_bytes",
    ),
    "workspace_inodes_too_few": (
        MINIMAL.replace("[filesystem]", "[filesystem]\nworkspace_inodes = 63"),
        "workspace_inodes",
    ),
    "workspace_inodes_too_many": (
        MINIMAL.replace("[filesystem]", "[filesystem]\nworkspace_inodes = 16777217"),
        "workspace_inodes",
    ),
    "tmp_inodes_too_few": (
        MINIMAL.replace("[filesystem]", "[filesystem]\ntmp_inodes = 63"),
        "tmp_inodes",
    ),
    "tmp_inodes_too_many": (
        MINIMAL.replace("[filesystem]", "[filesystem]\ntmp_inodes = 16777217"),
        "tmp_inodes",
    ),
    "tmp_inodes_as_string": (
        MINIMAL.replace("[filesystem]", '[filesystem]\ntmp_inodes = "64"'),
        "tmp_inodes",
    ),
    "cgroup_memory_too_small": (
        MINIMAL + "\n[cgroup]\nmemory_max_bytes = 16777215\n",
        "memory_max_bytes",
    ),
    "cgroup_memory_too_large": (
        MINIMAL + "\n[cgroup]\nmemory_max_bytes = 1099511627777\n",
        "memory_max_bytes",
    ),
    "cgroup_pids_too_few": (MINIMAL + "\n[cgroup]\npids_max = 7\n", "pids_max"),
    "cgroup_pids_too_many": (MINIMAL + "\n[cgroup]\npids_max = 65537\n", "pids_max"),
    "cgroup_unknown_key": (MINIMAL + "\n[cgroup]\ncpu_max = 1\n", "cgroup.cpu_max"),
    "cgroup_not_a_table": (MINIMAL.replace("egress = []", "egress = []\ncgroup = 1"),
                           "cgroup"),
    "control_character_in_key": (
        MINIMAL + '\n[cgroup]\n"pids\\u0000\\u001b[2J" = 1\n',
        r"cgroup\.pids\\x00\\x1b\[2J",
    ),
}


@pytest.mark.parametrize(("text", "fragment"), list(INVALID.values()), ids=list(INVALID))
def test_invalid_profile_is_refused(tmp_path: Path, text: str, fragment: str) -> None:
    assert text != MINIMAL  # the mutation applied
    with pytest.raises(PolicyLoadError, match=fragment) as caught:
        load_profile(write_profile(tmp_path, text), "test")
    assert caught.value.exit_code == EXIT_ENVIRONMENT
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "name", ["", "Default", "../default", "default.toml", "a" * 65, "-x", "x/y", "déf", ".", "_x"]
)
def test_bad_profile_name_is_refused(tmp_path: Path, name: str) -> None:
    write_profile(tmp_path, MINIMAL)
    with pytest.raises(PolicyLoadError, match="does not match"):
        load_profile(tmp_path, name)


def test_symlinked_profile_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.toml"
    real.write_text(MINIMAL)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "test.toml").symlink_to(real)
    with pytest.raises(PolicyLoadError, match="symlinks are refused"):
        load_profile(tmp_path, "test")


def test_symlinked_profiles_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    write_profile(tmp_path / "real", MINIMAL)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "profiles").symlink_to(tmp_path / "real" / "profiles")
    with pytest.raises(PolicyLoadError, match="cannot open"):
        load_profile(tmp_path / "policy", "test")


def test_fifo_profile_is_refused_without_blocking(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    os.mkfifo(tmp_path / "profiles" / "test.toml")
    with pytest.raises(PolicyLoadError, match="not a regular file"):
        load_profile(tmp_path, "test")


def test_oversized_profile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="larger than"):
        load_profile(write_profile(tmp_path, MINIMAL + "#" * 300_000), "test")


def test_non_utf8_profile_is_refused(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "test.toml").write_bytes(MINIMAL.encode() + b"# \xff\n")
    with pytest.raises(PolicyLoadError, match="not UTF-8"):
        load_profile(tmp_path, "test")


def test_missing_profile_is_refused(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    with pytest.raises(PolicyLoadError, match="cannot open"):
        load_profile(tmp_path, "absent")


def test_lint_catches_allow_default_built_without_validation(tmp_path: Path) -> None:
    good = load_profile(write_profile(tmp_path, MINIMAL), "test")
    forged_seccomp = good.seccomp.model_construct(
        **{**dict(good.seccomp), "default_action": "allow"}
    )
    forged = Profile.model_construct(**{**dict(good), "seccomp": forged_seccomp})
    with pytest.raises(PolicyLoadError, match="not a deny action"):
        lint_profile(forged)


def test_profile_is_immutable(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, MINIMAL), "test")
    with pytest.raises(Exception, match="frozen"):
        profile.unsafe_host_network = True  # type: ignore[misc]
    assert isinstance(profile.seccomp.allow, tuple)


# -- workspace, tmpfs and cgroup settings ----------------------------------------


def test_resource_settings_default_when_absent(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, MINIMAL), "test")
    assert profile.filesystem.workspace_size_bytes == 256 * 1024 * 1024
    assert profile.filesystem.workspace_inodes == 65536
    assert profile.filesystem.tmp_inodes == 16384
    assert profile.filesystem.tmp_size_bytes == 64 * 1024 * 1024
    assert profile.cgroup.memory_max_bytes == 1024 * 1024 * 1024
    assert profile.cgroup.pids_max == 512


def test_resource_settings_are_read_at_their_bounds(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "[filesystem]",
        "[filesystem]\nworkspace_size_bytes = 1048576\nworkspace_inodes = 16777216\n"
        "tmp_inodes = 64",
    ) + "\n[cgroup]\nmemory_max_bytes = 1099511627776\npids_max = 8\n"
    profile = load_profile(write_profile(tmp_path, text), "test")
    assert profile.filesystem.workspace_size_bytes == 1 << 20
    assert profile.filesystem.workspace_inodes == 1 << 24
    assert profile.filesystem.tmp_inodes == 64
    assert profile.cgroup.memory_max_bytes == 1 << 40
    assert profile.cgroup.pids_max == 8


@pytest.mark.parametrize("name", ["default", "network"])
def test_shipped_profiles_state_every_resource_setting(name: str) -> None:
    import tomllib

    document = tomllib.loads((POLICY_DIR / "profiles" / f"{name}.toml").read_text())
    assert set(document["cgroup"]) == {"memory_max_bytes", "pids_max"}
    assert {"tmp_size_bytes", "tmp_inodes", "workspace_size_bytes",
            "workspace_inodes"} <= set(document["filesystem"])
    profile = load_profile(POLICY_DIR, name)
    assert profile.cgroup.pids_max == 512
    assert profile.filesystem.workspace_inodes == 65536


# -- the policy folder's one rule applies to profiles (T-S11) --------------------


UNSAFE = {
    # id: (path relative to the policy dir, mutation, message fragment)
    "world_writable_profile": ("profiles/test.toml", "mode:0o666",
                               r"profiles/test.toml: writable by group or others \(mode 0666\)"),
    "group_writable_profile": ("profiles/test.toml", "mode:0o664",
                               r"profiles/test.toml: writable by group or others \(mode 0664\)"),
    "foreign_profile": ("profiles/test.toml", "owner",
                        "profiles/test.toml: owned by uid 65534, not by root"),
    "world_writable_profiles_dir": ("profiles", "mode:0o777",
                                    "policy profiles/: writable by group or others"),
    "group_writable_profiles_dir": ("profiles", "mode:0o775",
                                    "policy profiles/: writable by group or others"),
    "foreign_profiles_dir": ("profiles", "owner", "policy profiles/: owned by uid 65534"),
    "world_writable_policy_dir": ("", "mode:0o777", "policy folder .*: writable by group"),
    "foreign_policy_dir": ("", "owner", "policy folder .*: owned by uid 65534"),
}


@pytest.mark.parametrize(("relative", "mutation", "fragment"), list(UNSAFE.values()),
                         ids=list(UNSAFE))
def test_unsafe_profile_or_folder_is_refused(tmp_path: Path, relative: str, mutation: str,
                                             fragment: str) -> None:
    policy = tmp_path / "policy"
    policy.mkdir(mode=0o755)
    write_profile(policy, MINIMAL)
    load_profile(policy, "test")  # the baseline is acceptable
    target = policy / relative if relative else policy
    if mutation == "owner":
        os.chown(target, 65534, 65534)
    else:
        os.chmod(target, int(mutation.removeprefix("mode:"), 8))
    with pytest.raises(PolicyLoadError, match=fragment) as caught:
        load_profile(policy, "test")
    assert caught.value.exit_code == EXIT_ENVIRONMENT


def test_symlinked_policy_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    write_profile(tmp_path / "real", MINIMAL)
    (tmp_path / "policy").symlink_to(tmp_path / "real")
    with pytest.raises(PolicyLoadError, match="policy folder .*symlinks are refused"):
        load_profile(tmp_path / "policy", "test")
