# SPDX-License-Identifier: Apache-2.0
"""Loading the policy folder: anything doubtful is PolicyLoadError (exit 6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from haios.errors import PolicyLoadError
from haios.load.policy import load_policy, resolve_policy_dir
from tests.world import World


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "w")


def _edit(world: World, old: str, new: str) -> None:
    path = world.policy / "policy.toml"
    path.write_text(path.read_text().replace(old, new, 1))


def test_the_shipped_default_policy_parses_apart_from_its_keys() -> None:
    import tomllib

    from haios.models.policy import PolicyFile

    shipped = Path(__file__).resolve().parents[2] / "policy" / "policy.toml"
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
