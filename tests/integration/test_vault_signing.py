# SPDX-License-Identifier: Apache-2.0
"""Engine signing through Vault transit with `hv:` key URIs (threat T-V11).

Shows what `[engine] signing_key = "hv:<key>/<version>"` does: securesystemslib's
VaultSigner signs with transit key <key> at version <version>, using the
ambient VAULT_ADDR/VAULT_TOKEN, so the private key never leaves Vault.
Attacker: a step with a scoped token that tries to sign as the engine, or
someone hoping to export the key. Expected: both refused.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import hvac
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import UnverifiedSignatureError

from haios._util.signer_api import SSlibKey, signer_from_uri, vault_signer
from haios.sandbox.stepfs import StepMounts
from haios.secrets import (
    TOKEN_FILE_NAME,
    HvacProvider,
    ScopeGrant,
    write_token_into,
)
from tests.support.openbao import ENGINE_POLICY, REPORTS_POLICY, OpenBaoServer

pytest_plugins = ("tests.support.openbao",)

PAYLOAD = b"haios engine statement"


def _signing_policy(key: str) -> str:
    """The engine token's extra rules when its key lives in transit."""
    return (
        f'path "transit/sign/{key}" {{ capabilities = ["update"] }}\n'
        f'path "transit/keys/{key}" {{ capabilities = ["read"] }}\n'
    )


@pytest.fixture
def transit_key(openbao: OpenBaoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ed25519 transit key and an engine token allowed to sign with it."""
    key = f"haios-engine-{secrets.token_hex(4)}"
    openbao.enable_transit_key(key)
    openbao.write_policy(f"{key}-sign", _signing_policy(key))
    engine = openbao.create_token([ENGINE_POLICY, f"{key}-sign"])
    # VaultSigner, like the `vault` CLI, reads these when it is constructed.
    monkeypatch.setenv("VAULT_ADDR", openbao.addr)
    monkeypatch.setenv("VAULT_TOKEN", engine)
    return key


def test_hv_uri_signs_and_the_public_key_verifies(transit_key: str) -> None:
    uri, public_key = vault_signer().import_(transit_key)
    assert uri == f"hv:{transit_key}/1"
    assert public_key.keytype == "ed25519"

    signer = signer_from_uri(uri, public_key)
    assert isinstance(signer, vault_signer())
    signature = signer.sign(PAYLOAD)

    public_key.verify_signature(signature, PAYLOAD)
    with pytest.raises(UnverifiedSignatureError):
        public_key.verify_signature(signature, PAYLOAD + b"!")


def test_transit_public_key_exports_to_the_policy_pem(transit_key: str) -> None:
    uri, public_key = vault_signer().import_(transit_key)
    raw = bytes.fromhex(public_key.keyval["public"])
    pem = Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    # The engine loads the policy's keys/engine.pub.pem this way.
    from_pem = SSlibKey.from_crypto(serialization.load_pem_public_key(pem))

    assert from_pem.keyid == public_key.keyid
    from_pem.verify_signature(signer_from_uri(uri, from_pem).sign(PAYLOAD), PAYLOAD)


def test_hv_signer_signs_dsse_envelopes(transit_key: str) -> None:
    uri, public_key = vault_signer().import_(transit_key)
    envelope = Envelope(PAYLOAD, "application/vnd.in-toto+json", {})

    envelope.sign(signer_from_uri(uri, public_key))

    assert envelope.verify([public_key], 1) == {public_key.keyid: public_key}


def test_hv_uri_pins_the_key_version_across_rotation(
    openbao: OpenBaoServer, transit_key: str
) -> None:
    uri_v1, key_v1 = vault_signer().import_(transit_key)
    openbao.client().secrets.transit.rotate_key(name=transit_key)
    uri_v2, key_v2 = vault_signer().import_(transit_key)
    assert uri_v2 == f"hv:{transit_key}/2"
    assert key_v1.keyid != key_v2.keyid

    old = signer_from_uri(uri_v1, key_v1).sign(PAYLOAD)
    new = signer_from_uri(uri_v2, key_v2).sign(PAYLOAD)

    key_v1.verify_signature(old, PAYLOAD)  # the policy's public key keeps working
    key_v2.verify_signature(new, PAYLOAD)
    with pytest.raises(UnverifiedSignatureError):
        key_v1.verify_signature(new, PAYLOAD)


def test_a_public_key_that_is_not_the_transit_key_does_not_verify(transit_key: str) -> None:
    uri, _ = vault_signer().import_(transit_key)
    other = SSlibKey.from_crypto(Ed25519PrivateKey.generate().public_key())

    signature = signer_from_uri(uri, other).sign(PAYLOAD)

    with pytest.raises(UnverifiedSignatureError):
        other.verify_signature(signature, PAYLOAD)


def test_the_engine_key_cannot_be_exported(openbao: OpenBaoServer, transit_key: str) -> None:
    with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
        openbao.client().secrets.transit.export_key(name=transit_key, key_type="signing-key")


def test_a_step_token_cannot_sign_as_the_engine(
    openbao: OpenBaoServer, transit_key: str, tmp_path: Path
) -> None:
    engine = HvacProvider(openbao.addr, openbao.create_token([ENGINE_POLICY]))
    issued = engine.issue("s1", ScopeGrant((REPORTS_POLICY,), 60), ttl_seconds=60)
    mounts = StepMounts.create(65533, 65533, workspace_bytes=1 << 20, workspace_inodes=64,
                               with_secret=True)
    assert mounts.secret is not None
    write_token_into(mounts.secret.dir.fd, issued, 65533, 65533)
    step = openbao.client(
        Path(f"/proc/self/fd/{mounts.secret.dir.fd}/{TOKEN_FILE_NAME}").read_text())
    mounts.close()

    with pytest.raises(hvac.exceptions.Forbidden):
        step.secrets.transit.sign_data(name=transit_key, hash_input="aGFpb3M=")
    engine.revoke(issued.accessor)
