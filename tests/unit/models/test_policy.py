# SPDX-License-Identifier: Apache-2.0
"""Loading the policy folder: anything doubtful is PolicyLoadError (exit 6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from haios.errors import EXIT_ENVIRONMENT, PolicyLoadError
from haios.load.policy import load_policy, resolve_policy_dir
from tests.support.world import World


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "w")


def _edit(world: World, old: str, new: str) -> None:
    path = world.policy / "policy.toml"
    path.write_text(path.read_text().replace(old, new, 1))


def test_the_shipped_default_policy_parses_apart_from_its_keys() -> None:
    import tomllib

    from haios.models.policy import PolicyFile

    shipped = Path(__file__).resolve().parents[3] / "policy" / "policy.toml"
    model = PolicyFile.model_validate(tomllib.loads(shipped.read_text()))
    assert model.vault_scopes["reports"].policies == ["haios-reports-read"]


def test_valid_policy_loads(world: World) -> None:
    policy = load_policy(world.policy)
    assert policy.planner.keyids == {world.planner.keyid}
    assert {"default", "network"} <= set(policy.profiles)
    assert policy.engine_key.keyid == world.engine.keyid


def test_policy_dir_resolution_order() -> None:
    assert resolve_policy_dir("/a", {"HAIOS_POLICY": "/b"}) == Path("/a")
    assert resolve_policy_dir(None, {"HAIOS_POLICY": "/b"}) == Path("/b")
    assert resolve_policy_dir(None, {}) == Path("/etc/haios/policy")


@pytest.mark.parametrize(("old", "new", "why"), [
    ("threshold = 1", "threshold = 0", "threshold"),
    ("threshold = 1", "threshold = 2", "exceeds"),
    ('schema = "haios/policy/v1"', 'schema = "haios/policy/v2"', "schema"),
    ("[kill_switch]", "[kill_switch]\nunknown = 1", "unknown field"),
    ("[kill_switch]\nextra_paths = []", '[kill_switch]\nextra_paths = ["relative/KILL"]',
     "extra_paths"),
    ("[kill_switch]", '[ledger]\npath = "/var/lib/haios"\n\n[kill_switch]', "ledger"),
    ("[kill_switch]", "[limits]\nplan_max_bytes = 2000000\n\n[kill_switch]", "plan_max_bytes"),
])
def test_invalid_fields_are_refused(world: World, old: str, new: str, why: str) -> None:
    _edit(world, old, new)
    with pytest.raises(PolicyLoadError, match=why):
        load_policy(world.policy)


@pytest.mark.parametrize("scope_policies", ['["root"]', '["default"]', "[]", '["a", "a"]'])
def test_privileged_or_empty_vault_scopes_are_refused(world: World, scope_policies: str) -> None:
    path = world.policy / "policy.toml"
    path.write_text(path.read_text() + f"\n[vault_scopes.x]\npolicies = {scope_policies}\n")
    with pytest.raises(PolicyLoadError):
        load_policy(world.policy)


def test_reencoded_duplicate_key_is_refused(world: World) -> None:
    pem = world.planner.public_path.read_bytes()
    copy = world.policy / "keys" / "copy.pub.pem"
    copy.write_bytes(pem.replace(b"-----\n", b"-----\n\n", 1) + b"\n")
    os.chmod(copy, 0o644)
    _edit(world, 'keys = ["keys/planner.pub.pem"]',
          'keys = ["keys/planner.pub.pem", "keys/copy.pub.pem"]')
    with pytest.raises(PolicyLoadError, match="same key"):
        load_policy(world.policy)


@pytest.mark.parametrize("kind", ["rsa", "p384"])
def test_weak_or_unsupported_keys_are_refused(world: World, kind: str) -> None:
    private = (rsa.generate_private_key(65537, 2048) if kind == "rsa"
               else ec.generate_private_key(ec.SECP384R1()))
    (world.policy / "keys" / "planner.pub.pem").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(PolicyLoadError, match="Ed25519 and ECDSA P-256"):
        load_policy(world.policy)


@pytest.mark.parametrize("problem", ["group-writable", "missing", "not-toml", "no-default"])
def test_unsafe_or_broken_folder_is_refused(world: World, problem: str) -> None:
    if problem == "group-writable":
        os.chmod(world.policy / "policy.toml", 0o664)
    elif problem == "missing":
        (world.policy / "policy.toml").unlink()
    elif problem == "not-toml":
        (world.policy / "policy.toml").write_text("[roles.planner\n")
    else:
        (world.policy / "profiles" / "default.toml").unlink()
    with pytest.raises(PolicyLoadError):
        load_policy(world.policy)


def test_invalid_profile_is_refused(world: World) -> None:
    profile = world.policy / "profiles" / "default.toml"
    profile.write_text(profile.read_text() + "\nunexpected = true\n")
    with pytest.raises(PolicyLoadError):
        load_policy(world.policy)


# -- one rule for every file and directory of the folder (T-S11) ----------------


def _symlink_to_copy(path: Path, elsewhere: Path) -> None:
    """Replace `path` by a symlink to an identical copy outside the folder."""
    elsewhere.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        path.rename(elsewhere)
    else:
        elsewhere.write_bytes(path.read_bytes())
        path.unlink()
    path.symlink_to(elsewhere)


UNSAFE_ENTRIES = {
    # id: (relative path, mutation, message fragment)
    "world_writable_profile": ("profiles/default.toml", "mode:0o666",
                               "profiles/default.toml: writable by group or others"),
    "group_writable_profile": ("profiles/network.toml", "mode:0o664",
                               "profiles/network.toml: writable by group or others"),
    "foreign_profile": ("profiles/default.toml", "owner",
                        "profiles/default.toml: owned by uid 65534"),
    "symlinked_profile": ("profiles/network.toml", "symlink",
                          "profiles/network.toml: cannot open .*symlinks are refused"),
    "world_writable_profiles_dir": ("profiles", "mode:0o777",
                                    "policy profiles/: writable by group or others"),
    "group_writable_profiles_dir": ("profiles", "mode:0o775",
                                    "policy profiles/: writable by group or others"),
    "sticky_world_writable_profiles_dir": ("profiles", "mode:0o1777",
                                           "policy profiles/: writable by group or others"),
    "foreign_profiles_dir": ("profiles", "owner", "policy profiles/: owned by uid 65534"),
    "symlinked_profiles_dir": ("profiles", "symlink",
                               "policy profiles/: cannot open .*symlinks are refused"),
    "world_writable_policy_dir": ("", "mode:0o777", "policy folder .*: writable by group"),
    "foreign_policy_dir": ("", "owner", "policy folder .*: owned by uid 65534"),
    "symlinked_policy_dir": ("", "symlink", "policy folder .*symlinks are refused"),
    "world_writable_policy_toml": ("policy.toml", "mode:0o646",
                                   "policy policy.toml: writable by group or others"),
    "foreign_policy_toml": ("policy.toml", "owner", "policy policy.toml: owned by uid 65534"),
    "symlinked_policy_toml": ("policy.toml", "symlink",
                              "policy policy.toml: cannot open .*symlinks are refused"),
    "group_writable_keys_dir": ("keys", "mode:0o775", "policy keys/: writable by group"),
    "foreign_keys_dir": ("keys", "owner", "policy keys/: owned by uid 65534"),
    "symlinked_keys_dir": ("keys", "symlink", "policy keys/: cannot open .*symlinks are refused"),
    "world_writable_key": ("keys/agent.pub.pem", "mode:0o666",
                           "keys/agent.pub.pem: writable by group or others"),
    "foreign_engine_key": ("keys/engine.pub.pem", "owner",
                           "keys/engine.pub.pem: owned by uid 65534"),
    "symlinked_planner_key": ("keys/planner.pub.pem", "symlink",
                              "keys/planner.pub.pem: cannot open .*symlinks are refused"),
    "fifo_profile": ("profiles/default.toml", "fifo", "profiles/default.toml: not a regular file"),
}


@pytest.mark.parametrize(("relative", "mutation", "fragment"), list(UNSAFE_ENTRIES.values()),
                         ids=list(UNSAFE_ENTRIES))
def test_unsafe_policy_entry_is_refused(world: World, tmp_path: Path, relative: str,
                                        mutation: str, fragment: str) -> None:
    target = world.policy / relative if relative else world.policy
    if mutation.startswith("mode:"):
        os.chmod(target, int(mutation.removeprefix("mode:"), 8))
    elif mutation == "owner":
        os.chown(target, 65534, 65534)
    elif mutation == "fifo":
        target.unlink()
        os.mkfifo(target, 0o644)
    else:
        _symlink_to_copy(target, tmp_path / "elsewhere" / (relative or "policy"))
    with pytest.raises(PolicyLoadError, match=fragment) as caught:
        load_policy(world.policy)
    assert caught.value.exit_code == EXIT_ENVIRONMENT
    assert "\n" not in str(caught.value)


def test_an_unused_unsafe_profile_still_refuses_the_policy(world: World) -> None:
    extra = world.policy / "profiles" / "spare.toml"
    extra.write_bytes((world.policy / "profiles" / "default.toml").read_bytes())
    assert "spare" in load_policy(world.policy).profiles
    os.chmod(extra, 0o666)
    with pytest.raises(PolicyLoadError, match="profiles/spare.toml: writable"):
        load_policy(world.policy)


def test_nested_key_directories_are_each_checked(world: World) -> None:
    nested = world.policy / "keys" / "planners"
    nested.mkdir()
    os.replace(world.policy / "keys" / "planner.pub.pem", nested / "planner.pub.pem")
    _edit(world, "keys/planner.pub.pem", "keys/planners/planner.pub.pem")
    assert load_policy(world.policy).planner.keyids == {world.planner.keyid}
    os.chmod(nested, 0o777)
    with pytest.raises(PolicyLoadError, match="policy keys/planners/: writable"):
        load_policy(world.policy)


def test_owner_and_modes_the_fixtures_use_are_accepted(world: World) -> None:
    # Owned by root (the euid here), 0755 directories and 0644 files:
    # the install the README recommends.
    for path in [world.policy, *world.policy.rglob("*")]:
        info = path.lstat()
        assert info.st_uid in (0, os.geteuid()) and not info.st_mode & 0o022, path
    assert load_policy(world.policy).profiles.keys() >= {"default", "network"}


def test_oversized_key_is_refused_before_reading(world: World) -> None:
    with open(world.policy / "keys" / "agent.pub.pem", "ab") as handle:
        handle.truncate(1 << 30)
    with pytest.raises(PolicyLoadError, match="agent.pub.pem: larger than"):
        load_policy(world.policy)


@pytest.mark.parametrize("path", ["keys/../keys/planner.pub.pem", "keys/./planner.pub.pem",
                                  "keys//planner.pub.pem", "keys/planner.pub.pem/"])
def test_unnormalised_key_path_is_refused(world: World, path: str) -> None:
    _edit(world, '"keys/planner.pub.pem"', f'"{path}"')
    with pytest.raises(PolicyLoadError, match="leaves the policy folder or is not normalised"):
        load_policy(world.policy)


def test_engine_public_key_cannot_leave_the_folder(world: World) -> None:
    _edit(world, 'public_key = "keys/engine.pub.pem"',
          'public_key = "keys/../../engine-secret/engine.pub.pem"')
    with pytest.raises(PolicyLoadError, match="engine.public_key"):
        load_policy(world.policy)


# -- engine.state_dir and sandbox -----------------------------------------------


def test_state_dir_defaults_to_var_lib_haios(world: World) -> None:
    assert load_policy(world.policy).file.engine.state_dir == "/var/lib/haios"


def test_state_dir_can_be_set(world: World) -> None:
    _edit(world, 'public_key = "keys/engine.pub.pem"',
          'public_key = "keys/engine.pub.pem"\nstate_dir = "/srv/haios-state"')
    assert load_policy(world.policy).file.engine.state_dir == "/srv/haios-state"


@pytest.mark.parametrize("value", ["relative/dir", "/", "//srv", "/var/lib/../haios",
                                   "/var/lib/haios/", "/var/./lib", "/var//lib", "", "/a\\u0000b"])
def test_bad_state_dir_is_refused(world: World, value: str) -> None:
    _edit(world, 'public_key = "keys/engine.pub.pem"',
          f'public_key = "keys/engine.pub.pem"\nstate_dir = "{value}"')
    with pytest.raises(PolicyLoadError, match="state_dir"):
        load_policy(world.policy)


@pytest.mark.parametrize("uri", [
    "file2:relative/key", "file:/etc/key", "hv:", "file2:/", "file2:/k\x00ey",
    "hv:" + "k" * 4097, "file2:/\ud800",
])
def test_an_engine_signing_key_outside_the_uri_forms_is_refused(uri: str) -> None:
    from pydantic import ValidationError

    from haios.models.policy import EngineSection

    with pytest.raises(ValidationError):
        EngineSection.model_validate({"signing_key": uri, "public_key": "engine.pub"})


@pytest.mark.parametrize("uri", ["file2:/etc/haios/engine-key", "hv:haios-engine",
                                 "hv:" + "k" * 4096])
def test_an_engine_signing_key_in_a_uri_form_is_accepted(uri: str) -> None:
    from haios.models.policy import EngineSection

    assert EngineSection.model_validate(
        {"signing_key": uri, "public_key": "engine.pub"}).signing_key == uri
